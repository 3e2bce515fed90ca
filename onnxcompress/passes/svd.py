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

Rank policy: `ranks(info) -> int | str` (planning_svd.SVDPlanner). Data-aware mode: `sigma_provider`
(data_aware.SVDStatistics) gives the input second moment Σ = E[x xᵀ] of a layer, and the pass uses the
whitened SVD (SVD-LLM), optimal in the output error under Σ. Nodes created by factorization passes
(names with /t2_, /cp_, /svd_) are not touched and not recorded."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..decompose.svd import svd_factor, whitened_svd
from ..graph import ConvInfo, constant_value, conv_info, infer_value_shapes
from ._gs import export_graph, import_graph
from .base import LayerRecord, Pass, PassResult

KINDS = ("conv", "gemm", "matmul")
CHAIN_MARKERS = ("/t2_", "/cp_", "/svd_")


@dataclass
class LinearInfo:
    """One candidate layer as a linear map y = W x (+ b)."""
    name: str
    op: str                     # Conv | Gemm | MatMul
    kind: str                   # conv | gemm | matmul
    index: int                  # conv: position among the original Conv nodes; gemm/matmul: among Gemm+MatMul
    W: np.ndarray | None = field(default=None, repr=False)     # (out, in), the map actually applied
    bias: np.ndarray | None = field(default=None, repr=False)
    x: str = ""                 # activation input tensor
    y: str = ""                 # output tensor
    side: str = "right"         # matmul: where the constant weight is (right: X @ Wm, left: Wm @ X)
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    params: int = 0             # weights (+ bias) of the layer as it is
    conv: ConvInfo | None = field(default=None, repr=False)
    attrs: dict = field(default_factory=dict)
    last: bool = False          # the last Gemm/MatMul of the graph (a CNN's classifier)
    problem: str | None = None

    @property
    def T(self) -> int:          # output width (planner vocabulary)
        return 0 if self.W is None else int(self.W.shape[0])

    @property
    def S(self) -> int:          # input width
        return 0 if self.W is None else int(self.W.shape[1])

    @property
    def positions(self) -> int | None:
        """How many times per model run W is applied (output pixels / rows), when shapes are known."""
        if self.out_shape is None:
            return None
        if self.kind == "conv":
            return int(np.prod(self.out_shape[2:]))
        if self.kind == "gemm" or self.side == "right":
            return int(np.prod(self.out_shape[:-1])) if len(self.out_shape) > 1 else 1
        return int(np.prod(self.out_shape)) // max(self.T, 1)

    @property
    def macs(self) -> int | None:
        p = self.positions
        return None if p is None or self.W is None else p * self.T * self.S

    def chain_params(self, r: int) -> int:
        return r * (self.S + self.T) + (self.T if self.bias is not None else 0)

    def chain_macs(self, r: int) -> int | None:
        p = self.positions
        if p is None:
            return None
        if self.kind == "conv" and self.in_shape is not None and self.conv is not None:
            # first conv runs at the (strided) output resolution as well
            return p * r * (self.S + self.T)
        return p * r * (self.S + self.T)


def is_chain_node(name: str) -> bool:
    return any(m in name for m in CHAIN_MARKERS)


def _attr_int(node: gs.Node, key: str, default: int) -> int:
    return int(node.attrs.get(key, default))


def linear_infos(g: gs.Graph, shapes: dict[str, tuple[int, ...]], kinds=KINDS) -> list[tuple[gs.Node, LinearInfo]]:
    """Candidate nodes of `g` (topological order) and their facts; nodes made by factorization passes are
    left out. Each info's `problem` says why it cannot be factorized (None: it can)."""
    out = []
    conv_idx = lin_idx = 0
    for node in g.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or is_chain_node(node.name):
            continue
        if node.op == "Conv":
            ci = conv_info(node, conv_idx, shapes)
            conv_idx += 1
            if "conv" not in kinds:
                continue
            if ci.weight_shape and len(ci.weight_shape) > 2 and int(np.prod(ci.kernel)) != 1:
                continue   # k×k convs belong to Tucker2/CP: not an SVD candidate, no record
            info = LinearInfo(node.name, "Conv", "conv", ci.index, x=node.inputs[0].name, y=node.outputs[0].name,
                              in_shape=ci.in_shape, out_shape=ci.out_shape, conv=ci, params=ci.params,
                              problem=ci.problem)
            if info.problem is None and ci.group != 1:
                info.problem = ("depthwise conv" if ci.group == ci.S == ci.T else f"grouped conv (group={ci.group})")
            if info.problem is None:
                info.W = ci.weight.reshape(ci.T, ci.S)
                info.bias = ci.bias if ci.has_bias else None
            out.append((node, info))
            continue
        idx = lin_idx
        lin_idx += 1
        kind = node.op.lower()
        if kind not in kinds:
            continue
        out.append((node, _gemm_or_matmul_info(node, idx, kind, shapes)))
    lins = [i for _, i in out if i.kind != "conv"]
    if lins and lin_idx:
        # the last Gemm/MatMul of the whole graph (a CNN's classifier head), whatever kinds were asked for
        last_name = [n.name for n in g.nodes if n.op in ("Gemm", "MatMul") and not is_chain_node(n.name)][-1]
        for i in lins:
            i.last = i.name == last_name
    return out


