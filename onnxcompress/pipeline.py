"""optimize(): Recipe → clean-up passes → plan → decomposition and quantization passes (PassManager, verified
after every pass) → fidelity on held-apart data, whole-model latency and size against the input → floors,
gates → Report.

The plan comes from the planner (explicit recipes: one planner for every method, over the registry's cost
models, then the latency guard) or from the auto search (`--method auto`, onnxcompress.auto.driver)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from ._version import __version__
from .auto.budget import degenerate_outputs, floor_warnings
from .data import feeds_factory, inputs_for_model, open_for_model
from .data.datasets import RandomDataset, split_holdout
from .errors import UserError
from .ir.counts import has_quantized_ops, model_bytes, model_macs, model_params
from .ir.layers import collect_layers, detach_weights, layer_kernel, nested_compute_nodes
from .ir.modelio import load_model
from .ir.shapes import input_shapes
from .ort.fidelity import Fidelity
from .passes import registry
from .passes.base import LayerRecord, Wiring
from .passes.manager import PassManager
from .planning.planner import Plan, Planner
from .recipe import Recipe
from .report.report import Gate, Report, data_aware_line, nothing_changed

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
#: without calibration data, a decomposition must keep the output this close on synthetic inputs
SYNTHETIC_FLOOR_DB = 40.0


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report

    @property
    def passed(self) -> bool:
        return self.report.passed

    def save(self, path, report: str | Path | None = None, external: bool | None = None) -> Path:
        """Write the model atomically and, with `report`, the JSON report beside it."""
        from .ir.modelio import save_model_atomic, write_text_atomic

        out = save_model_atomic(self.model, path, external=external)
        if report is not None:
            write_text_atomic(self.report.to_json() + "\n", report)
        return out


def optimize(model: str | Path | onnx.ModelProto, recipe: Recipe | None = None, calibration=None,
             eval_data=None, progress: Progress | None = None) -> Result:
    """Compress `model` by `recipe`. `calibration` / `eval_data` override the recipe's data sources (a path,
    'random', or an already opened dataset). Returns the optimized model and its report; gates that fail
    (and, with `strict`, warnings) mark `report.passed = False` (the model is still returned)."""
    from .decompose._blas import one_blas_thread

    with one_blas_thread():   # the numerics run single-threaded BLAS; ORT keeps its own threads
        return Run(recipe, calibration, eval_data, progress).optimize(model)


class Run:
    """One optimize call: the recipe, its data (opened once, before any work), the report."""

    def __init__(self, recipe, calibration, eval_data, progress):
        from .ort.providers import require_available

        self.recipe = (recipe or Recipe()).validate()
        provider_warnings = require_available(self.recipe.providers, self.recipe.allow_unavailable_providers,
                                              "optimize")
        self.calibration_src = calibration if calibration is not None else self.recipe.calibration
        self.eval_src = eval_data if eval_data is not None else self.recipe.eval_data
        self.progress = progress
        self.report = Report(recipe=self.recipe.to_dict(), versions=_versions(), warnings=list(provider_warnings))
        self.data_aware_facts = None

    def note(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    # ------------------------------------------------------------------------------------------ data
    def open(self, src, limit):
        return open_for_model(src, self.model, self.shapes, preprocess=self.recipe.preprocess,
                              labels=self.recipe.labels, limit=limit, seed=self.recipe.seed)

    def open_data(self) -> None:
        """calib: what INT8 calibration, data-aware statistics and sensitivity sweeps see; holdout: what the
        result is judged on — `--eval-data`, else a held-apart split of the calibration data, never the
        samples the choices were made on. Without any data: synthetic inputs (judged as such)."""
        r = self.recipe
        self.explicit_random = isinstance(self.calibration_src, str) and \
            self.calibration_src.strip().lower() == "random"
        self.calib_all = self.open(self.calibration_src, r.calibration_samples) \
            if self.calibration_src is not None else None
        self.holdout = self.open(self.eval_src, r.eval_samples) if self.eval_src is not None else None
        self.calib = self.calib_all
        if self.holdout is None and self.calib_all is not None:
            self.calib, self.holdout = split_holdout(self.calib_all)
            if self.holdout is None:
                self.calib, self.holdout = self.calib_all, self.calib_all
                self.report.warnings.append(
                    f"only {len(self.calib_all)} calibration samples and no --eval-data: the result is judged on "
                    f"the calibration data itself (pass --eval-data or more --calibration-samples)")
        self.synthetic = self.holdout is None
        if self.synthetic:
            self.holdout = RandomDataset.for_model(self.model, self.shapes, n=16, seed=r.seed + 1)
        if self.calib is not None and getattr(self.calib, "kind", "") == "random" and not self.explicit_random:
            self.calib = None

    # ------------------------------------------------------------------------------------------ run
    def optimize(self, model) -> Result:
        r, report = self.recipe, self.report
        self.bytes_before = None
        if isinstance(model, (str, Path)):
            self.bytes_before = _file_bytes(model)
            model = load_model(model)
        if not isinstance(model, onnx.ModelProto):
            raise UserError("model must be a path or an onnx.ModelProto")
        self.model = original = model
        if r.method != "auto":   # the input held once: facts from a weightless copy, sessions from a file
            self.model = original = self.release_original(model)
        self.shapes = input_shapes(model, {k: tuple(v) for k, v in r.input_shape.items()})
        if not self.shapes:
            raise UserError("model has no inputs")
        if r.method != "none" and not any(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node):
            raise UserError("model has no Conv, Gemm or MatMul node to compress")
        q = has_quantized_ops(model)
        if q and r.quantize not in ("none", "auto"):
            raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing to re-quantize; "
                            f"use --quantize none to decompose its float layers only")
        if r.data_aware and r.method not in ("tucker2", "svd"):
            raise UserError(f"--data-aware works with --method tucker2 or svd (not {r.method})")
        self.open_data()       # the data sources the user named are opened (and checked) before any work
        if r.data_aware:
            self.data_aware_split(model)
        self.already_quantized = bool(q)
        quant = self.quantization_mode()
        pm = PassManager(self.shapes, verify=r.verify, progress=self.progress, seed=r.seed, keep_models=False)
        box = [model]
        del model
        clean = pm.run(box.pop(), [p() for p in registry.CLEANUP] if r.fold_bn else [],
                       input_file=getattr(self, "original_file", None))
        self.clean, self.clean_records, self.baseline = clean, list(pm.records), pm.baseline
        self.folded = next((res.info for _, res in pm.results if "fold_constants" in res.info), {})
        del pm
        if (self.folded.get("fold_constants") or {}).get("note"):
            report.warnings.append(self.folded["fold_constants_line"])
        layers = collect_layers(clean, self.shapes, lazy=True)
        if r.method == "auto":
            from .auto.driver import optimize_auto

            out, plan, built, extra = optimize_auto(self, original, clean, layers, quant)
        else:
            plan = self.plan(clean, layers)
            self.clean = None
            box = [clean]
            del clean
            detach_weights(layers)   # the plan is made: the clean model can go once its passes ran
            out, built = self.build(box.pop(), plan, quant)
            extra = {}
        report.passes = self.clean_records + (built.records if built is not None else [])
        self.assemble(original, out, plan, layers, built, extra)
        fid = self.judge(getattr(self, "original_file", None) or original, out, built)
        _gates(r, report, fid, self.floors)
        return Result(model=out, report=report)

    def release_original(self, model: onnx.ModelProto):
        """Explicit recipes hold the input model once: its facts come from a weightless copy (returned: what
        the data readers, the report and the checks read), its sessions (fidelity, latency) from a graph +
        page-aligned external-data file written here (ORT maps the weights); the ModelProto itself goes to the
        clean-up passes and is released with them."""
        import tempfile

        from .ir.modelio import weightless_copy, write_external

        if self.bytes_before is None:
            self.bytes_before = model_bytes(model)
        self._workdir = tempfile.TemporaryDirectory(prefix="onnxcompress-run-")
        self.original_file = str(write_external(model, Path(self._workdir.name) / "input.onnx"))
        return weightless_copy(model, keep_small=True)

    def quantization_mode(self) -> str:
        """int8 | fp16 | none for explicit recipes, and what `--quantize auto` may use ("auto" stays "auto"
        for the auto search; it needs calibration data)."""
        r = self.recipe
        if r.quantize == "int8" and self.calib is None:
            raise UserError("--quantize int8 needs calibration data: pass --calibration DIR|FILE (or "
                            "--calibration random to accept activation ranges from random inputs)")
        if r.quantize == "int4" and r.int4_activations == "int8" and self.calib is None:
            raise UserError("--quantize int4 --int4-activations int8 needs calibration data: pass --calibration "
                            "DIR|FILE (weight-only INT4, --int4-activations float, needs none)")
        if r.quantize != "auto":
            return r.quantize
        if self.already_quantized:
            return "none"
        if self.calib is None:
            self.report.warnings.append(
                "no calibration data: INT8 stays off and decompositions are judged on synthetic inputs only; "
                "--calibration DIR|FILE would unlock INT8 (the largest CPU speed-up) and accuracy-budgeted "
                "factorization")
            return "none"
        return "auto" if self.recipe.method == "auto" else "int8"

    def plan(self, model: onnx.ModelProto, layers) -> Plan:
        r = self.recipe
        planner = Planner(r, registry.cost_models())
        curves = None
        if r.allocation == "sensitivity" and r.rank is None and layers and r.method != "none":
            curves = self.sensitivity_curves(model, planner, layers)
        plan = planner.plan(layers if r.method != "none" or r.layers else [], curves)
        from .planning.latency_guard import guard_for_recipe

        guard = guard_for_recipe(r)
        if guard is not None and plan.planned():
            self.note(f"latency guard: timing {len(plan.planned())} planned layers on {guard.provider}")
            guard.apply(plan, layers, registry.cost_models(), self.progress)
            self.report.latency = {"guard": guard.summary()}
        return plan

    def sensitivity_curves(self, model, planner: Planner, layers) -> dict:
        """Curves from `--sensitivity FILE`, else measured now (one layer at a time, cached on disk) on the
        calibration data (else random inputs)."""
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
            src = self.calib if self.calib is not None else "random"
            self.note("sensitivity curves: one layer at a time on ORT CPU")
            analysis = analyze(model, src, grid=DEFAULT_GRID, samples=min(64, r.calibration_samples or 64),
                               preprocess=r.preprocess, labels=r.labels, input_shape=r.input_shape or None,
                               quantize=None, global_curve=False, progress=False, seed=r.seed, methods=wanted,
                               fold_bn=False, jobs=r.resolved_jobs(), executor=r.executor)
            st = analysis["stats"]
            self.report.warnings.append(
                f"sensitivity curves measured on the fly on {analysis['settings']['data']} "
                f"({analysis['settings']['samples']} samples; {st['evaluated']} variants evaluated, {st['cached']} "
                f"cached): pass --sensitivity FILE from `onnxcompress analyze` to choose the data")
        curves, _ = curves_from_analysis(analysis, r.quantize, r.sensitivity_metric, layers=facts)
        return curves

    # ------------------------------------------------------------------------------------------ build
    def build(self, clean: onnx.ModelProto, plan: Plan, quant: str, float_layers=(), verify: bool | None = None,
              int4_layers=(), int8_layers=None):
        """The model of a plan: the decomposition passes of every planned method, the data-aware pass
        (--data-aware), QAF, then the quantization (`float_layers` stay out of INT8; with quant "int8", `int4_layers` get INT4
        weights in the same model; with `int8_layers` only those layers — with their factor chains — are
        quantized and every other node stays float). Returns (model, PassManager)."""
        r = self.recipe
        pm = PassManager(self.shapes, verify=r.verify if verify is None else verify, progress=self.progress,
                         seed=r.seed, keep_models=r.min_speedup is not None or quant == "int4",
                         baseline=getattr(self, "baseline", None))
        passes = self.passes(plan, clean, quant, float_layers, int4_layers, int8_layers)
        # INT4's cost is measured against the model entering its pass: with no pass before it, that is `clean`
        self.int4_input = clean if quant == "int4" else None
        box = [clean]   # the passes' input is referenced by the manager only (the caller may still hold it)
        del clean
        out = pm.run(box.pop(), passes)
        return out, pm

    def passes(self, plan: Plan, model: onnx.ModelProto, quant: str, float_layers=(), int4_layers=(),
               int8_layers=None) -> list:
        r, report = self.recipe, self.report
        calib = self.calib
        feeds = feeds_factory(self.model, calib) if calib is not None else None   # reads the inputs only
        real = calib is not None and getattr(calib, "kind", "") != "random"
        if r.data_aware and not real:
            report.warnings.append("--data-aware statistics come from random inputs (not real data): the "
                                   "factorization is fitted to noise; pass --calibration DIR|FILE")
        wiring = Wiring(recipe=r, shapes=self.shapes, calibration=feeds, calibration_real=real,
                        quantized=quant, factor_cache=getattr(self, "factor_cache", None))
        out = [registry.METHODS[m].build(plan.policy(m), wiring) for m in registry.METHODS if m in plan.methods()]
        if r.data_aware and out:     # the factorization passes run plain; this pass revisits their chains
            out.append(self.data_aware_pass(model))
        for w in wiring.warnings:
            if w not in report.warnings:
                report.warnings.append(w)
        if out and r.qaf is not False:
            out += self.qaf_passes(model, quant, list(float_layers), list(int4_layers))
        if out and r.fuse:   # linear neighbours of the chains merged (lossless) before quantization; QAF's chains stay
            from .ir.names import exact_globs

            keep = [k for k, o in r.layers.items() if o.precision == "float"] + exact_globs(float_layers)
            out += [f(self.shapes, keep) for f in registry.FUSION]
        if quant == "int8" and int4_layers:
            out.append(self.int4_pass(self.model, list(float_layers), list(int4_layers)))
        elif quant == "int8":
            out.append(self.int8_pass(self.model, list(float_layers), int8_layers))
        elif quant == "int4":
            out.append(self.int4_pass(self.model, list(float_layers)))
        elif quant == "fp16":
            out.append(registry.quantizer("fp16"))
        return out

    def data_aware_split(self, model: onnx.ModelProto) -> None:
        """--data-aware's calibration split, checked before any work: 3 of every 4 calibration samples fit the
        statistics, the 4th (by sample index) judges every choice; batches of 16, or of the model's fixed batch."""
        from .data.datasets import InterleavedSplit
        from .ir.shapes import fixed_batch

        calib, k = self.calib, DATA_AWARE_HOLDOUT_EVERY
        if calib is None:
            raise UserError("--data-aware needs calibration data: pass --calibration DIR|FILE "
                            "(or --calibration random, which only makes sense for smoke tests)")
        fit = InterleavedSplit(calib, k, k - 1, complement=True, role="data-aware fit")
        held = InterleavedSplit(calib, k, k - 1, role="data-aware held-out")
        fixed = fixed_batch(model, next(iter(self.shapes)))
        bs = fixed or 16
        nf, nh = (len(fit) // bs, len(held) // bs) if fixed else (-(-len(fit) // bs), -(-len(held) // bs))
        if nf == 0 or nh == 0:
            raise UserError(f"--data-aware needs at least {k * bs if fixed else k} calibration samples (every "
                            f"{k}th is held out to accept or reject each layer's data-aware factors"
                            f"{f'; the model takes batches of {bs}' if fixed else ''}); got {len(calib)}")
        self.da_split = (fit, held, bs, nf, nh)
        self.data_aware_facts = {
            "method": self.recipe.data_aware_method, "refit": self.recipe.data_aware_refit,
            "calibration": {"kind": getattr(calib, "kind", "?"), "samples": len(calib), "fit_samples": len(fit),
                            "heldout_samples": len(held), "description": getattr(calib, "description", "")}}

    def data_aware_pass(self, model: onnx.ModelProto):
        """--data-aware: the pass that revisits the plain factor chains against `model` (what the first
        factorization pass receives: the clean-up passes' result), on the split of data_aware_split."""
        from .passes.data_aware import ALS_ITER, DataAwarePass

        r = self.recipe
        fit, held, bs, nf, nh = self.da_split
        return DataAwarePass(model, feeds_factory(model, fit, bs), feeds_factory(model, held, bs), nf, nh,
                             als_iter=ALS_ITER[r.data_aware_method],
                             inputs="compressed" if r.data_aware_refit else "original", seed=r.seed)

    def float_globs(self, float_layers: list[str]) -> list[str]:
        from .ir.names import exact_globs

        return [k for k, o in self.recipe.layers.items() if o.precision == "float"] + exact_globs(float_layers)

    def qaf_passes(self, model, quant: str, float_layers: list[str], int4_layers: list[str]) -> list:
        """QAF (passes/qaf.py) of every factorized chain that will be quantized, on the grid it is stored on,
        fitted to the kernels of `model` (what the decomposition passes started from; data-aware chains:
        to their own float composition). Mixed int8/int4 models get one QAF pass per grid."""
        from .ir.names import exact_globs
        from .passes.qaf import GRIDS, QAFPass

        if quant not in ("int8", "int4"):
            return []
        r = self.recipe
        # --qaf: every chain; default: the chains where round-to-nearest leaves enough weight error to gain
        kw = {"target": "chain" if r.data_aware else "auto", **({"min_headroom": 0.0} if r.qaf else {})}
        excl = self.float_globs(float_layers)
        if not r.data_aware:
            model = self.qaf_reference(model)
        # depthwise factors stay float under weight-only INT4 and int8 under INT4 with INT8 activations
        dw = GRIDS["int8"] if quant == "int8" or r.int4_activations == "int8" else None
        if quant == "int4":
            return [QAFPass(GRIDS["int4"], model, exclude_globs=excl, depthwise=dw, **kw)]
        i4 = exact_globs(int4_layers)
        out = [QAFPass(GRIDS["int8"], model, exclude_globs=excl + i4, **kw)]
        if i4:
            out.append(QAFPass(GRIDS["int4"], model, exclude_globs=excl, layers=i4, depthwise=dw, **kw))
        return out

    def qaf_reference(self, model):
        """QAF's reference kernels: `model` itself when small, else its Conv kernels on disk (passes/qaf.py
        KernelFiles), so that the model can go once its passes ran. The auto search builds every candidate from
        the same clean model, which it holds anyway: its kernels are written once."""
        from .ort.session import RELEASE_MIN_BYTES, model_nbytes
        from .passes.qaf import KernelFiles

        if model_nbytes(model) < RELEASE_MIN_BYTES:
            return model
        if self.recipe.method != "auto":
            return KernelFiles(model)
        cached = getattr(self, "_qaf_kernels", None)
        if cached is None or cached[0] is not model:
            self._qaf_kernels = cached = (model, KernelFiles(model))
        return cached[1]

    def int4_pass(self, model, float_layers: list[str], int4_layers: list[str] | None = None):
        """INT4 weights (passes/int4.py): weight-only (`--int4-activations float`, no calibration) or with the
        provider's INT8 activations (the INT8 pass's calibration reader and format); with `int4_layers`, only
        those layers get INT4 and the rest INT8 (a mixed model of the auto search)."""
        from .ir.names import exact_globs

        r = self.recipe
        kw = {"block_size": r.int4_block_size, "accuracy_level": r.int4_accuracy_level}
        if r.int4_activations == "float" and not int4_layers:
            return registry.quantizer("int4", activations="float", exclude_globs=self.float_globs(float_layers), **kw)
        q8 = self.int8_pass(model, float_layers)
        return registry.quantizer("int4", activations=q8.fmt.activations, reader_factory=q8.reader_factory,
                                  fmt=q8.fmt, exclude_globs=q8.exclude_globs, calibration_label=q8.calibration_label,
                                  int4_layers=exact_globs(int4_layers) if int4_layers else None, **kw)

    def int8_pass(self, model, float_layers: list[str], int8_layers=None):
        from .data import CalibrationReader
        from .ir.names import exact_globs
        from .ir.shapes import fixed_batch
        from .ort.quantize import int8_format_for

        r, calib = self.recipe, self.calib
        if calib.kind == "random":
            w = ("INT8 calibrated on random inputs (not real data): activation ranges may not match deployment; "
                 "pass --calibration DIR|FILE")
            if w not in self.report.warnings:
                self.report.warnings.append(w)
        self.report.calibration = {"source": str(getattr(calib, "source", "random")), "kind": calib.kind,
                                   "description": calib.description, "samples": len(calib)}
        names = list(self.shapes)
        dtypes = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
                  for vi in model.graph.input if vi.name in self.shapes}
        fixed = fixed_batch(model, names[0])
        reader = lambda: CalibrationReader(calib, names, batch_size=fixed or 8,   # noqa: E731
                                           fixed_batch=fixed is not None, input_dtypes=dtypes)
        fmt = int8_format_for(r.providers[0], r.int8_activations, r.int8_weights)
        excl = [k for k, o in r.layers.items() if o.precision == "float"] + exact_globs(float_layers)
        return registry.quantizer("int8", reader_factory=reader, fmt=fmt, exclude_globs=excl,
                                  calibration_label=calib.description,
                                  include_globs=None if int8_layers is None else exact_globs(int8_layers))

    # ------------------------------------------------------------------------------------------ judge
    def fidelity(self, original, out) -> Fidelity:
        from .ort.fidelity import fidelity_sequential

        ev = self.holdout
        return fidelity_sequential(original, out, lambda: inputs_for_model(self.model, ev, batch_size=16), "cpu",
                                   ev.description)

    def whole_latency(self, original, out) -> dict:
        """Median latency of the input and the result on the target provider, interleaved in one process."""
        from .ort.timing import compare_latency

        return compare_latency(original, out, self.recipe.providers[0], self.shapes, seed=self.recipe.seed)

    def judge(self, original, out, built) -> Fidelity:
        """Fidelity on the held-apart data, latency and size against the input, the floors (WARNING lines;
        --strict fails on them), the stage latencies of --min-speedup."""
        r, report = self.recipe, self.report
        self.note("fidelity on ORT CPU")
        fid = self.fidelity(original, out)
        report.fidelity = {**fid.to_dict(), "synthetic_inputs": self.synthetic}
        self.note(f"latency against the input on ORT {r.providers[0]}")
        lat = self.whole_latency(original, out)
        report.latency = {**(report.latency or {}), **lat}
        if "int4" in report.quantization and built is not None:
            self.int4_cost(built, out)
        if r.min_speedup is not None and built is not None:
            from .ort.timing import stage_latency

            self.note(f"latency of every stage on ORT {r.providers[0]} (interleaved)")
            stages = [("input", original)] + [(p.name, res.model) for p, res in built.results
                                              if res.modified and res.model is not None]
            report.latency.update(stage_latency(stages, r.providers[0], input_shape=self.shapes, seed=r.seed))
        degenerate = None
        if fid.output_std_after is not None:
            degenerate = degenerate_outputs(fid.output_std_before or 0.0, fid.output_std_after,
                                            fid.output_max_abs_after or 0.0)
        floors = floor_warnings(fid, lat, report.model.get("bytes_before"), report.model.get("bytes_after"),
                                degenerate)
        if self.synthetic:
            report.warnings.append("no data to judge the result on: fidelity is measured on synthetic random "
                                   "inputs only (pass --eval-data or --calibration)")
        report.warnings += floors
        self.floors = floors
        return fid

    def int4_cost(self, built, out) -> None:
        """What INT4 buys and costs, measured: the model entering the INT4 pass against its result (size and
        interleaved latency on the target provider), into the report's quantization section."""
        from .ir.counts import model_bytes

        before = None
        for i, (p, _) in enumerate(built.results):
            if p.name == "QuantizeInt4":
                before = built.results[i - 1][1].model if i else getattr(self, "int4_input", None)
        self.int4_input = None
        q = self.report.quantization["int4"]
        if before is None:
            q["measured"] = {"skipped": "the model entering the INT4 pass was not kept"}
            return
        self.note("INT4: size and latency against the model entering the INT4 pass")
        lat = self.whole_latency(before, out)
        b0, b1 = model_bytes(before), model_bytes(out)
        q["measured"] = {"bytes_before_int4": b0, "bytes_after_int4": b1, "size_ratio": round(b0 / max(b1, 1), 3),
                         "latency_ratio": lat.get("speedup"), "median_ms_before_int4": lat.get("median_ms_before"),
                         "median_ms_after_int4": lat.get("median_ms_after"), "provider": lat.get("provider")}

    # ------------------------------------------------------------------------------------------ report
    def assemble(self, original, out, plan: Plan, layers, built, extra: dict) -> None:
        r, report = self.recipe, self.report
        results = built.results if built is not None else []
        for p, res in results:
            report.quantization.update({k: v for k, v in res.info.items()
                                        if k in ("int8", "int4", "fp16", "quantized_ops", "float_ops_left")})
        int8_nodes = {n for p, res in results for n in (res.info.get("quantized_nodes") or [])}
        int4_nodes = {n for p, res in results for n in (res.info.get("int4_nodes") or [])}
        records = layer_records(plan, layers, [res for p, res in results if p.name in _DECOMPOSITION_PASSES],
                                int8_nodes, "fp16" if any(p.name == "ConvertFP16" for p, _ in results) else None,
                                int4_nodes)
        da = next((res.info["data_aware"] for p, res in results if "data_aware" in res.info), None)
        if da is not None:
            self.data_aware_outcomes(da, records)
        qaf = [res for p, res in results if p.name == "QAF"]
        if qaf:
            from .passes.qaf import merge_records

            merge_records(records, [rec for res in qaf for rec in res.layers])
            report.quantization["qaf"] = [res.info["qaf"] for res in qaf]
        report.layers = [rec.to_dict() for rec in records]
        if r.method != "none":
            report.layers += [LayerRecord(name=n, op=op, method=r.method,
                                          skipped=f"{where}: subgraphs and functions are left alone").to_dict()
                              for n, op, where in nested_compute_nodes(original)]
        done = [rec for rec in records if rec.skipped is None]
        m = report.model = {
            "params_before": model_params(original), "params_after": model_params(out),
            "macs_before": model_macs(original, self.shapes), "macs_after": model_macs(out, self.shapes),
            "bytes_before": self.bytes_before if self.bytes_before is not None else model_bytes(original),
            "bytes_after": model_bytes(out),
            "decomposed_layers": len(done),
            "decomposed_params_before": sum(x.params_before for x in done),
            "decomposed_params_after": sum(x.params_after for x in done),
            "input_shapes": {k: list(v) for k, v in self.shapes.items()},
        }
        if getattr(self, "folded", None):
            m["fold_constants"] = self.folded["fold_constants"]
        if plan.notes:
            m["allocation_notes"] = list(plan.notes)
        if plan.summary:
            m["plan"] = dict(plan.summary)
        if done:
            m["decomposed_ratio"] = m["decomposed_params_before"] / max(m["decomposed_params_after"], 1)
        if da is not None:
            m["data_aware"] = {**(self.data_aware_facts or {}), **da}
        unchanged = nothing_changed(report.passes, report.layers)
        if unchanged:
            report.warnings.append(unchanged)
        for k, v in extra.items():
            setattr(report, k, v)

    def data_aware_outcomes(self, da: dict, records: list[LayerRecord]) -> None:
        """Per layer, what the data-aware pass kept and why (LayerRecord.extra); one info line."""
        by = {o["name"]: o for o in da.get("layers", [])}
        for rec in records:
            o = by.get(rec.name)
            if o is not None and rec.skipped is None:
                rec.extra.update({k: o[k] for k in ("kept", "fell_back", "reason", "heldout_db_plain",
                                                     "heldout_db_kept")})
                if not o["fell_back"] and o.get("weight_rel_error") is not None:
                    rec.extra["weight_rel_error_plain"] = rec.weight_rel_error
                    rec.weight_rel_error = o["weight_rel_error"]
        if by:
            self.note(data_aware_line(da))


