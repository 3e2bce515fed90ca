"""Command line: parses flags, calls the library, prints. No logic of its own."""
from __future__ import annotations

import argparse
import json
import logging
import os

import sys
import traceback

from .errors import OnnxCompressError, UserError, VerificationError

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxcompress", description="Compress CNNs on their ONNX graphs: Tucker2 / CP / SVD "
                "factorization, then INT8 / FP16 quantization, verified on ONNX Runtime.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    pi = sub.add_parser("inspect", help="list Conv/Gemm/MatMul layers, shapes, params, MACs, decomposability")
    pi.add_argument("model")
    pi.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(pi)

    po = sub.add_parser("optimize", help="decompose and quantize a model")
    po.add_argument("model")
    po.add_argument("-o", "--output", required=True, help="output .onnx path (never the input)")
    po.add_argument("--recipe", help="TOML recipe; flags given on the command line override it")
    po.add_argument("--method", help="tucker2|cp4|cp3|svd|none")
    po.add_argument("--ratio", type=_float, help="parameter ratio per layer (> 1), e.g. 2")
    po.add_argument("--target-macs", type=_float, help="fraction of MACs to keep, e.g. 0.5")
    po.add_argument("--rank", help="vbmf or vbmf:<weakening>")
    po.add_argument("--allocation", help="uniform|later-first|sensitivity")
    po.add_argument("--sensitivity", help="analyze.json from `onnxcompress analyze` (--allocation sensitivity; "
                    "default: measured on the calibration data)")
    po.add_argument("--sensitivity-metric", help="predicted degradation: auto|top1|noise|accuracy")
    po.add_argument("--data-aware", action="store_const", const=True, default=None,
                    help="fit the factorizations to the calibration data's input statistics (tucker2|svd)")
    po.add_argument("--data-aware-method", help="Σ-Tucker2 solver for k×k convs: als (default) | kron")
    po.add_argument("--no-refit", dest="data_aware_refit", action="store_const", const=False, default=None,
                    help="--data-aware: skip the least-squares refit of each chain's last factor")
    po.add_argument("--svd-gemm", dest="svd_gemm", action="store_const", const=True, default=None,
                    help="--method tucker2: also SVD Gemm/MatMul weights (1x1 convs always get SVD)")
    po.add_argument("--svd-skip-last", dest="svd_skip_last", action="store_const", const=True, default=None)
    po.add_argument("--no-svd-skip-last", dest="svd_skip_last", action="store_const", const=False,
                    help="also SVD the graph's last Gemm/MatMul (the classifier; left alone by default)")
    po.add_argument("--quantize", help="int8|fp16|none")
    po.add_argument("--int8-activations", help="override the provider's INT8 activation type: uint8|int8")
    po.add_argument("--int8-weights", help="override the INT8 weight type: int8|uint8")
    po.add_argument("--calibration", help="DIR | FILE.npy | FILE.npz | random")
    po.add_argument("--calibration-samples", type=int)
    po.add_argument("--preprocess", help="image preset: imagenet|cifar10|digits")
    po.add_argument("--eval-data", help="data for the fidelity check (default: the calibration data)")
    po.add_argument("--eval-samples", type=int)
    po.add_argument("--labels", help="labels file for image folders")
    po.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    po.add_argument("--skip-first", dest="skip_first", action="store_const", const=True, default=None)
    po.add_argument("--no-skip-first", dest="skip_first", action="store_const", const=False)
    po.add_argument("--include", action="append", help="layer name glob to decompose (repeatable)")
    po.add_argument("--exclude", action="append", help="layer name glob to leave alone (repeatable)")
    po.add_argument("--no-verify", dest="verify", action="store_const", const=False, default=None)
    po.add_argument("--report", help="write the JSON report here")
    po.add_argument("--plots", help="write plots (PNG) into this folder")
    po.add_argument("--providers", help="target providers, e.g. cpu or cpu,cuda (the first sets the INT8 format)")
    po.add_argument("--min-top1-agreement", type=_float)
    po.add_argument("--max-accuracy-drop", type=_float)
    po.add_argument("--min-speedup", type=_float)
    po.add_argument("--latency-guard", dest="latency_guard", action="store_const", const=True, default=None)
    po.add_argument("--no-latency-guard", dest="latency_guard", action="store_const", const=False)
    po.add_argument("--rank-multiple", type=int, help="round ranks to a multiple of N (default 8 for cpu; 1 = off)")
    po.add_argument("--seed", type=int)
    po.add_argument("--cp-epc", dest="cp_epc", action="store_const", const=True, default=None,
                    help="CP: error-preserving correction (default: on when quantizing to INT8)")
    po.add_argument("--no-cp-epc", dest="cp_epc", action="store_const", const=False)
    po.add_argument("--cp-balance", help="CP: spread λ over the factors: sqrt_size (default) | equal | none")
    po.add_argument("--cp-equalize", help="CP chain equalisation: none | data-free | data "
                                          "(default: data with calibration data, else data-free)")
    po.add_argument("--cp-fallback", help="CP layers with κ > --cp-kappa-max under INT8: "
                                          "keep-float (default) | int16 | tucker2 | none")
    po.add_argument("--cp-kappa-max", type=_float, help="CP cancellation index threshold (default 2.5)")
    po.add_argument("--max-memory-mb", type=int, help="refuse a layer decomposition needing more memory (default 4096)")
    _common(po)

    from .cli_eval import add_parsers  # validate, bench
    add_parsers(sub, _common, _float)
    from .cli_zoo import add_parser as add_zoo  # zoo list / zoo export
    add_zoo(sub, _common)
    from .cli_analyze import add_parser as add_analyze  # analyze
    add_analyze(sub, _common)
    return p


