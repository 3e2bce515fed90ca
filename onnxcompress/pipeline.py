"""optimize(): Recipe → clean-up passes → planner (one for every method, over the registry's cost models) →
latency guard → decomposition and quantization passes (PassManager, verified after every pass) → fidelity →
gates → Report."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from ._version import __version__
from .data import feeds_factory, inputs_for_model, open_for_model
from .errors import UserError
from .ir.counts import has_quantized_ops, model_bytes, model_macs, model_params
from .ir.layers import collect_layers, layer_kernel, nested_compute_nodes
from .ir.modelio import load_model
from .ir.shapes import input_shapes
from .ort.fidelity import Fidelity, fidelity
from .passes import registry
from .passes.base import LayerRecord, Wiring
from .passes.manager import PassManager
from .planning.planner import Plan, Planner
from .recipe import Recipe
from .report.report import Gate, Report

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report

    @property
    def passed(self) -> bool:
        return self.report.passed

    def save(self, path, report: str | Path | None = None, external: bool | None = None) -> Path:
        """Write the model atomically (never onto an existing input: use another path) and, with `report`,
        the JSON report beside it."""
        from .ir.modelio import save_model_atomic, write_text_atomic

        out = save_model_atomic(self.model, path, external=external)
        if report is not None:
            write_text_atomic(self.report.to_json() + "\n", report)
        return out


def optimize(model: str | Path | onnx.ModelProto, recipe: Recipe | None = None, calibration=None,
             eval_data=None, progress: Progress | None = None) -> Result:
    """Compress `model` by `recipe`. `calibration` / `eval_data` override the recipe's data sources (a path,
    'random', or an already opened dataset). Returns the optimized model and its report; gates that fail
    mark `report.passed = False` (the model is still returned)."""
    from .decompose._blas import one_blas_thread

    with one_blas_thread():   # the numerics run single-threaded BLAS; ORT keeps its own threads
        return _Run(recipe, calibration, eval_data, progress).optimize(model)


class _Run:
    """One optimize call: the recipe, its data sources (opened once, when first needed), the report."""

    def __init__(self, recipe, calibration, eval_data, progress):
        self.recipe = (recipe or Recipe()).validate()
        self.calibration_src = calibration if calibration is not None else self.recipe.calibration
        self.eval_src = eval_data if eval_data is not None else self.recipe.eval_data
        self.progress = progress
        self.report = Report(recipe=self.recipe.to_dict(), versions=_versions())
        self._calib = None

    def note(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    # ------------------------------------------------------------------------------------------ data
    def open(self, src, limit):
        return open_for_model(src, self.model, self.shapes, preprocess=self.recipe.preprocess,
                              labels=self.recipe.labels, limit=limit, seed=self.recipe.seed)

    def calibration(self, required_for: str | None = None):
        """The calibration dataset (opened once), or None when none was given and `required_for` is None."""
        if self._calib is None:
            src = self.calibration_src
            if src is None:
                if required_for is None:
                    return None
                src = "random"
            self._calib = self.open(src, self.recipe.calibration_samples)
        return self._calib

    # ------------------------------------------------------------------------------------------ run
    def optimize(self, model) -> Result:
        r, report = self.recipe, self.report
        bytes_before = None
        if isinstance(model, (str, Path)):
            bytes_before = _file_bytes(model)
            model = load_model(model)
        if not isinstance(model, onnx.ModelProto):
            raise UserError("model must be a path or an onnx.ModelProto")
        self.model = original = model
        self.shapes = shapes = input_shapes(model, {k: tuple(v) for k, v in r.input_shape.items()})
        if not shapes:
            raise UserError("model has no inputs")
        if r.method != "none" and not any(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node):
            raise UserError("model has no Conv, Gemm or MatMul node to compress")
        q = has_quantized_ops(model)
        if q and r.quantize != "none":
            raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing to re-quantize; "
                            f"use --quantize none to decompose its float layers only")
        if r.data_aware and r.method not in ("tucker2", "svd"):
            raise UserError(f"--data-aware works with --method tucker2 or svd (not {r.method})")
        # the data sources the user named are opened (and checked) before any work
        self.calibration()
        self.eval_ds = self.open(self.eval_src, r.eval_samples) if self.eval_src is not None else None

        pm = PassManager(shapes, verify=r.verify, progress=self.progress, seed=r.seed,
                         keep_models=r.min_speedup is not None)   # the speedup gate times every stage
        clean = pm.run(model, [p() for p in registry.CLEANUP] if r.fold_bn else [])
        plan, layers = self.plan(clean)
        passes = self.passes(plan, clean)
        out = pm.run(clean, passes)
        report.passes = pm.records
        self.assemble(original, out, plan, layers, pm, bytes_before)
        fid = self.measure(original, out, pm)
        _gates(r, report, fid)
        return Result(model=out, report=report)

    def plan(self, model: onnx.ModelProto) -> tuple[Plan, list]:
        r = self.recipe
        layers = collect_layers(model, self.shapes) if r.method != "none" or r.layers else []
        planner = Planner(r, registry.cost_models())
        curves = None
        if r.allocation == "sensitivity" and r.rank is None and layers:
            curves = self.sensitivity_curves(model, planner, layers)
        plan = planner.plan(layers, curves)
        from .planning.latency_guard import guard_for_recipe

        guard = guard_for_recipe(r)
        if guard is not None and plan.planned():
            self.note(f"latency guard: timing {len(plan.planned())} planned layers on {guard.provider}")
            guard.apply(plan, layers, registry.cost_models(), self.progress)
            self.report.latency = {"guard": guard.summary()}
        return plan, layers

    def sensitivity_curves(self, model, planner: Planner, layers) -> dict:
        """Curves from `--sensitivity FILE`, else measured now (one layer at a time, cached on disk) on the
        calibration (else evaluation, else random) data."""
        from .planning.sensitivity import curves_from_analysis, load_analysis

        r = self.recipe
        facts = {i.name: (i.T, i.S, layer_kernel(i)) for i in layers}
        if r.sensitivity:
            analysis = load_analysis(r.sensitivity)
        else:
            from .analysis.sweep import DEFAULT_GRID, analyze

            wanted = {}
            for i in layers:
                m, why = planner.method_for(i)
                if why is None and planner.methods[m].takes(i) is None:
                    wanted.setdefault(m, []).append(i.name)
            src = self.calibration_src or self.eval_src or "random"
            samples = min(64, r.calibration_samples or 64)
            self.note("sensitivity curves: one layer at a time on ORT CPU")
            analysis = analyze(model, src, grid=DEFAULT_GRID, samples=samples, preprocess=r.preprocess,
                               labels=r.labels, input_shape=r.input_shape or None, quantize=None,
                               global_curve=False, progress=False, seed=r.seed, methods=wanted, fold_bn=False)
            st = analysis["stats"]
            self.report.warnings.append(
                f"sensitivity curves measured on the fly on {analysis['settings']['data']} "
                f"({analysis['settings']['samples']} samples; {st['evaluated']} variants evaluated, {st['cached']} "
                f"cached): pass --sensitivity FILE from `onnxcompress analyze` to choose the data")
        curves, _ = curves_from_analysis(analysis, r.quantize, r.sensitivity_metric, layers=facts)
        return curves

    def passes(self, plan: Plan, model: onnx.ModelProto) -> list:
        r, report = self.recipe, self.report
        calib = self.calibration("int8" if r.quantize == "int8" else None)
        if calib is None and r.data_aware:
            raise UserError("--data-aware needs calibration data: pass --calibration DIR|FILE "
                            "(or --calibration random, which only makes sense for smoke tests)")
        feeds = feeds_factory(model, calib) if calib is not None else None
        real = calib is not None and getattr(calib, "kind", "") != "random"
        da = None
        if r.data_aware:
            from .passes.data_aware import DataAware

            if not real:
                report.warnings.append("--data-aware statistics come from random inputs (not real data): the "
                                       "factorization is fitted to noise; pass --calibration DIR|FILE")
            da = DataAware(feeds=feeds, shapes=self.shapes, method=r.data_aware_method, n_samples=len(calib),
                           batch_size=16, seed=r.seed, progress=self.progress)
            da.facts["calibration"] = {"kind": getattr(calib, "kind", "?"), "samples": len(calib),
                                       "description": getattr(calib, "description", "")}
        wiring = Wiring(recipe=r, shapes=self.shapes, calibration=feeds, calibration_real=real, data_aware=da,
                        quantized=r.quantize)
        self.data_aware = da
        out = [registry.METHODS[m].build(plan.policy(m), wiring) for m in registry.METHODS if m in plan.methods()]
        if da is not None and r.data_aware_refit and out:
            from .passes.refit import RefitPass
            out.append(RefitPass(da))
        report.warnings += wiring.warnings
        if r.quantize == "int8":
            if calib.kind == "random":
                report.warnings.append("INT8 calibrated on random inputs (not real data): activation ranges may "
                                       "not match deployment; pass --calibration DIR|FILE")
            report.calibration = {"source": str(getattr(calib, "source", "random")), "kind": calib.kind,
                                  "description": calib.description, "samples": len(calib)}
            from .data import CalibrationReader
            from .ir.shapes import fixed_batch
            from .ort.quantize import int8_format_for

            names = list(self.shapes)
            dtypes = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
                      for vi in model.graph.input if vi.name in self.shapes}
            fixed = fixed_batch(model, names[0])
            reader = lambda: CalibrationReader(calib, names, batch_size=fixed or 8,   # noqa: E731
                                               fixed_batch=fixed is not None, input_dtypes=dtypes)
            fmt = int8_format_for(r.providers[0], r.int8_activations, r.int8_weights)
            excl = [k for k, o in r.layers.items() if o.precision == "float"]
            out.append(registry.quantizer("int8", reader_factory=reader, fmt=fmt, exclude_globs=excl,
                                          calibration_label=calib.description))
        elif r.quantize == "fp16":
            out.append(registry.quantizer("fp16"))
        return out

    # ------------------------------------------------------------------------------------------ report
    def assemble(self, original, out, plan: Plan, layers, pm: PassManager, bytes_before) -> None:
        r, report = self.recipe, self.report
        for p, res in pm.results:
            report.quantization.update({k: v for k, v in res.info.items()
                                        if k in ("int8", "fp16", "quantized_ops", "float_ops_left")})
        records = layer_records(plan, layers, [res for p, res in pm.results if p.name in _DECOMPOSITION_PASSES])
        report.layers = [rec.to_dict() for rec in records]
        if r.method != "none":
            report.layers += [LayerRecord(name=n, op=op, method=r.method,
                                          skipped=f"{where}: subgraphs and functions are left alone").to_dict()
                              for n, op, where in nested_compute_nodes(original)]
        done = [rec for rec in records if rec.skipped is None]
        m = report.model = {
            "params_before": model_params(original), "params_after": model_params(out),
            "macs_before": model_macs(original, self.shapes), "macs_after": model_macs(out, self.shapes),
            "bytes_before": bytes_before if bytes_before is not None else model_bytes(original),
            "bytes_after": model_bytes(out),
            "decomposed_layers": len(done),
            "decomposed_params_before": sum(x.params_before for x in done),
            "decomposed_params_after": sum(x.params_after for x in done),
            "input_shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        if plan.notes:
            m["allocation_notes"] = list(plan.notes)
        if plan.summary:
            m["plan"] = dict(plan.summary)
        if done:
            m["decomposed_ratio"] = m["decomposed_params_before"] / max(m["decomposed_params_after"], 1)
        if getattr(self, "data_aware", None) is not None:
            m["data_aware"] = {**self.data_aware.facts, "method": self.data_aware.method}

    def measure(self, original, out, pm: PassManager) -> Fidelity:
        """Fidelity on ORT CPU (evaluation data, else the calibration data, else random inputs), and the
        latency of every stage when `--min-speedup` asks for it."""
        r, report = self.recipe, self.report
        self.note("fidelity on ORT CPU")
        ev = self.eval_ds or self.calibration() or self.open("random", 16)
        fid = fidelity(original, out, inputs_for_model(original, ev, batch_size=16), "cpu", ev.description)
        report.fidelity = fid.to_dict()
        if r.min_speedup is not None:
            from .ort.timing import stage_latency

            self.note(f"latency on ORT {r.providers[0]} (interleaved)")
            stages = [("input", original)] + [(p.name, res.model) for p, res in pm.results
                                              if res.modified and res.model is not None]
            report.latency = {**(report.latency or {}), **stage_latency(stages, r.providers[0],
                                                                        input_shape=self.shapes, seed=r.seed)}
        return fid


_DECOMPOSITION_PASSES = {"Tucker2", "CP4", "CP3", "SVD", "Refit"}


def layer_records(plan: Plan, layers, results) -> list[LayerRecord]:
    """One record per layer of the plan: the pass's record where a pass rewrote it (with the plan's facts:
    planned ranks, alignment, latency-guard measurement, predicted degradation), else why it stayed (the
    pass's reason when the plan asked for a rewrite the pass refused, else the plan's)."""
    rewritten, refused = {}, {}
    for res in results:
        for rec in res.layers:
            if rec.skipped is None:
                rewritten[rec.name] = rec
            elif rec.name in plan.layers and plan.layers[rec.name].method == rec.method and \
                    plan.layers[rec.name].ranks is not None:
                refused[rec.name] = rec
    out = []
    for info in layers:
        lp = plan.layers[info.name]
        rec = rewritten.get(info.name) or refused.get(info.name)
        if rec is None:
            rec = LayerRecord(name=info.name, op=getattr(info, "op", "Conv"), method=lp.method or "-",
                              kernel_shape=_kernel_shape(info), params_before=info.params, params_after=info.params,
                              macs_before=info.macs, macs_after=info.macs, skipped=lp.reason or "kept by the plan")
        if lp.planned is not None and rec.skipped is None and tuple(lp.planned) != tuple(rec.ranks or ()):
            rec.extra["planned_ranks"] = list(lp.planned)
        for k in ("latency_guard", "aligned_from"):
            if k in lp.extra:
                rec.extra[k] = lp.extra[k]
        if lp.predicted_degradation is not None:
            rec.extra["predicted_degradation"] = lp.predicted_degradation
        out.append(rec)
    return out


def _kernel_shape(info) -> list[int] | None:
    ws = getattr(info, "weight_shape", None)
    if ws:
        return list(ws)
    if getattr(info, "conv", None) is not None and info.conv.weight_shape:
        return list(info.conv.weight_shape)
    W = getattr(info, "W", None)
    return list(W.shape) if W is not None else None


def _file_bytes(path) -> int | None:
    """Bytes of an ONNX file with its external data files."""
    from .ir.modelio import external_data_files

    p = Path(path)
    if not p.exists():
        return None
    return p.stat().st_size + sum(f.stat().st_size for f in external_data_files(p))


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
