"""What the sequential data-aware pass (passes/data_aware.py) needs from ONNX Runtime, written once:

* `session_for(model, outputs, prune)`: a CPU session whose outputs include `outputs`; `prune` keeps only
  those outputs and the nodes they depend on (a prefix of the graph).
* `Frontier`: the activations crossing the boundary between the finalized prefix of a graph (nodes[:k]) and
  the rest, for every calibration batch, kept on disk (one .npy per tensor and batch). `advance(model, k)` runs
  nodes[self.k:k] (already final) as one small ORT model over every batch and moves the boundary to k: over
  the whole sequential procedure each node runs once per batch, and memory holds one batch.
* `RowView`: how a layer's input and output tensors become paired rows (x ∈ R^D, y ∈ R^T) at sampled
  positions — im2col patches of a 2-D conv, the last axis of a Gemm/MatMul operand, or the second-last axis
  of `Wm @ X`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from ..decompose.stats import window_view
from .session import make_session

FeedsFactory = Callable[[], Iterable[dict]]


def pruned(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` computing only `outputs` (graph inputs excluded), with only the nodes and
    initializers they depend on."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    producer = {o: n for n in m.graph.node for o in n.output}
    need, stack = set(), list(outputs)
    while stack:
        n = producer.get(stack.pop())
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.input if i)
    keep = [n for n in m.graph.node if id(n) in need]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    del m.graph.output[:]
    used = {i for n in keep for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def session_for(model: onnx.ModelProto, outputs: list[str] | None = None, prune: bool = False):
    """An ORT CPU session computing the graph outputs plus `outputs` (prune: only `outputs`)."""
    inputs = {i.name for i in model.graph.input}
    outs = [t for t in dict.fromkeys(outputs or []) if t not in inputs]
    if prune:
        m = pruned(model, outs)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in outs:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return make_session(m, "cpu")


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """True when a node carries a graph attribute (If/Loop/Scan): the frontier does not track tensors that
    a subgraph reads from the outer scope."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


