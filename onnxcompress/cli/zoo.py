"""The `zoo` subcommand: `zoo list`, `zoo export NAME`. Registered by cli.py; no logic of its own."""
from __future__ import annotations

import json

from ..errors import UserError
from .common import add_common


def add_parser(sub) -> None:
    pz = sub.add_parser("zoo", help="reference models: ResNet-18/34/50, GoogLeNet, AlexNet (needs the torch extra)")
    zsub = pz.add_subparsers(dest="zoo_command", parser_class=type(pz))
    pl = zsub.add_parser("list", help="list the exportable models")
    pl.add_argument("--json", action="store_true")
    add_common(pl)
    pe = zsub.add_parser("export", help="export a model to ONNX (BN folded, checked against torch)")
    pe.add_argument("name")
    pe.add_argument("-o", "--output", help="output path (default NAME[-cifar10].onnx)")
    pe.add_argument("--dataset", default="imagenet", help="imagenet|cifar10")
    pe.add_argument("--weights", default="default", help="default (torchvision ImageNet weights) | none | PATH")
    pe.add_argument("--opset", type=int, default=17)
    pe.add_argument("--dynamic-batch", action="store_true")
    add_common(pe)


def run(args) -> int:
    from .. import zoo

    if args.zoo_command == "list":
        models = zoo.list_models()
        if args.json:
            print(json.dumps(models, indent=2))
        else:
            for m in models:
                params = ", ".join(f"{d}: {p / 1e6:.1f}M params" for d, p in m["params"].items())
                print(f"{m['name']:<10} {params}")
        return 0
    if args.zoo_command == "export":
        from ..ir.modelio import check_output_path

        if args.name not in zoo.MODELS:
            raise UserError(f"unknown model {args.name!r}: choose from {', '.join(zoo.MODELS)}")
        if args.dataset not in zoo.DATASETS:
            raise UserError(f"unknown dataset {args.dataset!r}: choose from {', '.join(zoo.DATASETS)}")
        out = args.output or (args.name + ("" if args.dataset == "imagenet" else f"-{args.dataset}") + ".onnx")
        check_output_path(out, [])
        try:
            path = zoo.export(args.name, out, dataset=args.dataset, weights=args.weights, opset=args.opset,
                              dynamic_batch=args.dynamic_batch)
        except zoo.ZooError as e:
            raise UserError(str(e)) from None
        except ImportError as e:
            raise UserError(f"zoo export needs the torch extra: pip install 'onnxcompress[torch]' ({e})") from None
        if not args.quiet:
            print(f"wrote {path}")
        return 0
    raise UserError("zoo: choose a sub-command: list or export")
