"""Recipe → passes → PassManager (verifies after every pass) → fidelity → Report."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import __version__
from .errors import UserError, VerificationError
from .evaluate import Fidelity, fidelity, make_session, random_feeds, rel_error
from .graph import (fixed_batch, has_quantized_ops, open_batch_shape, input_shapes, model_bytes, model_macs, model_params)
from .modelio import load_model
from .passes.base import Pass, PassResult
from .passes.fold_bn import FoldBatchNorm
from .passes.quantize import ConvertFP16, QuantizeInt8, int8_format_for
from .passes.tucker2 import Tucker2Pass, tucker2_problem
from .planning import Tucker2Planner
from .recipe import Recipe
from .report import Gate, PassRecord, Report

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

LOSSLESS_RTOL = 1e-4


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report

    @property
    def passed(self) -> bool:
        return self.report.passed


# ------------------------------------------------------------------------------------------ pass manager
class PassManager:
    """Runs passes in order, times each, and verifies after each one that changed the model:
    onnx.checker with full shape inference, ONNX Runtime loads and runs it, and — for passes that declare
    themselves lossless — its outputs equal the previous model's within `rtol`."""

    def __init__(self, passes: list[Pass], shapes: dict[str, tuple[int, ...]], verify: bool = True,
                 rtol: float = LOSSLESS_RTOL, progress: Progress | None = None, seed: int = 0,
                 keep_models: bool = True):
        self.keep_models = keep_models   # False: drop each intermediate model once the next pass has run
        self.passes = passes
        self.shapes = shapes
        self.verify = verify
        self.rtol = rtol
        self.progress = progress
        self.seed = seed

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord], list[PassResult]]:
        feeds = random_feeds(model, self.shapes, self.seed) if self.verify else None
        prev_out = self._outputs(model, feeds, "input model") if self.verify else None
        records, results = [], []
        for p in self.passes:
            if self.progress:
                self.progress(f"pass {p.name}")
            t0 = time.perf_counter()
            res = p.run(model, self.progress)
            seconds = time.perf_counter() - t0
            ver: dict = {}
            if res.modified and self.verify:
                ver, prev_out = self._verify(p, res, feeds, prev_out)
            records.append(PassRecord(name=p.name, seconds=round(seconds, 4), modified=res.modified,
                                      lossless=res.lossless, verified=ver))
            results.append(res)
            model = res.model
            if not self.keep_models and len(results) >= 2 and results[-2].model is not model:
                results[-2].model = None
            release_memory()
        return model, records, results

    def _outputs(self, model, feeds, what: str, pass_name: str = "load"):
        try:
            sess = make_session(model, "cpu", lean=True)
            out = sess.run(None, feeds)
            del sess
            release_memory()
            return out
        except Exception as e:
            if pass_name == "load":
                raise UserError(f"ONNX Runtime cannot run the input model: {_line(e)}") from e
            raise VerificationError(pass_name, f"ONNX Runtime cannot run the {what}: {_line(e)}") from e

    def _verify(self, p: Pass, res: PassResult, feeds, prev_out):
        changed = [l.name for l in res.layers if l.skipped is None]
        layer = changed[0] if len(changed) == 1 else None
        t0 = time.perf_counter()
        try:
            _check(res.model)
        except Exception as e:
            raise VerificationError(p.name, f"onnx.checker: {_line(e)}", layer) from e
        out = self._outputs(res.model, feeds, "rewritten model", p.name)
        ver = {"checker": True, "ort_runs": True}
        if prev_out is not None and all(np.all(np.isfinite(o)) for o in prev_out if np.issubdtype(o.dtype, np.floating)):
            bad = [i for i, o in enumerate(out) if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o))]
            if bad:
                raise VerificationError(p.name, f"output {bad[0]} holds NaN/Inf after the pass", layer)
        if res.lossless and prev_out is not None:
            errs = [rel_error(a, b) for a, b in zip(prev_out, out)
                    if np.issubdtype(np.asarray(a).dtype, np.floating)]
            worst = max(errs) if errs else 0.0
            ver["max_rel_error_vs_previous"] = worst
            if worst > self.rtol:
                where = layer or (", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
                raise VerificationError(
                    p.name, f"lossless pass changed the outputs (relative error {worst:.2e} > {self.rtol:g}); "
                    f"rewritten layers: {where}", layer)
        ver["seconds"] = round(time.perf_counter() - t0, 4)
        return ver, out


def release_memory() -> None:
    """Give freed heap back to the OS after dropping a large object (an ORT session, a model copy): glibc
    keeps it otherwise, and peak RSS then grows with every pass."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check(model: onnx.ModelProto) -> None:
    if model.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(model, full_check=True)
    else:  # the checker needs a path for models over 2 GB
        import tempfile
        with tempfile.TemporaryDirectory() as td:
            p = Path(td) / "m.onnx"
            onnx.save_model(model, p, save_as_external_data=True, location="m.data")
            onnx.checker.check_model(str(p), full_check=True)


def _line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# ------------------------------------------------------------------------------------------ data
def _open(source, shapes, model, recipe: Recipe, limit: int | None):
    from .data import DataError, open_dataset
    from .evaluate import RandomInputs

    if isinstance(source, str) and source.strip().lower() == "random":
        return RandomInputs(model, shapes, n=limit or 16, seed=recipe.seed)
    name = next(iter(shapes))
    shape = open_batch_shape(model, name, shapes[name])
    try:
        return open_dataset(str(source), input_shape=shape if len(shape) == 4 else None,
                            input_name=name, preprocess=recipe.preprocess,
                            labels=recipe.labels, limit=limit, seed=recipe.seed)
    except DataError as e:
        raise UserError(str(e)) from e


def _batches(ds, model: onnx.ModelProto, name: str):
    """Batches for ORT: of the model's static batch size (a short last batch is dropped), else of 16."""
    fixed = fixed_batch(model, name)
    for inputs, labels in ds.batches(fixed or 16):
        n = len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
        if fixed and n != fixed:
            continue
        yield inputs, labels


def _calibration_reader_factory(dataset, model: onnx.ModelProto, shapes: dict):
    from .calibration import CalibrationReader

    names = list(shapes)
    dtypes = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
              for vi in model.graph.input if vi.name in shapes}
    fixed = fixed_batch(model, names[0])
    # dynamic batch: 8 samples per ORT call (min/max over a batch equals min/max over its samples)
    return lambda: CalibrationReader(dataset, names, batch_size=fixed or 8, fixed_batch=fixed is not None,
                                     input_dtypes=dtypes)


