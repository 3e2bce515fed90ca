"""`onnxcompress inspect MODEL`: every layer, its shapes, params, MACs and which methods can take it."""
from __future__ import annotations

import json

from .common import EXIT_OK, Formatter, add_common, add_input_shape


def add_parser(sub) -> None:
    pi = sub.add_parser("inspect", help="list Conv/Gemm/MatMul layers, shapes, params, MACs, which methods apply",
                        formatter_class=Formatter)
    pi.add_argument("model", help="the ONNX model")
    add_input_shape(pi)
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common(pi)


def run(args) -> int:
    from ..inspect import inspect_model, render_inspect
    from ..ir.modelio import load_model
    from ..recipe import parse_input_shapes

    model = load_model(args.model)
    shapes = {k: tuple(v) for k, v in parse_input_shapes(args.input_shape).items()}
    facts = inspect_model(model, shapes)
    print(json.dumps(facts, indent=2) if args.json else render_inspect(facts))
    return EXIT_OK
