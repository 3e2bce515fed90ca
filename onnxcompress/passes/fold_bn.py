"""FoldBatchNorm: Conv → BatchNormalization (inference form) becomes one Conv with scaled weights and bias."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.layers import constant_value
from ..ir.surgery import export_graph, import_graph
from .base import LayerRecord, Pass, PassContext, PassResult


class FoldBatchNorm(Pass):
    name = "FoldBatchNorm"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        g = import_graph(model)
        outputs = set(id(t) for t in g.outputs)
        records: list[LayerRecord] = []
        for bn in [n for n in g.nodes if n.op == "BatchNormalization"]:
            x = bn.inputs[0]
            conv = x.inputs[0] if x.inputs else None
            if conv is None or conv.op != "Conv":
                continue
            rec = LayerRecord(name=conv.name, op="Conv", method="fold_bn", extra={"bn": bn.name})
            reason = None
            if len(bn.outputs) > 1 and any(o.outputs for o in bn.outputs[1:]):
                reason = "BatchNormalization in training mode"
            elif len(x.outputs) != 1 or id(x) in outputs:
                reason = "conv output also used elsewhere"
            vals = [constant_value(t) for t in bn.inputs[1:5]]
            w = constant_value(conv.inputs[1])
            b = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
            if reason is None and (any(v is None for v in vals) or w is None):
                reason = "non-constant weight or BN statistics"
            if reason is None and len(conv.inputs) > 2 and b is None:
                reason = "non-constant bias"
            if reason is not None:
                rec.skipped = reason
                records.append(rec)
                continue
            gamma, beta, mean, var = (np.asarray(v, np.float64) for v in vals)
            eps = float(bn.attrs.get("epsilon", 1e-5))
            scale = gamma / np.sqrt(var + eps)
            T = w.shape[0]
            w2 = (w.astype(np.float64) * scale.reshape((T,) + (1,) * (w.ndim - 1))).astype(w.dtype)
            b0 = np.zeros(T) if b is None else b.astype(np.float64)
            b2 = ((b0 - mean) * scale + beta).astype(w.dtype)
            y = bn.outputs[0]
            W = gs.Constant(f"{conv.name}_W_bnfold", w2)
            B = gs.Constant(f"{conv.name}_B_bnfold", b2)
            conv.inputs = [conv.inputs[0], W, B]
            conv.outputs = [y]
            bn.inputs.clear()
            bn.outputs.clear()
            rec.params_before = rec.params_after = int(w.size) + T
            rec.kernel_shape = list(w.shape)
            records.append(rec)
        modified = any(r.skipped is None for r in records)
        out = export_graph(g, model) if modified else model
        return PassResult(model=out, modified=modified, layers=records, lossless=True)
