"""`onnxcompress validate ORIGINAL OPTIMIZED --data DATA`: fidelity per provider."""
from __future__ import annotations

import json

from ..errors import UserError
from .common import EXIT_OK, Formatter, add_common, add_data, add_input_shape, add_providers, check_files, providers


def add_parser(sub) -> None:
    pv = sub.add_parser("validate", help="compare an optimized model with its original on data, per provider",
                        formatter_class=Formatter)
    pv.add_argument("original", help="the original model")
    pv.add_argument("optimized", help="the optimized model")
    add_data(pv, required=True)
    add_input_shape(pv)
    add_providers(pv)
    pv.add_argument("--allow-unavailable-providers", action="store_true",
                    help="list a requested provider that cannot run here as skipped instead of failing (exit 2)")
    pv.add_argument("--force", action="store_true", help="compare even when the models' inputs/outputs differ in "
                    "name, type or shape (default: refuse, exit 2)")
    pv.add_argument("--samples", type=int, help="at most this many samples (default: all)")
    pv.add_argument("--json", metavar="FILE", help="write the JSON result here")
    pv.add_argument("--plots", metavar="DIR", help="write agreement_vs_compression.png into this folder")
    add_common(pv)


def run(args) -> int:
    from ..ir.modelio import check_output_path, load_model, write_text_atomic
    from ..recipe import parse_input_shapes
    from ..validate import validate

    from ..ort.providers import require_available, require_ran

    provs = providers(args.providers)
    require_available(provs, args.allow_unavailable_providers)
    check_files([args.original, args.optimized])
    if args.samples is not None and args.samples < 1:
        raise UserError("--samples must be >= 1")
    if args.json:
        check_output_path(args.json, [args.original, args.optimized])
    rep = validate(args.original, args.optimized, args.data, provs, labels=args.labels,
                   preprocess=args.preprocess, input_shape=parse_input_shapes(args.input_shape),
                   samples=args.samples, force=args.force)
    require_ran([(p.provider, p.skipped) for p in rep.providers if p.skipped], args.allow_unavailable_providers)
    if args.json:
        write_text_atomic(json.dumps(rep.to_dict(), indent=2) + "\n", args.json)
    if args.plots:
        from ..ir.counts import model_params
        from ..report.plots import validate_plots

        pa = model_params(load_model(args.optimized))
        validate_plots(rep, args.plots, model_params(load_model(args.original)) / pa if pa else None)
    if not args.quiet:
        print(rep.table())
    return EXIT_OK
