"""The factor chains a factorization pass left in a graph, read back with their original layer.

Tucker2 chains are the nodes `<layer>/t2_in, t2_core, t2_out` (three Convs), SVD chains `<layer>/svd_in,
svd_out` (two Convs, Gemms or MatMuls); `<layer>` is the original node's name in the model the factorization
passes started from (the reference), and the chain reads and writes the original layer's tensors. A `Chain`
holds the original weight (BN folded) and bias from the reference, the chain's initializer names in the
compressed model, and how its tensors become rows; `chain_factors` / `write_factors` read and overwrite the
factors in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import numpy_helper

LAST = {"tucker2": "/t2_out", "svd": "/svd_out"}


@dataclass
class Chain:
    name: str                  # the original layer's node name
    kind: str                  # svd | tucker2
    op: str                    # Conv | Gemm | MatMul
    x: str                     # chain input tensor (same name in the reference)
    y: str                     # chain output tensor = the original layer's output
    view: str                  # conv | rows | rows_t | cols (ort.frontier.RowView kinds)
    W: np.ndarray = field(repr=False)          # (T, D) for svd, (T, S, kh, kw) for tucker2
    bias: np.ndarray | None = field(default=None, repr=False)   # the original (effective) bias
    ranks: tuple = ()
    inits: dict = field(default_factory=dict)  # role (in, core, out, bias) -> initializer name
    conv: dict = field(default_factory=dict)   # kernel, strides, pads, dilations (conv views)
    centred: bool = True       # the chain has a bias slot that may be refit
    beta: float = 1.0          # Gemm: C = bias / beta

    @property
    def D(self) -> int:
        return int(np.prod(self.W.shape[1:]))

    @property
    def first(self) -> str:
        return self.name + ("/t2_in" if self.kind == "tucker2" else "/svd_in")

    @property
    def last(self) -> str:
        return self.name + LAST[self.kind]


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _val(name, table):
    return numpy_helper.to_array(table[name]) if name in table else None


def find_chains(model: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[list[Chain], dict[str, str]]:
    """Factor chains of `model` in topological order, with the original layer (weights, bias) read from
    `reference`. Returns (chains, {layer: why it is left alone})."""
    g = SimpleNamespace(inits={t.name: t for t in model.graph.initializer},
                        rinits={t.name: t for t in reference.graph.initializer},
                        nodes={n.name: n for n in model.graph.node})
    rnodes = {n.name: n for n in reference.graph.node}
    chains, skipped = [], {}
    for n in model.graph.node:
        kind = next((k for k, s in (("svd", "/svd_in"), ("tucker2", "/t2_in")) if n.name.endswith(s)), None)
        if kind is None:
            continue
        base = n.name[:-len("/svd_in" if kind == "svd" else "/t2_in")]
        last, ref = g.nodes.get(base + LAST[kind]), rnodes.get(base)
        if last is None or ref is None:
            skipped[base] = "chain or original layer not found"
            continue
        if kind == "tucker2" or n.op_type == "Conv":
            c = _conv_chain(g, base, kind, n, last, ref)
        elif n.op_type == "Gemm":
            c = _gemm_chain(g, base, n, last, ref)
        elif n.op_type == "MatMul":
            c = _matmul_chain(g, base, n, last, ref)
        else:
            c = f"{n.op_type} chain"
        if isinstance(c, str):
            skipped[base] = c
        else:
            chains.append(c)
    return chains, skipped


def _conv_chain(g, base, kind, n, last, ref) -> Chain | str:
    K = _val(ref.input[1], g.rinits)
    if K is None or K.ndim != 4:
        return "only 2-D convs with a constant weight are supported"
    if _attr(ref, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or _attr(ref, "group", 1) != 1:
        return "auto_pad or grouped conv"
    b = _val(ref.input[2], g.rinits) if len(ref.input) > 2 and ref.input[2] else None
    conv = {"kernel": tuple(K.shape[2:]), "strides": tuple(_attr(ref, "strides", [1, 1])),
            "pads": tuple(_attr(ref, "pads", [0, 0, 0, 0])), "dilations": tuple(_attr(ref, "dilations", [1, 1]))}
    if kind == "svd":
        W, ri = K.reshape(K.shape[0], -1), {"in": n.input[1], "out": last.input[1]}
        ranks = (g.inits[n.input[1]].dims[0],)
    else:
        core = g.nodes[base + "/t2_core"]
        W, ri = K, {"in": n.input[1], "core": core.input[1], "out": last.input[1]}
        ranks = (g.inits[n.input[1]].dims[0], g.inits[core.input[1]].dims[0])
    if any(v not in g.inits for v in ri.values()):
        return "a factor is not a constant initializer"
    dims = {k: tuple(g.inits[v].dims) for k, v in ri.items()}
    want = {"out": (K.shape[0], ranks[-1], 1, 1),
            "in": (ranks[0], K.shape[1]) + ((1, 1) if kind == "tucker2" else tuple(K.shape[2:]))}
    if kind == "tucker2":
        want["core"] = (ranks[1], ranks[0]) + tuple(K.shape[2:])
    if (any(dims[k] != v for k, v in want.items()) or n.input[0] != ref.input[0]
            or last.output[0] != ref.output[0]):
        return "the chain was rewritten after its factorization (fused or renamed): factors do not match the layer"
    if len(last.input) > 2 and last.input[2]:
        ri["bias"] = last.input[2]
    return Chain(base, kind, "Conv", n.input[0], last.output[0], "conv", W, b, ranks, ri, conv, True)


def _gemm_chain(g, base, n, last, ref) -> Chain | str:
    wt = _val(ref.input[1], g.rinits)
    if wt is None:
        return "dynamic Gemm weight"
    alpha, beta = float(_attr(ref, "alpha", 1.0)), float(_attr(ref, "beta", 1.0))
    W = (wt if _attr(ref, "transB", 0) else wt.T) * alpha
    c = _val(ref.input[2], g.rinits) if len(ref.input) > 2 and ref.input[2] else None
    centred = c is not None and c.size == W.shape[0] and beta != 0.0
    if c is not None and not centred:
        return "Gemm C is not a per-output bias"
    ri = {"in": n.input[1], "out": last.input[1]}
    if centred:
        ri["bias"] = last.input[2]
    bias = (beta * c.reshape(-1)).astype(np.float64) if centred else None
    return Chain(base, "svd", "Gemm", n.input[0], last.output[0], "rows_t" if _attr(ref, "transA", 0) else "rows",
                 W, bias, (g.inits[n.input[1]].dims[0],), ri, {}, centred, beta)


def _matmul_chain(g, base, n, last, ref) -> Chain | str:
    if n.input[1] in g.inits:        # X @ Wm: Wm (in, out)
        wm = _val(ref.input[1], g.rinits)
        if wm is None:
            return "MatMul weight not found in the reference"
        return Chain(base, "svd", "MatMul", n.input[0], last.output[0], "rows", wm.T, None,
                     (g.inits[n.input[1]].dims[1],), {"in": n.input[1], "out": last.input[1]}, {}, False)
    wm = _val(ref.input[0], g.rinits)  # Wm @ X
    if wm is None:
        return "MatMul weight not found in the reference"
    return Chain(base, "svd", "MatMul", n.input[1], last.output[0], "cols", wm, None,
                 (g.inits[n.input[0]].dims[0],), {"in": n.input[0], "out": last.input[0]}, {}, False)


def chain_factors(chain: Chain, inits: dict):
    """The chain's current factors from the graph: (A (T, r), B (r, D)) for svd, a namespace with core, U_T,
    U_S for tucker2 (float64)."""
    f = {k: numpy_helper.to_array(inits[v]).astype(np.float64) for k, v in chain.inits.items() if k != "bias"}
    if chain.kind == "tucker2":
        r3, r4 = chain.ranks
        return SimpleNamespace(core=f["core"], U_T=f["out"].reshape(-1, r4), U_S=f["in"].reshape(r3, -1).T)
    if chain.op == "Conv":
        return f["out"].reshape(f["out"].shape[0], -1), f["in"].reshape(f["in"].shape[0], -1)
    if chain.op == "MatMul" and chain.view == "rows":     # X @ Bᵀ @ Aᵀ
        return f["out"].T, f["in"].T
    return f["out"], f["in"]


def write_factors(chain: Chain, model: onnx.ModelProto, inits: dict, factors, bias) -> None:
    """Overwrite the chain's initializers with `factors` (and `bias` when the chain is centred; a conv chain
    without a bias gets one, `<layer>/da_B`)."""
    def put(role, arr):
        t = inits[chain.inits[role]]
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr).astype(np.float32).reshape(tuple(t.dims)),
                                           t.name))

    if chain.kind == "tucker2":
        put("in", np.asarray(factors.U_S).T)
        put("core", factors.core)
        put("out", factors.U_T)
    else:
        A, B = factors
        rows = chain.op == "MatMul" and chain.view == "rows"
        put("in", B.T if rows else B)
        put("out", A.T if rows else A)
    if not chain.centred:
        return
    if bias is None:
        if "bias" not in chain.inits:
            return
        bias = np.zeros(chain.W.shape[0])
    b = np.asarray(bias, np.float64) / (chain.beta if chain.op == "Gemm" else 1.0)
    if "bias" in chain.inits:
        put("bias", b)
        return
    last = next(n for n in model.graph.node if n.name == chain.last)   # a conv chain without bias: add one
    name = chain.name + "/da_B"
    model.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), name))
    inits[name] = model.graph.initializer[-1]
    while len(last.input) < 3:
        last.input.append("")
    last.input[2] = name
    chain.inits["bias"] = name


def unshare_biases(model: onnx.ModelProto, chains: list[Chain]) -> None:
    """Give each chain's bias initializer its own copy when another node uses it too (deduplicated)."""
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    inits = {t.name: t for t in model.graph.initializer}
    for c in chains:
        b = c.inits.get("bias")
        if b and uses.get(b, 0) > 1:
            last = next(n for n in model.graph.node if n.name == c.last)
            t = onnx.TensorProto()
            t.CopyFrom(inits[b])
            t.name = c.name + "/da_B"
            model.graph.initializer.append(t)
            last.input[2] = t.name
            c.inits["bias"] = t.name
            uses[b] -= 1