# ------------------------------------------------------------------------------------------ optimize
def optimize(model: str | Path | onnx.ModelProto, recipe: Recipe | None = None, calibration=None,
             eval_data=None, progress: Progress | None = None) -> Result:
    """Compress `model` by `recipe`. `calibration` / `eval_data` override the recipe's data sources (a path,
    'random', or an already opened dataset). Returns the optimized model and its report; gates that fail
    mark `report.passed = False` (the model is still returned)."""
    from .decompose._blas import one_blas_thread

    with one_blas_thread():   # the numerics run single-threaded BLAS; ORT keeps its own threads
        return _optimize(model, recipe, calibration, eval_data, progress)


def _optimize(model: str | Path | onnx.ModelProto, recipe: Recipe | None = None, calibration=None,
             eval_data=None, progress: Progress | None = None) -> Result:
    recipe = (recipe or Recipe()).validate()
    bytes_before = None
    if isinstance(model, (str, Path)):
        bytes_before = Path(model).stat().st_size if Path(model).exists() else None
        model = load_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise UserError("model must be a path or an onnx.ModelProto")
    original = model
    shapes = input_shapes(model, {k: tuple(v) for k, v in recipe.input_shape.items()})
    if not shapes:
        raise UserError("model has no inputs")
    report = Report(recipe=recipe.to_dict(), versions=_versions())
    first_input = next(iter(shapes))

    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if recipe.method != "none" and not convs:
        raise UserError("model has no Conv, Gemm or MatMul node to compress")
    from .svd_glue import data_aware_context, merge_layer_records, summary, svd_passes, tucker2_factorizer
    da_ctx, da_warn = data_aware_context(recipe, model, shapes, calibration, lambda src: _open(
        src, shapes, model, recipe, recipe.calibration_samples), progress)   # None without --data-aware
    report.warnings += da_warn
    da_t2 = tucker2_factorizer(da_ctx) if recipe.method == "tucker2" else None
    q = has_quantized_ops(model)
    if q and recipe.quantize != "none":
        raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing to re-quantize; "
                        f"use --quantize none to decompose its float layers only")

    passes: list[Pass] = []
    if recipe.fold_bn:
        passes.append(FoldBatchNorm())
    guard = planner = None
    if recipe.method == "tucker2":
        from .latency_guard import aligned_for_recipe, guard_for_recipe, tucker2_chain

        planner = Tucker2Planner(recipe, tucker2_problem)
        if recipe.allocation == "sensitivity" and recipe.rank is None:   # curves: --sensitivity FILE or measured now
            from .sensitivity import attach
            report.warnings += attach(planner, model, recipe, shapes, calibration, progress)
        policy = aligned_for_recipe(recipe, planner)
        guard = guard_for_recipe(recipe, tucker2_chain)
        passes.append(Tucker2Pass(guard.wrap(policy) if guard else policy, shapes,
                                  max_memory_mb=recipe.max_memory_mb, factorizer=da_t2))
    cp_pass = None
    if recipe.method in ("cp4", "cp3"):
        from .cp_glue import build_cp_pass

        cp_pass = build_cp_pass(recipe, shapes)
        passes.append(cp_pass)
    if recipe.method in ("svd", "tucker2"):   # SVD of 1x1 convs (+ Gemm/MatMul), then the data-aware refit
        passes += svd_passes(recipe, shapes, da_ctx)
    calib_ds = None
    if recipe.quantize == "int8":
        src = calibration if calibration is not None else (recipe.calibration or "random")
        calib_ds = src if hasattr(src, "batches") else _open(src, shapes, model, recipe, recipe.calibration_samples)
        if calib_ds.kind == "random":
            report.warnings.append("INT8 calibrated on random inputs (not real data): activation ranges may "
                                   "not match deployment; pass --calibration DIR|FILE")
        report.calibration = {"source": str(getattr(calib_ds, "source", src)), "kind": calib_ds.kind,
                              "description": calib_ds.description, "samples": len(calib_ds)}
        fmt = int8_format_for(recipe.providers[0], recipe.int8_activations, recipe.int8_weights)
        excl = [k for k, o in recipe.layers.items() if o.precision == "float"]
        passes.append(QuantizeInt8(_calibration_reader_factory(calib_ds, model, shapes),
                                   fmt, exclude_globs=excl, calibration_label=calib_ds.description))
    elif recipe.quantize == "fp16":
        passes.append(ConvertFP16())
    if cp_pass is not None:   # calibration feeds for CP equalisation; unstable CP layers -> the INT8 pass
        from .cp_glue import wire_cp_pass

        report.warnings += wire_cp_pass(cp_pass, recipe, calib_ds, passes, model, shapes, calibration,
                                        lambda src: _open(src, shapes, model, recipe, recipe.calibration_samples))

    pm = PassManager(passes, shapes, verify=recipe.verify, progress=progress, seed=recipe.seed,
                     keep_models=recipe.min_speedup is not None)   # the speedup gate times every stage
    out, records, results = pm.run(model)
    report.passes = records
    for res in results:
        report.quantization.update({k: v for k, v in res.info.items() if k in ("int8", "fp16", "quantized_ops",
                                                                             "float_ops_left")})
    dec_layers = [l for res, p in zip(results, passes) if p.name not in ("FoldBatchNorm", "QuantizeInt8",
                                                                          "ConvertFP16") for l in res.layers]
    if guard is not None:
        guard.annotate(dec_layers)
        report.latency = {"guard": guard.summary()}
    dec_layers = merge_layer_records(dec_layers)
    report.layers = [l.to_dict() for l in dec_layers]
    if recipe.method != "none":
        from .graph import nested_compute_nodes
        from .passes.base import LayerRecord
        report.layers += [LayerRecord(name=n, op=op, method=recipe.method,
                                      skipped=f"{where}: subgraphs and functions are left alone").to_dict()
                          for n, op, where in nested_compute_nodes(original)]
    done = [l for l in dec_layers if l.skipped is None]
    report.model = {
        "params_before": model_params(original), "params_after": model_params(out),
        "macs_before": model_macs(original, shapes), "macs_after": model_macs(out, shapes),
        "bytes_before": bytes_before if bytes_before is not None else model_bytes(original),
        "bytes_after": model_bytes(out),
        "decomposed_layers": len(done),
        "decomposed_params_before": sum(l.params_before for l in done),
        "decomposed_params_after": sum(l.params_after for l in done),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
    }
    if da_ctx is not None:
        report.model["data_aware"] = summary(da_ctx, da_t2)
    if planner is not None and planner.notes:   # what the global allocation achieved / predicted
        report.model["allocation_notes"] = list(planner.notes)
    if done:
        report.model["decomposed_ratio"] = report.model["decomposed_params_before"] / max(
            report.model["decomposed_params_after"], 1)

    # fidelity on ORT CPU: eval data, else the calibration data, else random inputs
    if progress:
        progress("fidelity on ORT CPU")
    ev_src = eval_data if eval_data is not None else recipe.eval_data
    if ev_src is not None:
        ev = ev_src if hasattr(ev_src, "batches") else _open(ev_src, shapes, model, recipe, recipe.eval_samples)
    elif calib_ds is not None:
        ev = calib_ds
    else:
        ev = _open("random", shapes, model, recipe, 16)
    fid: Fidelity = fidelity(original, out, _batches(ev, model, first_input), "cpu", ev.description)
    report.fidelity = fid.to_dict()
    if recipe.min_speedup is not None:
        from .bench import stage_latency

        if progress:
            progress(f"latency on ORT {recipe.providers[0]} (interleaved)")
        stages = [("input", original)] + [(p.name, r.model) for p, r in zip(passes, results) if r.modified]
        report.latency = {**(report.latency or {}), **stage_latency(stages, recipe.providers[0],
                                                                    input_shape=shapes, seed=recipe.seed)}
    _gates(recipe, report, fid)
    return Result(model=out, report=report)


def _gates(recipe: Recipe, report: Report, fid: Fidelity) -> None:
    if recipe.min_top1_agreement is not None:
        v = fid.top1_agreement
        report.gates.append(Gate("min_top1_agreement", recipe.min_top1_agreement, v,
                                 v is not None and v >= recipe.min_top1_agreement))
    if recipe.max_accuracy_drop is not None:
        v = fid.accuracy_drop
        if v is None:
            report.warnings.append("--max-accuracy-drop needs labelled --eval-data; the gate fails without it")
        report.gates.append(Gate("max_accuracy_drop", recipe.max_accuracy_drop, v,
                                 v is not None and v <= recipe.max_accuracy_drop))
    if recipe.min_speedup is not None:
        v = (report.latency or {}).get("speedup")
        if v is None:
            report.warnings.append(f"--min-speedup: latency not measured "
                                   f"({(report.latency or {}).get('skipped', 'no timing')}); the gate fails")
        report.gates.append(Gate("min_speedup", recipe.min_speedup, v, v is not None and v >= recipe.min_speedup))
    report.passed = all(g.passed for g in report.gates)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxcompress": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
