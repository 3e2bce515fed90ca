"""`onnxcompress optimize MODEL [-o OUT]`: every flag is one Recipe field, declared once in OPTIONS (with its help
and its group); the defaults shown in --help are the Recipe's."""
from __future__ import annotations

import dataclasses
import os
import sys

from ..errors import UserError
from .common import EXIT_GATE, EXIT_OK, Formatter, add_common, add_input_shape, number, progress_printer

# (group, flags, Recipe field, kind, help). kind: "str" | "float" | "int" | "list" (repeatable) | "flag" (store
# True) | ("no", positive flag) for a --no-X that stores False into the same field
OPTIONS = [
    ("what to do", ["--method"], "method", "str", "auto (the best model within the budget: per layer keep / "
     "tucker2 / cp4 / cp3 / svd, measured) | tucker2 | cp4 | cp3 | svd | none"),
    ("what to do", ["--quantize"], "quantize", "str", "auto (INT8 per node where the budget allows; needs "
     "calibration data) | int8 | int4 (a size format: smaller, not faster on CPU) | fp16 | none"),
    ("what to do", ["--objective"], "objective", "str", "what --method auto maximises under the budget: latency | "
     "size (size also tries INT4 per layer)"),
    ("what to do", ["--recipe"], None, "str", "TOML recipe (every flag is a field; flags on the command line win)"),
    ("ranks", ["--ratio"], "ratio", "float", "parameter ratio per layer (> 1), e.g. 2 (default 2 when no --rank or "
     "--target-macs is given)"),
    ("ranks", ["--target-macs"], "target_macs", "float", "fraction of the MACs to keep, e.g. 0.5"),
    ("ranks", ["--rank"], "rank", "str", "vbmf or vbmf:<weakening in [0,1]>: EVBMF ranks (capped by --ratio)"),
    ("ranks", ["--rank-multiple"], "rank_multiple", "int", "align ranks to a multiple of N (default for the cpu "
     "provider: 16, else 8 where no multiple of 16 fits the layer; other providers 1; 1 = off)"),
    ("ranks", ["--allocation"], "allocation", "str", "uniform | later-first | sensitivity: how the ratio is "
     "spread over the layers"),
    ("ranks", ["--sensitivity"], "sensitivity", "str", "analyze.json from `onnxcompress analyze` for "
     "--allocation sensitivity (default: measured on the calibration data)"),
    ("ranks", ["--sensitivity-metric"], "sensitivity_metric", "str", "predicted degradation: auto | top1 | noise "
     "| accuracy"),
    ("layers", ["--include"], "include", "list", "layer name glob to decompose (repeatable; default: all)"),
    ("layers", ["--exclude"], "exclude", "list", "layer name glob to leave alone (repeatable)"),
    ("layers", ["--skip-first"], "skip_first", "flag", "leave the first conv alone"),
    ("layers", ["--no-skip-first"], "skip_first", ("no", "--skip-first"), "also decompose the first conv"),
    ("layers", ["--svd-gemm"], "svd_gemm", "flag", "with --method tucker2|cp4|cp3: also SVD Gemm/MatMul weights "
     "(1x1 convs always get SVD)"),
    ("layers", ["--svd-skip-last"], "svd_skip_last", "flag", "leave the graph's last Gemm/MatMul (a classifier) "
     "alone"),
    ("layers", ["--no-svd-skip-last"], "svd_skip_last", ("no", "--svd-skip-last"), "also SVD the last Gemm/MatMul"),
    ("data-aware", ["--data-aware"], "data_aware", "flag", "(tucker2 | svd) after plain factorization, revisit "
     "the layers in order and refit each one's factors and bias to the original model's outputs from its inputs "
     "in the model compressed so far (damped; 3 of every 4 calibration samples); a layer keeps them only if they "
     "lower its error on the 4th, the model only if its held-out output error is not worse than all-plain"),
    ("data-aware", ["--data-aware-method"], "data_aware_method", "str", "--data-aware Σ-Tucker2 of k×k convs: kron "
     "(Kronecker-whitened init + closed-form last factor and core) | als (+ 2 ALS sweeps: slower; measured ≤ 0.07 dB per layer)"),
    ("data-aware", ["--no-refit"], "data_aware_refit", ("no", None), "--data-aware: fit each layer on its inputs "
     "in the original model instead of the compressed one (no compensation of upstream errors: weaker on whole "
     "networks, one capture per group of layers); the held-out choices stay"),
    ("CP", ["--cp-epc"], "cp_epc", "flag", "error-preserving correction (default: on when quantizing to INT8)"),
    ("CP", ["--no-cp-epc"], "cp_epc", ("no", "--cp-epc"), "no error-preserving correction"),
    ("CP", ["--cp-balance"], "cp_balance", "str", "spread λ over the factors: sqrt_size | equal | none"),
    ("CP", ["--cp-equalize"], "cp_equalize", "str", "chain equalisation: none | data-free | data (default: data "
     "with calibration data, else data-free)"),
    ("CP", ["--cp-fallback"], "cp_fallback", "str", "CP layers with κ > --cp-kappa-max under INT8: keep-float | "
     "int16 | tucker2 | none"),
    ("CP", ["--cp-kappa-max"], "cp_kappa_max", "float", "CP cancellation index threshold"),
    ("quantization", ["--int8-activations"], "int8_activations", "str", "override the provider's INT8 "
     "activation type: uint8 | int8 (default: uint8 on cpu, int8 on cuda/tensorrt)"),
    ("quantization", ["--int8-weights"], "int8_weights", "str", "override the INT8 weight type: int8 | uint8 "
     "(default: int8)"),
    ("quantization", ["--qaf"], "qaf", "flag", "quantization-aware factorization: fit every factorized chain on the "
     "INT8/INT4 grid it is stored on (default: on for the quantized chains where round-to-nearest leaves >= 1%% "
     "of weight error to gain; --qaf fits every one)"),
    ("quantization", ["--no-qaf"], "qaf", ("no", "--qaf"), "no QAF: the chains' weights are rounded to nearest"),
    ("quantization", ["--no-fuse"], "fuse", ("no", None), "keep the factor chains as written: no merging of "
     "their linear neighbours (1x1 into 1x1, parallel 1x1 + Add, per-channel Mul/Add) before quantization"),
    ("quantization", ["--int4-activations"], "int4_activations", "str", "--quantize int4: float (weight-only, no "
     "calibration needed) | int8 (int4 weights with the provider's INT8 activations; needs calibration data)"),
    ("quantization", ["--int4-block-size"], "int4_block_size", "int", "MatMulNBits block size for int4 "
     "MatMul/Gemm weights (power of two >= 16)"),
    ("quantization", ["--int4-accuracy-level"], "int4_accuracy_level", "int", "MatMulNBits accuracy_level (4: "
     "int8 activations inside the kernel, faster on CPU)"),
    ("data", ["--calibration"], "calibration", "str", "calibration data: DIR | FILE.npy | FILE.npz | random "
     "(default: none — INT8 off, the result judged on synthetic inputs only)"),
    ("data", ["--calibration-samples"], "calibration_samples", "int", "calibration samples"),
    ("data", ["--preprocess"], "preprocess", "str", "image preset: imagenet | cifar10 | digits (default: derived "
     "from the model's input shape)"),
    ("data", ["--eval-data"], "eval_data", "str", "data the result is judged on (default: a held-apart quarter of the calibration data)"),
    ("data", ["--eval-samples"], "eval_samples", "int", "evaluation samples"),
    ("data", ["--labels"], "labels", "str", "labels file for image folders or .npy data"),
    ("budget and gates", ["--max-accuracy-drop"], "max_accuracy_drop", "float", "accuracy budget in points, with "
     "labelled data (auto default 1.0; with an explicit --method a gate: exit 1 above it)"),
    ("budget and gates", ["--min-top1-agreement"], "min_top1_agreement", "float", "top-1 agreement budget for "
     "classifier outputs (auto default 0.99; explicit --method: a gate)"),
    ("budget and gates", ["--min-sqnr"], "min_sqnr", "float", "output SQNR budget in dB for other outputs (auto "
     "default 30; explicit --method: a gate)"),
    ("budget and gates", ["--allow-worse"], "allow_worse", "flag", "auto: write the best candidate even when none "
     "meets the budget or all are slower/larger than the input (default: write the lossless clean-up)"),
    ("budget and gates", ["--strict"], "strict", "flag", "exit 1 when the result is measured below a floor "
     "(agreement < 90%, SQNR < 10 dB, degenerate outputs) or slower or larger than the input"),
    ("budget and gates", ["--min-speedup"], "min_speedup", "float", "fail (exit 1) below this measured speedup (times every "
     "stage on the first provider)"),
    ("target", ["--providers"], "providers", "providers", "target providers, e.g. cpu or cpu,cuda (the first sets "
     "the INT8 format and the latency guard)"),
    ("target", ["--allow-unavailable-providers"], "allow_unavailable_providers", "flag", "prepare the model for "
     "a provider that cannot run here (nothing is run or timed on it; the report warns) instead of exit 2"),
    ("target", ["--latency-guard"], "latency_guard", "flag", "time each planned chain against its layer and keep "
     "the layer where the chain is not faster (default: on for the cpu provider)"),
    ("target", ["--no-latency-guard"], "latency_guard", ("no", "--latency-guard"), "no latency guard"),
    ("run", ["--report"], "report", "str", "write the JSON report here"),
    ("run", ["--plots"], "plots", "str", "write PNG plots into this folder"),
    ("run", ["--no-verify"], "verify", ("no", None), "skip the checker/ORT verification after each pass (faster; "
     "not recommended)"),
    ("run", ["--max-memory-mb"], "max_memory_mb", "int", "refuse a layer decomposition needing more memory"),
    ("run", ["--seed"], "seed", "int", "seed for random data, sampling and factorization initialisation"),
    ("run", ["--jobs"], "jobs", "int", "worker processes for the sensitivity measurements (default: the cores "
     "available, at most 4)"),
    ("run", ["--executor"], "executor", "str", "where sensitivity measurements run: local | ray"),
]