_DECOMPOSITION_PASSES = {"Tucker2", "CP4", "CP3", "SVD"}
#: --data-aware holds every k-th calibration sample out of the fit (it judges each layer's candidates)
DATA_AWARE_HOLDOUT_EVERY = 4


def layer_records(plan: Plan, layers, results, int8_nodes=frozenset(), whole_precision: str | None = None,
                  int4_nodes=frozenset()) -> list[LayerRecord]:
    """One record per layer of the plan: the pass's record where a pass rewrote it (with the plan's facts:
    planned ranks, alignment, latency-guard measurement, predicted degradation), else why it stayed (the
    pass's reason when the plan asked for a rewrite the pass refused, else the plan's); the precision it runs
    in."""
    from .ir.names import layer_of

    rewritten, refused = {}, {}
    for res in results:
        for rec in res.layers:
            if rec.skipped is None:
                rewritten[rec.name] = rec
            elif rec.name in plan.layers and plan.layers[rec.name].method == rec.method and \
                    plan.layers[rec.name].ranks is not None:
                refused[rec.name] = rec
    quantized_layers = {layer_of(n) for n in int8_nodes}
    int4_layers = {layer_of(n) for n in int4_nodes}
    out = []
    for info in layers:
        lp = plan.layers.get(info.name)
        rec = rewritten.get(info.name) or refused.get(info.name)
        if rec is None:
            rec = LayerRecord(name=info.name, op=getattr(info, "op", "Conv"),
                              method=(lp.method if lp is not None else None) or "-",
                              kernel_shape=_kernel_shape(info), params_before=info.params, params_after=info.params,
                              macs_before=info.macs, macs_after=info.macs,
                              skipped=(lp.reason if lp is not None else None) or "kept by the plan")
        rec.precision = whole_precision or ("int4" if info.name in int4_layers else
                                            "int8" if info.name in quantized_layers else "float")
        if lp is not None:
            if lp.planned is not None and rec.skipped is None and tuple(lp.planned) != tuple(rec.ranks or ()):
                rec.extra["planned_ranks"] = list(lp.planned)
            for k in ("latency_guard", "aligned_from", "measured_degradation", "option"):
                if k in lp.extra:
                    rec.extra[k] = lp.extra[k]
            if lp.predicted_degradation is not None:
                rec.predicted_degradation = lp.predicted_degradation
            g = lp.extra.get("latency_guard") or {}
            if lp.extra.get("saved_ms") is not None:
                rec.measured_latency_gain = lp.extra["saved_ms"]
            elif g.get("measured") and rec.skipped is None:
                rec.measured_latency_gain = round(g["conv_ms"] - g["chain_ms"], 4)
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
    from .ir.modelio import stored_bytes

    return stored_bytes(path) if Path(path).exists() else None


