"""`onnxcompress bench MODEL [MODEL ...]`: latency side by side, per provider."""
from __future__ import annotations

import json

from ..errors import UserError
from .common import EXIT_OK, Formatter, add_common, add_input_shape, add_providers, check_files, providers


def add_parser(sub) -> None:
    pb = sub.add_parser("bench", help="latency of models side by side (interleaved runs, one process)",
                        formatter_class=Formatter)
    pb.add_argument("models", nargs="+", metavar="MODEL", help="models to time (the first is the baseline)")
    add_providers(pb)
    pb.add_argument("--allow-unavailable-providers", action="store_true",
                    help="list a requested provider that cannot run here as skipped instead of failing (exit 2)")
    pb.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0 = ORT's default)")
    pb.add_argument("--warmup", type=int, default=5, help="untimed runs per model first")
    pb.add_argument("--runs", type=int, default=20, help="timed runs per model, interleaved")
    add_input_shape(pb)
    pb.add_argument("--json", metavar="FILE", help="write the JSON result here")
    pb.add_argument("--plots", metavar="DIR", help="write bench_latency.png into this folder")
    add_common(pb)


def run(args) -> int:
    from ..ir.modelio import check_output_path, load_model, write_text_atomic
    from ..ort.timing import bench
    from ..recipe import parse_input_shapes

    from ..ort.providers import require_available, require_ran

    provs = providers(args.providers)
    require_available(provs, args.allow_unavailable_providers)
    check_files(args.models)
    if args.threads < 0 or args.warmup < 0 or args.runs < 1:
        raise UserError("--threads and --warmup must be >= 0, --runs >= 1")
    if args.json:
        check_output_path(args.json, args.models)
    for p in args.models:          # one-line errors for files that are not ONNX models, before any timing
        load_model(p)
    rep = bench(args.models, provs, threads=args.threads or None, warmup=args.warmup, runs=args.runs,
                input_shape=parse_input_shapes(args.input_shape))
    require_ran([(p.provider, p.skipped) for p in rep.providers if p.skipped], args.allow_unavailable_providers)
    if args.json:
        write_text_atomic(json.dumps(rep.to_dict(), indent=2) + "\n", args.json)
    if args.plots:
        from pathlib import Path

        from ..report.plots import bench_plot

        bench_plot(rep, Path(args.plots) / "bench_latency.png")
    if not args.quiet:
        print(rep.table())
    return EXIT_OK