def add_parser(sub) -> None:
    from ..recipe import Recipe

    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    defaults["providers"] = "cpu"
    po = sub.add_parser("optimize", help="decompose and quantize a model", formatter_class=Formatter,
                        description="Compress MODEL: factorize its layers, quantize, verify every rewrite; writes "
                                    "<stem>.opt.onnx beside it unless -o is given.")
    po.add_argument("model", help="the ONNX model to compress (never modified)")
    po.add_argument("-o", "--output", help="output .onnx path (default: <stem>.opt.onnx beside MODEL; never the "
                                           "input)")
    add_input_shape(po)
    groups = {}
    for group, flags, field, kind, hlp in OPTIONS:
        g = groups.get(group) or groups.setdefault(group, po.add_argument_group(group))
        hlp = hlp.replace("%", "%%")
        dest = field or flags[0].lstrip("-").replace("-", "_")
        shown = defaults.get(field) if field else None
        kw = {"dest": dest, "help": hlp + (f" (default: {shown})" if shown not in (None, [], {}) and
                                            isinstance(kind, str) and kind not in ("flag",) else "")}
        if kind == "flag":
            g.add_argument(*flags, action="store_const", const=True, default=None,
                           **{**kw, "help": hlp + (" (default)" if defaults.get(field) is True else "")})
        elif isinstance(kind, tuple):
            g.add_argument(*flags, action="store_const", const=False, default=None,
                           **{**kw, "help": hlp + (" (default)" if defaults.get(field) is False else "")})
        elif kind == "list":
            g.add_argument(*flags, action="append", **{**kw, "help": hlp})
        else:
            g.add_argument(*flags, type={"float": number, "int": int}.get(kind, str), **kw)
    add_common(po)


