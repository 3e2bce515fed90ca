"""`onnxcompress inspect`: every Conv/Gemm/MatMul with shapes, params, MACs and whether (and why not) it
can be decomposed."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UserError
from .graph import conv_info, constant_value, ensure_node_names, has_quantized_ops, infer_value_shapes, input_shapes
from .passes.tucker2 import tucker2_problem


@dataclass
class LayerFacts:
    name: str
    op: str
    weight_shape: list[int] | None
    input_shape: list[int] | None
    output_shape: list[int] | None
    params: int
    macs: int | None
    decomposable: str | None     # method that applies, or None
    why_not: str | None


def inspect_model(model: onnx.ModelProto, shapes_override: dict | None = None) -> dict:
    try:
        shapes = input_shapes(model, shapes_override)
    except UserError:
        shapes = None
    vshapes = infer_value_shapes(model, shapes) if shapes else infer_value_shapes(model)
    g = gs.import_onnx(model)
    ensure_node_names(g)
    layers: list[LayerFacts] = []
    conv_idx = 0
    for node in g.nodes:
        if node.op == "Conv":
            info = conv_info(node, conv_idx, vshapes)
            conv_idx += 1
            why = tucker2_problem(info)
            method = "tucker2" if why is None else None
            if why and why.startswith("1x1 kernel"):
                why, method = "1x1 kernel: SVD of a 1x1 conv (not available yet)", None
            layers.append(LayerFacts(node.name, "Conv", list(info.weight_shape), _l(info.in_shape),
                                     _l(info.out_shape), info.params, info.macs, method, why))
        elif node.op in ("Gemm", "MatMul"):
            w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
            a = vshapes.get(node.inputs[0].name)
            o = vshapes.get(node.outputs[0].name)
            params = int(w.size) if w is not None else 0
            if node.op == "Gemm" and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
                params += int(constant_value(node.inputs[2]).size)
            macs = None
            if w is not None and o is not None and w.ndim == 2:
                macs = int(np.prod(o)) * (w.shape[0] if node.op == "MatMul" or not node.attrs.get("transB", 0)
                                          else w.shape[1])
            why = "dynamic weight" if w is None else "SVD of Gemm/MatMul (not available yet)"
            layers.append(LayerFacts(node.name, node.op, list(w.shape) if w is not None else None, _l(a), _l(o),
                                     params, macs, None, why))
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
    from .report import _n

    rows = [("layer", "op", "weight", "in -> out", "params", "MACs", "decomposable")]
    for l in facts["layers"]:
        shp = "x".join(map(str, l["weight_shape"] or [])) or "-"
        io = f"{'x'.join(map(str, l['input_shape'] or [])) or '?'} -> {'x'.join(map(str, l['output_shape'] or [])) or '?'}"
        dec = l["decomposable"] or f"no: {l['why_not']}"
        rows.append((l["name"], l["op"], shp, io, _n(l["params"]), _n(l["macs"]), dec))
    widths = [min(max(len(str(r[i])) for r in rows), 40) for i in range(len(rows[0]) - 1)]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c)[:40].ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]))
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 12))
    t = facts["totals"]
    lines.append(f"{len(facts['layers'])} layers, {t['decomposable']} decomposable; "
                 f"params {_n(t['params'])}, MACs {_n(t['macs'])}; inputs {facts['inputs'] or 'dynamic'}")
    if facts["quantized_ops"]:
        lines.append(f"already quantized: {', '.join(facts['quantized_ops'])} (re-quantization will be refused)")
    if facts["subgraph_ops"]:
        lines.append(f"control flow: {', '.join(facts['subgraph_ops'])} (convs inside subgraphs are left alone)")
    return "\n".join(lines)