def _common(sp):
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    sp.add_argument("--debug", action="store_true", help="show tracebacks")


def _progress(args):
    if args.quiet or not sys.stderr.isatty():
        return None

    def show(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)
    return show


def cmd_inspect(args) -> int:
    from .inspect import inspect_model, render_inspect
    from .modelio import load_model
    from .recipe import parse_input_shapes

    model = load_model(args.model)
    shapes = {k: tuple(v) for k, v in parse_input_shapes(args.input_shape).items()}
    facts = inspect_model(model, shapes)
    print(json.dumps(facts, indent=2) if args.json else render_inspect(facts))
    return EXIT_OK


_RECIPE_FLAGS = ("method", "ratio", "target_macs", "rank", "allocation", "data_aware", "quantize",
                 "int8_activations", "int8_weights", "calibration", "calibration_samples", "preprocess",
                 "eval_data", "eval_samples", "labels", "skip_first", "include", "exclude", "verify", "report",
                 "plots", "max_memory_mb", "min_top1_agreement", "max_accuracy_drop", "min_speedup", "latency_guard", "rank_multiple", "seed",
                 "sensitivity", "sensitivity_metric",
                 "cp_epc", "cp_balance", "cp_equalize", "cp_fallback", "cp_kappa_max",
                 "data_aware_method", "data_aware_refit", "svd_gemm", "svd_skip_last")


def cmd_optimize(args) -> int:
    from .modelio import check_output_path, save_model_atomic, uses_external_data, write_text_atomic
    from .pipeline import optimize
    from .recipe import Recipe, parse_input_shapes

    flags = {k: getattr(args, k) for k in _RECIPE_FLAGS if getattr(args, k) is not None}
    if args.input_shape:
        flags["input_shape"] = parse_input_shapes(args.input_shape)
    if args.providers:
        flags["providers"] = [p.strip() for p in args.providers.split(",") if p.strip()]
    recipe = Recipe.from_toml(args.recipe, **flags) if args.recipe else Recipe.from_dict(flags, "flags")
    out = check_output_path(args.output, [args.model])
    if recipe.report:
        check_output_path(recipe.report, [args.model, args.output])
    if recipe.plots and os.path.exists(recipe.plots) and not os.path.isdir(recipe.plots):
        raise UserError(f"--plots {recipe.plots} is not a folder")
    if recipe.plots:
        from .plots import require
        require()  # matplotlib missing: fail before any work, not after the model is written
    result = optimize(args.model, recipe, progress=_progress(args))
    save_model_atomic(result.model, out, external=uses_external_data(args.model))
    if recipe.report:
        write_text_atomic(result.report.to_json() + "\n", recipe.report)
    if recipe.plots:
        from .plots import optimize_plots
        optimize_plots(result.report, recipe.plots)
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {out}" + (f" and {recipe.report}" if recipe.report else ""))
    if not result.passed:
        failed = [g.name for g in result.report.gates if not g.passed]
        print(f"onnxcompress: gate failed: {', '.join(failed)} (model and report written, marked failing)",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _quiet_onnxruntime(debug: bool) -> None:
    """ORT's C++ logger writes straight to stderr; our errors are one line, so keep it to fatal only."""
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(2 if debug else 4)
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_onnxruntime(debug)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.version:
            from . import __version__
            print(__version__)
            return EXIT_OK
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        from .cli_eval import cmd_bench, cmd_validate
        from .cli_analyze import cmd_analyze
        from .cli_zoo import cmd_zoo
        return {"zoo": cmd_zoo, "inspect": cmd_inspect, "optimize": cmd_optimize, "validate": cmd_validate,
                "bench": cmd_bench, "analyze": cmd_analyze}[args.command](args)
    except KeyboardInterrupt:
        print("onnxcompress: interrupted (no output written)", file=sys.stderr)
        return 130
    except (UserError, VerificationError, OnnxCompressError) as e:
        if debug:
            traceback.print_exc()
        print(f"onnxcompress: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("onnxcompress: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit:
        raise
    except Exception as e:  # unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"onnxcompress: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
