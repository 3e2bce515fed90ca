"""The `analyze` subcommand: flags → onnxcompress.analyze → files + a summary. Registered by cli.py."""
from __future__ import annotations

import sys

from ..errors import UserError
from .common import EXIT_INTERRUPTED, EXIT_OK, Formatter, add_common, add_data, add_input_shape


def add_parser(sub) -> None:
    pa = sub.add_parser("analyze", help="per-layer sensitivity: one layer decomposed (or INT8) at a time, "
                        "plus the global curve and an additivity check", formatter_class=Formatter)
    pa.add_argument("model", help="the ONNX model")
    add_data(pa, required=True)
    add_input_shape(pa)
    pa.add_argument("--method", default="tucker2", help="tucker2 | cp4 | cp3 | svd: the method swept on every "
                    "layer it can take")
    pa.add_argument("--grid", default="1.5,2,3,4,6,8", help="per-layer parameter ratios, e.g. 1.5,2,3,4,6,8")
    pa.add_argument("--out", required=True, help="output folder: analyze.json, analyze.csv, PNG plots, cache/")
    pa.add_argument("--samples", type=int, default=64, help="evaluate on the first N samples (default 64)")
    pa.add_argument("--quantize", default="none", help="int8: also INT8-only and TD+INT8 per layer (default none)")
    pa.add_argument("--calibration", help="INT8 calibration data (default: the analyzed data)")
    pa.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (default 1)")
    pa.add_argument("--executor", default="local", help="local (process pool) | ray (optional dependency)")
    pa.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per worker (default 1)")
    pa.add_argument("--cache-dir", help="results cache (default OUT/cache); reruns only evaluate what it lacks")
    pa.add_argument("--layers", action="append", metavar="GLOB",
                    help="restrict the per-layer sweep to layers matching this name glob (repeatable)")
    pa.add_argument("--no-global", dest="global_curve", action="store_false", help="skip the global curve")
    pa.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    pa.add_argument("--seed", type=int, default=0, help="seed for data sampling")
    add_common(pa)


def _grid(spec: str) -> list[float]:
    try:
        g = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"invalid --grid {spec!r}: use numbers like 1.5,2,3,4") from None
    if not g:
        raise UserError("--grid is empty")
    return g


def run(args) -> int:
    import json
    from pathlib import Path

    from ..analysis import outputs
    from ..analysis.executors import ray_available
    from ..analysis.sweep import analyze
    from ..ir.modelio import write_text_atomic
    from ..recipe import parse_input_shapes

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if Path(args.model).resolve() == out.resolve():
        raise UserError("--out must be a folder, not the model")
    if args.plots:
        from ..report.plots import require
        require()
    if args.executor == "ray" and ray_available():
        raise UserError(ray_available())
    shapes = parse_input_shapes(args.input_shape) if args.input_shape else None
    cache = args.cache_dir or out / "cache"
    try:
        res = analyze(args.model, args.data, grid=_grid(args.grid), method=args.method, samples=args.samples,
                         labels=args.labels, preprocess=args.preprocess, input_shape=shapes,
                         quantize=args.quantize, calibration=args.calibration, jobs=args.jobs,
                         executor=args.executor, out_dir=None, cache_dir=cache, threads=args.threads,
                         seed=args.seed, layers=args.layers, global_curve=args.global_curve,
                         progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"onnxcompress: analyze interrupted; finished measurements are kept in {cache}: rerun the same "
              f"command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(res, indent=1) + "\n", out / "analyze.json")
    write_text_atomic(outputs.to_csv(res), out / "analyze.csv")
    pngs = outputs.analyze_plots(res, out) if args.plots else []
    if not args.quiet:
        print(outputs.render_summary(res))
        print(f"wrote {out / 'analyze.json'}, {out / 'analyze.csv'}" + (f" and {len(pngs)} plots" if pngs else ""))
    return EXIT_OK


