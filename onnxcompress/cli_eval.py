"""The `validate` and `bench` subcommands: flags → onnxcompress.validate / onnxcompress.bench → print.
Registered by cli.py; like it, no logic of its own."""
from __future__ import annotations

import json

from .errors import UserError

EXIT_OK = 0


def add_parsers(sub, common, number) -> None:
    pv = sub.add_parser("validate", help="compare an optimized model with its original on data, per provider")
    pv.add_argument("original")
    pv.add_argument("optimized")
    pv.add_argument("--data", required=True, help="DIR (image folder, class sub-folders) | FILE.npy | "
                    "FILE.npz | cifar-10-batches-py | random")
    pv.add_argument("--labels", help="labels file (image folders, .npy)")
    pv.add_argument("--preprocess", help="image preset: imagenet|cifar10|digits")
    pv.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    pv.add_argument("--providers", default="cpu", help="e.g. cpu or cpu,cuda (default cpu)")
    pv.add_argument("--samples", type=int, help="at most this many samples")
    pv.add_argument("--json", help="write the JSON result here")
    pv.add_argument("--plots", help="write agreement_vs_compression.png into this folder")
    common(pv)

    pb = sub.add_parser("bench", help="latency of models side by side (interleaved runs, one process)")
    pb.add_argument("models", nargs="+")
    pb.add_argument("--providers", default="cpu", help="e.g. cpu or cpu,cuda (default cpu)")
    pb.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0 = ORT default; default 1)")
    pb.add_argument("--warmup", type=int, default=5)
    pb.add_argument("--runs", type=int, default=20)
    pb.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    pb.add_argument("--json", help="write the JSON result here")
    pb.add_argument("--plots", help="write bench_latency.png into this folder")
    common(pb)


def _providers(spec: str) -> list[str]:
    from .evaluate import PROVIDERS

    provs = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not provs:
        raise UserError("--providers is empty")
    bad = [p for p in provs if p not in PROVIDERS]
    if bad:
        raise UserError(f"unknown provider {bad[0]!r} (choose from {', '.join(PROVIDERS)})")
    return list(dict.fromkeys(provs))


def _check_inputs(paths) -> None:
    from pathlib import Path

    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"no such file: {p}")


def cmd_validate(args) -> int:
    from .modelio import check_output_path, write_text_atomic
    from .recipe import parse_input_shapes
    from .validate import validate

    provs = _providers(args.providers)
    _check_inputs([args.original, args.optimized])
    if args.samples is not None and args.samples < 1:
        raise UserError("--samples must be >= 1")
    if args.json:
        check_output_path(args.json, [args.original, args.optimized])
    rep = validate(args.original, args.optimized, args.data, provs, labels=args.labels,
                   preprocess=args.preprocess, input_shape=parse_input_shapes(args.input_shape),
                   samples=args.samples)
    if args.json:
        write_text_atomic(json.dumps(rep.to_dict(), indent=2) + "\n", args.json)
    if args.plots:
        from .graph import model_params
        from .modelio import load_model
        from .plots import validate_plots

        pa = model_params(load_model(args.optimized))
        validate_plots(rep, args.plots, model_params(load_model(args.original)) / pa if pa else None)
    if not args.quiet:
        print(rep.table())
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import bench
    from .modelio import check_output_path, write_text_atomic
    from .recipe import parse_input_shapes

    provs = _providers(args.providers)
    _check_inputs(args.models)
    if args.threads < 0 or args.warmup < 0 or args.runs < 1:
        raise UserError("--threads and --warmup must be >= 0, --runs >= 1")
    if args.json:
        check_output_path(args.json, args.models)
    _loadable(args.models)
    rep = bench(args.models, provs, threads=args.threads or None, warmup=args.warmup, runs=args.runs,
                input_shape=parse_input_shapes(args.input_shape))
    if args.json:
        write_text_atomic(json.dumps(rep.to_dict(), indent=2) + "\n", args.json)
    if args.plots:
        from pathlib import Path

        from .plots import bench_plot

        bench_plot(rep, Path(args.plots) / "bench_latency.png")
    if not args.quiet:
        print(rep.table())
    return EXIT_OK


def _loadable(paths) -> None:
    """One-line errors for files that are not ONNX models (before any timing)."""
    from .modelio import load_model

    for p in paths:
        load_model(p)
