"""`onnxcompress inspect`: every Conv/Gemm/MatMul with shapes, params, MACs and which factorization methods
can take it — asked of the same cost models the planner uses (passes.registry.applicable), on the model as
`optimize` sees it (after the lossless clean-up passes), so inspect and optimize cannot disagree."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from .errors import UserError
from .ir.counts import has_quantized_ops
from .ir.layers import collect_layers
from .ir.shapes import input_shapes
from .passes import registry


@dataclass
class LayerFacts:
    name: str
    op: str
    weight_shape: list[int] | None
    input_shape: list[int] | None
    output_shape: list[int] | None
    params: int
    macs: int | None
    decomposable: str | None     # the methods that apply ("tucker2, cp4, cp3" / "svd"), or None
    why_not: str | None          # when no method applies: why (per method when they differ)


def inspect_model(model: onnx.ModelProto, shapes_override: dict | None = None) -> dict:
    try:
        shapes = input_shapes(model, shapes_override)
    except UserError:
        shapes = None
    clean = model
    for p in registry.CLEANUP:
        clean = p().run(clean).model
    layers: list[LayerFacts] = []
    for info in collect_layers(clean, shapes):
        verdicts = registry.applicable(info)
        ok = [m for m, why in verdicts.items() if why is None]
        whys = list(dict.fromkeys(why for why in verdicts.values() if why is not None))
        relevant = [w for w in whys if not w.startswith(("not a k×k conv", "k×k conv (SVD"))] or whys
        ws = getattr(info, "weight_shape", None) or (list(info.conv.weight_shape) if getattr(info, "conv", None)
                                                     else (list(info.W.shape) if getattr(info, "W", None) is not None
                                                           else None))
        layers.append(LayerFacts(info.name, getattr(info, "op", "Conv"), list(ws) if ws else None,
                                 _l(info.in_shape), _l(info.out_shape), int(info.params), info.macs,
                                 ", ".join(ok) or None, None if ok else "; ".join(relevant)))
    return {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": {k: list(v) for k, v in (shapes or {}).items()},
        "quantized_ops": has_quantized_ops(model),
        "subgraph_ops": sorted({n.op_type for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")}),
        "functions": [f.name for f in model.functions],
        "layers": [asdict(l) for l in layers],
        "totals": {"params": sum(l.params for l in layers),
                   "macs": sum(l.macs or 0 for l in layers),
                   "decomposable": sum(1 for l in layers if l.decomposable)},
    }


def _l(x):
    return list(x) if x is not None else None


def render_inspect(facts: dict) -> str:
    from .report.report import _n, wrap_table

    rows = [("layer", "op", "weight", "in -> out", "params", "MACs", "decomposable")]
    for l in facts["layers"]:
        shp = "x".join(map(str, l["weight_shape"] or [])) or "-"
        io = f"{'x'.join(map(str, l['input_shape'] or [])) or '?'} -> {'x'.join(map(str, l['output_shape'] or [])) or '?'}"
        dec = l["decomposable"] or f"no: {l['why_not']}"
        rows.append((l["name"], l["op"], shp, io, _n(l["params"]), _n(l["macs"]), dec))
    lines = wrap_table(rows)
    t = facts["totals"]
    lines.append(f"{len(facts['layers'])} layers, {t['decomposable']} decomposable; "
                 f"params {_n(t['params'])}, MACs {_n(t['macs'])}; inputs {facts['inputs'] or 'dynamic'}")
    if facts["quantized_ops"]:
        lines.append(f"already quantized: {', '.join(facts['quantized_ops'])} (re-quantization will be refused)")
    if facts["subgraph_ops"]:
        lines.append(f"control flow: {', '.join(facts['subgraph_ops'])} (convs inside subgraphs are left alone)")
    return "\n".join(lines)