def _gates(recipe: Recipe, report: Report, fid: Fidelity, floors: list[str]) -> None:
    if recipe.method != "auto":
        if recipe.min_top1_agreement is not None:
            v = fid.top1_agreement
            report.gates.append(Gate("min_top1_agreement", recipe.min_top1_agreement, v,
                                     v is not None and v >= recipe.min_top1_agreement))
        if recipe.max_accuracy_drop is not None:
            v = None if fid.accuracy_drop is None else 100 * fid.accuracy_drop
            if v is None:
                report.warnings.append("--max-accuracy-drop needs labelled data; the gate fails without it")
            report.gates.append(Gate("max_accuracy_drop", recipe.max_accuracy_drop, v,
                                     v is not None and v <= recipe.max_accuracy_drop))
        if recipe.min_sqnr is not None:
            v = fid.sqnr_db
            report.gates.append(Gate("min_sqnr", recipe.min_sqnr, v, v is not None and v >= recipe.min_sqnr))
    if recipe.min_speedup is not None:
        v = (report.latency or {}).get("speedup")
        if v is None:
            report.warnings.append(f"--min-speedup: latency not measured "
                                   f"({(report.latency or {}).get('skipped', 'no timing')}); the gate fails")
        report.gates.append(Gate("min_speedup", recipe.min_speedup, v, v is not None and v >= recipe.min_speedup))
    if recipe.strict and floors:
        report.gates.append(Gate("strict", 0, len(floors), False))
    report.passed = all(g.passed for g in report.gates)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxcompress": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
