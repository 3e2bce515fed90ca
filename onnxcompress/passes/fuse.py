"""Fuse: merges linear neighbours the factorizations leave behind, so that the chains run closer to their MAC
count on ORT's integer kernels (issue 16). Lossless (exact in real arithmetic; the PassManager checks it against
the float32 noise floor). It runs between the decomposition passes and quantization.

* :func:`merge_parallel_1x1_add` — ``Add(Conv1x1(a), Conv1x1(b))`` becomes ``Conv1x1(Concat(a, b))`` with
  ``W = [Wa Wb]``, ``bias = ba + bb``: the residual Add of a factorized ResNet's downsampling block (two SVD
  chains' last factors, r1→T and r2→T) writes its T-wide output once instead of twice
  (benchmarks/bench_parallel_merge.py: 1.09–1.29x on those nodes, INT8, 1 thread).
* :func:`merge_linear_1x1` — a 1×1 conv whose only consumer is another 1×1 conv (group 1, stride 1, no pads),
  nothing between them, becomes one 1×1 conv ``W = W2·W1``, ``b = W2·b1 + b2`` when that saves MACs
  (``C2·C0 < C1·(C0 + C2)``): an SVD chain's last factor followed by the next layer's first factor (MobileNetV2's
  linear bottlenecks) collapses to r1→r2.
* :func:`fold_channel_affine` — a conv followed by ``Mul`` / ``Add`` with a per-output-channel (or scalar)
  constant folds into the conv's weight and bias.

A merged node keeps the first conv's name (so a chain node still maps to its layer); nodes the quantizer must
keep in float (hand-offs, `exclude_globs`) are never merged."""
from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.layers import constant_value
from ..ir.names import exact_globs, layer_of
from ..ir.shapes import infer_value_shapes
from ..ir.surgery import export_graph, import_graph
from .base import Pass, PassContext, PassResult


# ------------------------------------------------------------------------------------------ helpers
def _is_1x1(node: gs.Node, w: np.ndarray | None) -> bool:
    return (w is not None and w.ndim >= 3 and np.issubdtype(w.dtype, np.floating)
            and all(int(k) == 1 for k in w.shape[2:]) and int(node.attrs.get("group", 1)) == 1)


def _plain_pointwise(node: gs.Node, nd: int) -> bool:
    """Stride 1, no pads, no dilation effect, no auto_pad: W applied at every position of the input."""
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return (all(int(s) == 1 for s in node.attrs.get("strides", [1] * nd))
            and all(int(p) == 0 for p in node.attrs.get("pads", [0] * (2 * nd)))
            and auto in ("NOTSET", "", "VALID"))


def _bias(node: gs.Node, T: int) -> np.ndarray | None:
    """The conv's bias as float64 (zeros without one); None when it is not a constant."""
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        b = constant_value(node.inputs[2])
        return None if b is None else np.asarray(b, np.float64).reshape(T)
    return np.zeros(T)


def _graph_outputs(g: gs.Graph) -> set[int]:
    return {id(t) for t in g.outputs}


def _keep(name: str, keep: Sequence[str]) -> bool:
    base = layer_of(name)
    return any(fnmatch.fnmatchcase(name, k) or fnmatch.fnmatchcase(base, k) for k in keep)


def _sole_conv_producer(t: gs.Tensor, outs: set[int]) -> gs.Node | None:
    """The Conv writing `t` when `t` feeds exactly one node and is not a graph output."""
    if not t.inputs or len(t.outputs) != 1 or id(t) in outs:
        return None
    n = t.inputs[0]
    return n if n.op == "Conv" else None


