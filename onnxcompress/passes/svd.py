"""SVD pass (ALGORITHMS.md §6): a linear layer y = W x (+ b), W (out × in), becomes two linear layers
through rank r with the singular values split as Σ^½ on each side (balanced factor ranges for INT8):

* 1×1 Conv (group 1, any spatial rank) → 1×1 Conv in→r (the original strides *and pads*, no bias)
  → 1×1 Conv r→out (stride 1, no pads, the bias). Exact: a pointwise map commutes with subsampling, and a
  padded border position sees a zero input in both forms (first conv: 0, second: A·0 + b = b).
* Gemm (any transA/transB, alpha folded into W, C and beta kept) → Gemm (transA as before, in→r)
  → Gemm (r→out, C, beta).
* MatMul with a constant 2-D weight on either side → two MatMuls: X @ Wm (Wm in×out, X of any rank ≥ 1,
  e.g. a transformer's (B, L, D)) or Wm @ X (Wm out×in, X (..., in, n)). A bias Add after the MatMul is
  left in place.

Rank policy: `ranks(info) -> r | (r,) | str` (the planner's plan for this method). An optional `sigma_provider`
hook gives the input second moment Σ = E[x xᵀ] of a layer, and the pass then uses the whitened SVD (SVD-LLM),
optimal in the output error under Σ (the pipeline's --data-aware runs this pass plain and revisits the chains
in passes/data_aware.py). Nodes created by factorization passes
(names with /t2_, /cp_, /svd_) are not touched and not recorded."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..decompose.costs import ConvSpec, CostModel, Ranks, linear_rank_for_ratio
from ..decompose.svd import svd_factor, whitened_svd
from ..decompose.vbmf import svd_vbmf_rank
from ..ir.layers import KINDS, LinearInfo, conv_spec, linear_infos
from ..ir.shapes import infer_value_shapes
from ..ir.surgery import export_graph, import_graph, pointwise_attrs
from .base import LayerRecord, Method, Pass, PassContext, PassResult, Wiring


class SVDCost(CostModel):
    """Two factors through rank r: r·(in + out) weights, positions·r·(in + out) MACs."""
    method = "svd"
    family = "linear"

    def takes(self, layer) -> str | None:
        if not isinstance(layer, LinearInfo):
            return "k×k conv (SVD takes 1×1 convs, Gemm and MatMul)"
        return layer.problem

    def full_ranks(self, layer) -> Ranks:
        return (min(layer.S, layer.T),)

    def weights(self, layer, ranks):
        return layer.S * layer.T if ranks is None else int(ranks[0]) * (layer.S + layer.T)

    def macs(self, layer, ranks):
        p = layer.positions
        if p is None:
            return None
        return p * (layer.S * layer.T if ranks is None else int(ranks[0]) * (layer.S + layer.T))

    def ranks_for_ratio(self, layer, ratio, target="params"):
        return linear_rank_for_ratio(self, layer, ratio, target, self.full_ranks(layer)[0])

    def vbmf_ranks(self, layer, weakening):
        return (svd_vbmf_rank(layer.W, weakening=weakening),)

    def original(self, layer):
        return [conv_spec(layer.conv)] if layer.kind == "conv" else []

    def chain(self, layer, ranks):
        if layer.kind != "conv":
            return []
        ci = layer.conv
        nd = len(ci.kernel)
        one, zero = (1,) * nd, (0,) * (2 * nd)
        r = int(ranks[0])
        return [ConvSpec(ci.S, r, one, tuple(ci.strides), tuple(ci.pads) or zero, one),
                ConvSpec(r, ci.T, one, one, zero, one, bias=ci.has_bias)]


COST = SVDCost()


RankPolicy = Callable[[LinearInfo], "int | str"]
#: data-aware hook: Σ = E[x xᵀ] (in × in) of a layer's input, or None (plain SVD)
SigmaProvider = Callable[[LinearInfo], "np.ndarray | None"]


class SVDPass(Pass):
    """See the module doc. `kinds`: which layer kinds to factorize (conv = 1×1 convs)."""
    name = "SVD"

    def __init__(self, ranks: RankPolicy, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 kinds=KINDS, sigma_provider: SigmaProvider | None = None, method: str = "svd"):
        self.ranks = ranks
        self.input_shapes = input_shapes
        self.kinds = tuple(kinds)
        self.sigma_provider = sigma_provider
        self.method = method

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        shapes = infer_value_shapes(model, self.input_shapes)
        g = import_graph(model)
        cands = linear_infos(g, shapes, self.kinds, lazy=True)
        decisions = [(node, info, info.problem or self.ranks(info)) for node, info in cands]
        todo = [info for _, info, d in decisions if not isinstance(d, str)]
        if self.sigma_provider is not None and hasattr(self.sigma_provider, "prepare") and todo:
            ctx.note(f"SVD: input statistics of {len(todo)} layers on the calibration data")
            self.sigma_provider.prepare(model, todo)
        records, all_full = [], True
        for node, info, decision in decisions:
            rec = LayerRecord(name=info.name, op=info.op, method="svd",
                              kernel_shape=list(info.conv.weight_shape) if info.conv is not None and info.W is not None
                              else (list(info.W.shape) if info.W is not None else None),
                              params_before=info.params, params_after=info.params,
                              macs_before=info.macs, macs_after=info.macs)
            records.append(rec)
            if isinstance(decision, str):
                rec.skipped = decision
                continue
            r = int(decision[0]) if isinstance(decision, (tuple, list)) else int(decision)
            full = min(info.S, info.T)
            if not 1 <= r <= full:
                rec.skipped = f"rank {r} out of range [1, {full}]"
                continue
            ctx.note(f"SVD {info.name} {info.T}x{info.S} -> rank {r}")
            sigma = self.sigma_provider(info) if self.sigma_provider is not None else None
            if sigma is not None:
                res = whitened_svd(info.W, r, sigma)
                rec.extra["data_aware"] = "whitened SVD"
                rec.extra["output_rel_error"] = res.output_rel_error
                rec.extra["output_rel_error_plain"] = svd_factor(info.W, r, sigma).output_rel_error
            else:
                res = svd_factor(info.W, r)
            dt = info.W.dtype if np.issubdtype(info.W.dtype, np.floating) else np.float32
            A, B = res.A.astype(dt), res.B.astype(dt)
            rec.new_nodes = _replace(g, node, info, A, B)
            all_full &= r == full
            rec.ranks = [r]
            rec.params_after = COST.params(info, (r,))
            rec.macs_after = COST.macs(info, (r,))
            rec.weight_rel_error = res.rel_error
        modified = any(r.skipped is None for r in records)
        out = export_graph(g, model) if modified else model
        return PassResult(model=out, modified=modified, layers=records, lossless=modified and all_full,
                          info={"svd_kinds": list(self.kinds)})


def _replace(g: gs.Graph, node: gs.Node, info: LinearInfo, A: np.ndarray, B: np.ndarray) -> list[str]:
    """Rewire `node` into first (B: in→r) and second (A: r→out) factor nodes; returns their names."""
    n = node.name
    r = B.shape[0]
    x, y = node.inputs[0] if info.side == "right" else node.inputs[1], node.outputs[0]
    z = gs.Variable(f"{n}/svd_in_out", dtype=y.dtype)
    if info.kind == "conv":
        ci = info.conv
        nd = len(ci.kernel)
        n1 = gs.Node("Conv", f"{n}/svd_in", attrs=pointwise_attrs(nd, ci.strides, ci.pads),
                     inputs=[x, gs.Constant(f"{n}/svd_in_W", B.reshape((r, ci.S) + (1,) * nd))], outputs=[z])
        ins = [z, gs.Constant(f"{n}/svd_out_W", np.ascontiguousarray(A).reshape((ci.T, r) + (1,) * nd))]
        if ci.has_bias:
            ins.append(gs.Constant(f"{n}/svd_out_B", np.asarray(ci.bias, dtype=A.dtype)))
        n2 = gs.Node("Conv", f"{n}/svd_out", attrs=pointwise_attrs(nd),
                     inputs=ins, outputs=[y])
    elif info.kind == "gemm":
        at = info.attrs
        n1 = gs.Node("Gemm", f"{n}/svd_in", attrs={"transA": at["transA"], "transB": 1},
                     inputs=[x, gs.Constant(f"{n}/svd_in_W", np.ascontiguousarray(B))], outputs=[z])
        ins = [z, gs.Constant(f"{n}/svd_out_W", np.ascontiguousarray(A))]
        attrs2 = {"transB": 1}
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            ins.append(node.inputs[2])
            attrs2["beta"] = at["beta"]
        n2 = gs.Node("Gemm", f"{n}/svd_out", attrs=attrs2, inputs=ins, outputs=[y])
    elif info.side == "right":      # X @ Wm,  Wm ≈ Bᵀ Aᵀ
        n1 = gs.Node("MatMul", f"{n}/svd_in", inputs=[x, gs.Constant(f"{n}/svd_in_W", np.ascontiguousarray(B.T))],
                     outputs=[z])
        n2 = gs.Node("MatMul", f"{n}/svd_out", inputs=[z, gs.Constant(f"{n}/svd_out_W", np.ascontiguousarray(A.T))],
                     outputs=[y])
    else:                           # Wm @ X,  Wm ≈ A B
        n1 = gs.Node("MatMul", f"{n}/svd_in", inputs=[gs.Constant(f"{n}/svd_in_W", np.ascontiguousarray(B)), x],
                     outputs=[z])
        n2 = gs.Node("MatMul", f"{n}/svd_out", inputs=[gs.Constant(f"{n}/svd_out_W", np.ascontiguousarray(A)), z],
                     outputs=[y])
    node.inputs.clear()
    node.outputs.clear()
    g.nodes.extend([n1, n2])
    return [n1.name, n2.name]


def build(policy, w: Wiring) -> SVDPass:
    return SVDPass(policy, w.shapes)


METHOD = Method("svd", COST, build)