def recipe_flags(args) -> dict:
    """The Recipe fields given on the command line."""
    from ..recipe import parse_input_shapes

    flags = {}
    for _, _, field, _, _ in OPTIONS:
        if field is not None and getattr(args, field, None) is not None:
            flags[field] = getattr(args, field)
    if isinstance(flags.get("providers"), str):
        flags["providers"] = [p.strip() for p in flags["providers"].split(",") if p.strip()]
    if args.input_shape:
        flags["input_shape"] = parse_input_shapes(args.input_shape)
    return flags


def default_output(model: str) -> str:
    from pathlib import Path

    p = Path(model)
    stem = p.name[:-5] if p.name.lower().endswith(".onnx") else p.name
    return str(p.with_name(stem + ".opt.onnx"))


def run(args) -> int:
    from ..ir.modelio import check_output_path, save_model_atomic, uses_external_data, write_text_atomic
    from ..pipeline import optimize
    from ..recipe import Recipe

    flags = recipe_flags(args)
    recipe = Recipe.from_toml(args.recipe, **flags) if args.recipe else Recipe.from_dict(flags, "flags")
    out = check_output_path(args.output or default_output(args.model), [args.model])
    if recipe.report:
        check_output_path(recipe.report, [args.model, str(out)])
    if recipe.plots and os.path.exists(recipe.plots) and not os.path.isdir(recipe.plots):
        raise UserError(f"--plots {recipe.plots} is not a folder")
    if recipe.plots:
        from ..report.plots import require
        require()  # matplotlib missing: fail before any work, not after the model is written
    result = optimize(args.model, recipe, progress=progress_printer(args))
    save_model_atomic(result.model, out, external=uses_external_data(args.model))
    written = [str(out)]
    if recipe.report:
        write_text_atomic(result.report.to_json() + "\n", recipe.report)
        written.append(recipe.report)
    if recipe.plots:
        from ..report.plots import optimize_plots
        written += [str(p) for p in optimize_plots(result.report, recipe.plots)]
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {', '.join(written)}")
    for w in result.report.warnings:      # a result below a floor is never silent, --quiet or not
        if w.startswith("WARNING"):
            print(f"onnxcompress: {w}", file=sys.stderr)
    if not result.passed:
        failed = [g.name for g in result.report.gates if not g.passed]
        print(f"onnxcompress: gate failed: {', '.join(failed)} ({' and '.join(written[:2])} written, report marked "
              f"failing)" if recipe.report else f"onnxcompress: gate failed: {', '.join(failed)} (model written)",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