class Frontier:
    """See the module doc. `feeds()` is consumed once, here; `n` is the number of batches."""

    def __init__(self, model: onnx.ModelProto, feeds: FeedsFactory, root: str):
        self.root, self.k, self.n = root, 0, 0
        os.makedirs(root, exist_ok=True)
        self.names: dict[str, str] = {}
        g = model.graph
        self.inits = {t.name for t in g.initializer}
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(g.node):
            for t in n.input:
                if t:
                    self.last_use[t] = i
        for o in g.output:
            self.last_use[o.name] = 1 << 30
        self.live: set[str] = set()
        try:
            inf = onnx.shape_inference.infer_shapes(model)
            self.dtypes = {v.name: v.type.tensor_type.elem_type for v in list(inf.graph.value_info) +
                           list(inf.graph.output) if v.type.tensor_type.elem_type}
        except (onnx.shape_inference.InferenceError, ValueError):   # a convenience: outputs default to float
            self.dtypes = {}
        for bi, feed in enumerate(feeds()):
            for name, a in feed.items():
                np.save(self._path(bi, name), np.asarray(a))
                self.live.add(name)
            self.n = bi + 1

    def _path(self, bi: int, name: str) -> str:
        key = self.names.setdefault(name, f"t{len(self.names)}")
        return os.path.join(self.root, f"{bi}_{key}.npy")

    def get(self, bi: int, name: str) -> np.ndarray:
        return np.load(self._path(bi, name))

    def advance(self, model: onnx.ModelProto, k: int) -> None:
        """Run nodes[self.k:k] of `model` on the stored boundary of every batch; the boundary moves to k."""
        nodes = list(model.graph.node)[self.k:k]
        if not nodes:
            self.k = max(self.k, k)
            return
        produced = {o for n in nodes for o in n.output if o}
        ins = [t for t in dict.fromkeys(i for n in nodes for i in n.input if i)
               if t not in produced and t not in self.inits]
        missing = [t for t in ins if t not in self.live]
        if missing:
            raise RuntimeError(f"frontier lacks {missing[:3]}")
        outs = [t for t in produced if self.last_use.get(t, -1) >= k]
        if outs:
            sess = None
            for bi in range(self.n):
                feed = {t: self.get(bi, t) for t in ins}
                if sess is None:
                    sess = self._segment(model, nodes, ins, outs, feed)
                for t, a in zip(outs, sess.run(outs, feed)):
                    np.save(self._path(bi, t), a)
        dead = [t for t in self.live if self.last_use.get(t, -1) < k]
        for t in dead:
            for bi in range(self.n):
                try:
                    os.remove(self._path(bi, t))
                except FileNotFoundError:
                    pass
        self.live = (self.live - set(dead)) | set(outs)
        self.k = k

    def _segment(self, model, nodes, ins, outs, feed):
        vi = [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(feed[t].dtype), None)
              for t in ins]
        vo = [onnx.helper.make_tensor_value_info(t, self.dtypes.get(t, onnx.TensorProto.FLOAT), None) for t in outs]
        used = {i for n in nodes for i in n.input}
        inits = [t for t in model.graph.initializer if t.name in used]
        m = onnx.helper.make_model(onnx.helper.make_graph(nodes, "segment", vi, vo, inits),
                                   opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        return make_session(m, "cpu")


@dataclass(frozen=True)
class RowView:
    """How a layer's tensors become rows. kind: conv (NCHW, im2col patches of x; y's channels) | rows (last
    axis) | rows_t (a transposed 2-D Gemm operand) | cols (the second-last axis: Wm @ X). Conv geometry as ONNX
    attributes (2-D)."""
    kind: str
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)
    dilations: tuple = (1, 1)

    def count(self, yshape) -> int:
        """Rows in one batch's output tensor."""
        if self.kind == "conv":
            return yshape[0] * yshape[2] * yshape[3]
        if self.kind == "cols":
            return int(np.prod(yshape)) // yshape[-2]
        if self.kind == "rows_t":
            return yshape[0]
        return int(np.prod(yshape[:-1])) if len(yshape) > 1 else 1

    def positions(self, yshape, m: int, rng) -> np.ndarray | None:
        """Sorted sampled row indices of one batch (None: all rows, when there are at most m)."""
        total = self.count(yshape)
        return None if total <= m else np.sort(rng.choice(total, size=m, replace=False))

    def y_rows(self, y: np.ndarray, pos) -> np.ndarray:
        if self.kind == "conv":
            if pos is not None:        # gather the sampled positions directly (no full NHWC copy)
                ni, rem = np.divmod(pos, y.shape[2] * y.shape[3])
                ii, jj = np.divmod(rem, y.shape[3])
                return y[ni, :, ii, jj]
            Y = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        elif self.kind == "cols":
            Y = np.moveaxis(y, -2, -1).reshape(-1, y.shape[-2])
        else:
            Y = y.reshape(-1, y.shape[-1]) if y.ndim > 1 else y.reshape(1, -1)
        return Y if pos is None else Y[pos]

    def x_rows(self, x: np.ndarray, pos) -> np.ndarray:
        if self.kind == "conv":
            kh, kw = self.kernel
            view, ho, wo = window_view(x, kh, kw, self.strides, self.pads, self.dilations)
            (sh, sw), (dh, dw) = self.strides, self.dilations
            flat = np.arange(x.shape[0] * ho * wo) if pos is None else pos
            ni, rem = np.divmod(flat, ho * wo)
            ii, jj = np.divmod(rem, wo)
            g = view[ni, :, ii * sh, jj * sw]            # (m, S, eh, ew)
            return np.ascontiguousarray(g[:, :, ::dh, ::dw]).reshape(len(flat), -1)
        if self.kind == "cols":
            X = np.moveaxis(x, -2, -1).reshape(-1, x.shape[-2])
        elif self.kind == "rows_t":
            X = x.T
        else:
            X = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        return X if pos is None else X[pos]