def _gemm_or_matmul_info(node: gs.Node, idx: int, kind: str, shapes) -> LinearInfo:
    a, b = node.inputs[0], node.inputs[1]
    va, vb = constant_value(a), constant_value(b)
    info = LinearInfo(node.name, node.op, kind, idx, y=node.outputs[0].name,
                      out_shape=shapes.get(node.outputs[0].name))
    if va is not None and vb is not None:
        info.problem = "both inputs constant (constant folding, not SVD)"
        return info
    if kind == "gemm":
        ta, tb = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        info.attrs = {"transA": ta, "transB": tb, "alpha": alpha, "beta": beta}
        info.x, info.in_shape = a.name, shapes.get(a.name)
        if vb is None:
            info.problem = "dynamic weight (computed at run time)"
            return info
        wt = vb
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            c = constant_value(node.inputs[2])
            info.attrs["C"] = c
            info.attrs["C_dynamic"] = c is None
            if c is not None and beta != 0 and (c.size == wt.shape[0 if tb else 1]) and c.ndim <= 2 \
                    and (c.ndim < 2 or c.shape[0] == 1):
                info.bias = (beta * c.reshape(-1)).astype(wt.dtype)
        W = (wt if tb else wt.T) * alpha          # (out, in)
    else:
        if vb is not None:
            info.side, wt, info.x = "right", vb, a.name
        elif va is not None:
            info.side, wt, info.x = "left", va, b.name
        else:
            info.problem = "no constant weight (activation × activation)"
            return info
        info.in_shape = shapes.get(info.x)
        if wt.ndim != 2:
            info.problem = f"{wt.ndim}-D constant weight (only 2-D weights are factorized)"
            return info
        W = wt.T if info.side == "right" else wt
    if not np.issubdtype(wt.dtype, np.floating):
        info.problem = f"non-float weight ({wt.dtype})"
        return info
    if not np.all(np.isfinite(wt)):
        info.problem = "weight holds NaN or Inf"
        return info
    info.W = np.asarray(W)
    info.params = int(wt.size) + (int(info.bias.size) if info.bias is not None else 0)
    return info


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

    def run(self, model: onnx.ModelProto, progress=None) -> PassResult:
        shapes = infer_value_shapes(model, self.input_shapes)
        g = import_graph(model)
        cands = linear_infos(g, shapes, self.kinds)
        if hasattr(self.ranks, "prepare"):
            self.ranks.prepare([i for _, i in cands])
        decisions = [(node, info, info.problem or self.ranks(info)) for node, info in cands]
        todo = [info for _, info, d in decisions if not isinstance(d, str)]
        if self.sigma_provider is not None and hasattr(self.sigma_provider, "prepare") and todo:
            if progress:
                progress(f"SVD: input statistics of {len(todo)} layers on the calibration data")
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
            r = int(decision)
            full = min(info.S, info.T)
            if not 1 <= r <= full:
                rec.skipped = f"rank {r} out of range [1, {full}]"
                continue
            if progress:
                progress(f"SVD {info.name} {info.T}x{info.S} -> rank {r}")
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
            rec.params_after = info.chain_params(r)
            rec.macs_after = info.chain_macs(r)
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
        ones = [1] * nd
        n1 = gs.Node("Conv", f"{n}/svd_in", attrs={"kernel_shape": ones, "strides": list(ci.strides),
                                                   "pads": list(ci.pads), "dilations": ones, "group": 1},
                     inputs=[x, gs.Constant(f"{n}/svd_in_W", B.reshape((r, ci.S) + (1,) * nd))], outputs=[z])
        ins = [z, gs.Constant(f"{n}/svd_out_W", np.ascontiguousarray(A).reshape((ci.T, r) + (1,) * nd))]
        if ci.has_bias:
            ins.append(gs.Constant(f"{n}/svd_out_B", np.asarray(ci.bias, dtype=A.dtype)))
        n2 = gs.Node("Conv", f"{n}/svd_out", attrs={"kernel_shape": ones, "strides": ones,
                                                    "pads": [0] * (2 * nd), "dilations": ones, "group": 1},
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