# ------------------------------------------------------------------------------------------ 1x1 + 1x1 -> concat
def merge_parallel_1x1_add(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                           keep: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """``Add(Conv1x1(a), Conv1x1(b))`` (both group 1, stride 1, no pads, same output shape, each output read only
    by the Add) → ``Conv1x1(Concat(a, b))``, exact. Returns the new model and one record per merge."""
    vs = infer_value_shapes(model, shapes)
    g = import_graph(model)
    outs = _graph_outputs(g)
    merged: list[dict[str, Any]] = []
    for add in [n for n in g.nodes if n.op == "Add" and len(n.inputs) == 2]:
        ya, yb = add.inputs
        ca, cb = _sole_conv_producer(ya, outs), _sole_conv_producer(yb, outs)
        if ya is yb or ca is None or cb is None or _keep(ca.name, keep) or _keep(cb.name, keep):
            continue
        wa, wb = constant_value(ca.inputs[1]), constant_value(cb.inputs[1])
        if not (_is_1x1(ca, wa) and _is_1x1(cb, wb)) or wa.ndim != wb.ndim or wa.shape[0] != wb.shape[0] \
                or wa.dtype != wb.dtype:
            continue
        nd = wa.ndim - 2
        sa, sb = vs.get(ya.name), vs.get(yb.name)
        if not (_plain_pointwise(ca, nd) and _plain_pointwise(cb, nd)) or sa is None or sa != sb:
            continue
        T = wa.shape[0]
        ba, bb = _bias(ca, T), _bias(cb, T)
        if ba is None or bb is None:
            continue
        name = ca.name
        zc = gs.Variable(f"{name}/concat_out", dtype=ca.inputs[0].dtype)
        cat = gs.Node("Concat", f"{name}/concat", attrs={"axis": 1}, inputs=[ca.inputs[0], cb.inputs[0]], outputs=[zc])
        W = np.concatenate([wa, wb], axis=1).astype(wa.dtype)
        conv = gs.Node("Conv", name, attrs={"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd),
                                            "dilations": [1] * nd, "group": 1},
                       inputs=[zc, gs.Constant(f"{name}_W_merged", W),
                               gs.Constant(f"{name}_B_merged", (ba + bb).astype(wa.dtype))],
                       outputs=list(add.outputs))
        merged.append({"kind": "parallel_1x1_add", "add": add.name, "convs": [ca.name, cb.name], "T": int(T),
                       "inputs": [int(wa.shape[1]), int(wb.shape[1])]})
        for n in (ca, cb, add):
            n.inputs.clear()
            n.outputs.clear()
        g.nodes.extend([cat, conv])
    return (export_graph(g, model), merged) if merged else (model, [])


# ------------------------------------------------------------------------------------------ 1x1 · 1x1
def merge_linear_1x1(model: onnx.ModelProto, allow_more_macs: bool = False, keep: Sequence[str] = ()
                     ) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Collapse Conv1x1 → Conv1x1 pairs with nothing between them (runs of three collapse to one). Records:
    ``{"first", "second", "shape": (C2, C1, C0), "macs_per_pixel_before", "macs_per_pixel_after"}``."""
    g = import_graph(model)
    outs = _graph_outputs(g)
    merged: list[dict[str, Any]] = []
    changed = True
    while changed:
        changed = False
        for n2 in list(g.nodes):
            if n2.op != "Conv" or not n2.inputs:
                continue
            n1 = _sole_conv_producer(n2.inputs[0], outs)
            if n1 is None or _keep(n1.name, keep) or _keep(n2.name, keep):
                continue
            rec = _merge_pair(n1, n2, allow_more_macs)
            if rec is not None:
                merged.append(rec)
                changed = True
                break
    return (export_graph(g, model), merged) if merged else (model, [])


def _merge_pair(n1: gs.Node, n2: gs.Node, allow_more_macs: bool) -> dict | None:
    w1, w2 = constant_value(n1.inputs[1]), constant_value(n2.inputs[1])
    if not (_is_1x1(n1, w1) and _is_1x1(n2, w2)) or w1.ndim != w2.ndim or w1.dtype != w2.dtype:
        return None
    nd = w1.ndim - 2
    if not _plain_pointwise(n2, nd) or any(int(d) != 1 for d in n2.attrs.get("dilations", [1] * nd)):
        return None
    (C1, C0), C2 = w1.shape[:2], w2.shape[0]
    if w2.shape[1] != C1 or (not allow_more_macs and C2 * C0 >= C1 * (C0 + C2)):
        return None
    b1, b2 = _bias(n1, C1), _bias(n2, C2)
    if b1 is None or b2 is None:
        return None
    A = np.asarray(w2, np.float64).reshape(C2, C1)
    W = (A @ np.asarray(w1, np.float64).reshape(C1, C0)).astype(w1.dtype).reshape((C2, C0) + (1,) * nd)
    name = n1.name
    n1.inputs = [n1.inputs[0], gs.Constant(f"{name}_W_merged{C2}", W),
                 gs.Constant(f"{name}_B_merged{C2}", (A @ b1 + b2).astype(w1.dtype))]
    y = n2.outputs[0]
    n2.inputs.clear()
    n2.outputs.clear()
    n1.outputs = [y]
    return {"kind": "linear_1x1", "first": name, "second": n2.name, "shape": (int(C2), int(C1), int(C0)),
            "macs_per_pixel_before": int(C1 * (C0 + C2)), "macs_per_pixel_after": int(C2 * C0)}


# ------------------------------------------------------------------------------------------ fold Mul/Add
def _channel_vector(v: np.ndarray | None, C: int, nd: int) -> np.ndarray | None:
    """A per-output-channel constant of a conv output (N, C, spatial...) as a (C,) vector, else None."""
    if v is None or not np.issubdtype(np.asarray(v).dtype, np.floating):
        return None
    v = np.asarray(v, np.float64)
    if v.size == 1:
        return np.full(C, float(v.reshape(-1)[0]))
    if v.ndim > nd + 2:
        return None
    full = (1,) * (nd + 2 - v.ndim) + v.shape
    if full[0] != 1 or any(d != 1 for d in full[2:]) or full[1] != C:
        return None
    return v.reshape(C)


def fold_channel_affine(model: onnx.ModelProto, keep: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[dict]]:
    """Fold ``Conv → Mul(c)`` and ``Conv → Add(c)`` (c per output channel or a scalar, either operand order) into
    the conv. The conv's output must feed only that node and not be a graph output."""
    g = import_graph(model)
    outs = _graph_outputs(g)
    folded: list[dict[str, Any]] = []
    changed = True
    while changed:
        changed = False
        for conv in [n for n in g.nodes if n.op == "Conv" and n.outputs and not _keep(n.name, keep)]:
            y = conv.outputs[0]
            nxt = y.outputs[0] if len(y.outputs) == 1 and id(y) not in outs else None
            if nxt is None or nxt.op not in ("Mul", "Add") or len(nxt.inputs) != 2:
                continue
            other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
            w = constant_value(conv.inputs[1])
            if w is None or w.ndim < 3 or not np.issubdtype(w.dtype, np.floating):
                continue
            T = w.shape[0]
            c, b = _channel_vector(constant_value(other), T, w.ndim - 2), _bias(conv, T)
            if c is None or b is None:
                continue
            if nxt.op == "Mul":
                w2 = (np.asarray(w, np.float64) * c.reshape((T,) + (1,) * (w.ndim - 1))).astype(w.dtype)
                b2 = (b * c).astype(w.dtype)
            else:
                w2, b2 = w, (b + c).astype(w.dtype)
            tag = nxt.op.lower()
            conv.inputs = [conv.inputs[0], gs.Constant(f"{conv.name}_W_{tag}fold{len(folded)}", np.asarray(w2)),
                           gs.Constant(f"{conv.name}_B_{tag}fold{len(folded)}", b2)]
            z = nxt.outputs[0]
            nxt.inputs.clear()
            nxt.outputs.clear()
            conv.outputs = [z]
            folded.append({"kind": "channel_affine", "conv": conv.name, "op": nxt.op, "node": nxt.name})
            changed = True
            break
    return (export_graph(g, model), folded) if folded else (model, [])


# ------------------------------------------------------------------------------------------ the pass
class Fuse(Pass):
    """The three merges above, in order: per-channel Mul/Add folds, serial 1×1·1×1 merges, parallel 1×1 + Add
    merges. `exclude_globs`: nodes (or layers) that stay as they are (the layers kept in float, which the
    quantizer matches by name); hand-offs' `float_nodes` too, and `qaf_nodes` (chains QAF fitted on their storage
    grid: a merge would move their weights off it)."""
    name = "Fuse"
    lossless = True

    def __init__(self, input_shapes: dict[str, tuple[int, ...]] | None = None, exclude_globs: Sequence[str] = ()):
        self.input_shapes = input_shapes
        self.exclude_globs = list(exclude_globs)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        keep = self.exclude_globs + exact_globs(ctx.handoff.get("float_nodes", []) + ctx.handoff.get("qaf_nodes", []))
        out, folds = fold_channel_affine(model, keep)
        out, serial = merge_linear_1x1(out, keep=keep)
        out, parallel = merge_parallel_1x1_add(out, self.input_shapes, keep)
        done = folds + serial + parallel
        if done:
            ctx.note(f"Fuse: {len(folds)} channel folds, {len(serial)} 1x1·1x1 merges, {len(parallel)} parallel "
                     f"1x1 + Add merges")
        return PassResult(model=out, modified=bool(done), lossless=bool(done),
                          info={"fuse": {"channel_folds": len(folds), "linear_1x1": len(serial),
                                         "parallel_1x1_add": len(parallel), "sites": done}})
