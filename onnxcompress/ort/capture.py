"""Intermediate tensors through ONNX Runtime — the one place the package captures them.

`tap(model, tensors)` is a session on a copy of `model` whose graph outputs include `tensors`; calling it on a
feed returns their values. `capture(model, requests, feeds)` streams batches through taps and folds each
requested tensor into its accumulators (objects with `.update(array)`), batch by batch, so memory stays bounded
by the accumulators and one batch of captured tensors; tensors are split into groups (one pass over the data per
group) when one batch of them would exceed `max_capture_mb`. Used by the CP activation ranges and the sensitivity
sweeps (the data-aware pass streams through ort.frontier)."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from ..ir.shapes import infer_value_shapes
from .session import make_session

FeedsFactory = Callable[[], Iterable[dict]]


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include `tensors` (graph inputs are not outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    inputs = {i.name for i in m.graph.input}
    for t in dict.fromkeys(tensors):
        if t not in have and t not in inputs:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    return m


class Tap:
    """`Tap(model, tensors)(feed) -> {tensor: value}`; graph inputs among `tensors` are taken from the feed."""

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[str], threads: int | None = None,
                 optimize: bool = True):
        self.tensors = list(dict.fromkeys(tensors))
        inputs = {i.name for i in model.graph.input}
        self._outs = [t for t in self.tensors if t not in inputs]
        self.session = make_session(with_outputs(model, self._outs), "cpu", threads=threads, optimize=optimize)

    def __call__(self, feed: dict) -> dict[str, np.ndarray]:
        vals = dict(zip(self._outs, self.session.run(self._outs, feed))) if self._outs else {}
        return {t: (vals[t] if t in vals else feed[t]) for t in self.tensors}


def _tensor_bytes(shape) -> int:
    return 4 * 2**20 if not shape else 4 * int(np.prod(shape))


def capture(model: onnx.ModelProto, requests: dict[str, list], feeds: FeedsFactory,
            shapes: dict[str, tuple[int, ...]] | None = None, max_capture_mb: float = 512.0,
            max_outputs: int = 64, progress=None, label: str = "capturing") -> dict:
    """Stream `feeds()` through `model` on ORT CPU and feed each requested tensor, batch by batch, to its
    accumulators: `requests` = {tensor name: [accumulator with .update(array)]}. Returns facts (groups,
    batches, tensors, seconds). Raises ValueError when `feeds()` yields nothing."""
    from ..decompose._blas import one_blas_thread

    t0 = time.perf_counter()
    vshapes = infer_value_shapes(model, shapes) if shapes else {}
    groups: list[list[str]] = []
    cur, cur_bytes = [], 0
    cap = max_capture_mb * 2**20
    for t in requests:
        b = _tensor_bytes(vshapes.get(t))
        if cur and (cur_bytes + b > cap or len(cur) >= max_outputs):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += b
    if cur:
        groups.append(cur)
    n_batches = 0
    for gi, group in enumerate(groups):
        tap = Tap(model, group)
        if progress:
            progress(f"{label}: {len(group)} tensors (group {gi + 1}/{len(groups)})")
        n_batches = 0
        for feed in feeds():
            vals = tap(feed)
            with one_blas_thread():
                for t in group:
                    for acc in requests[t]:
                        acc.update(vals[t])
            n_batches += 1
        del tap
        if n_batches == 0:
            raise ValueError("no calibration batches")
    return {"groups": len(groups), "batches": n_batches, "tensors": len(requests),
            "seconds": round(time.perf_counter() - t0, 3)}


class ChannelRange:
    """Accumulator: per-channel (axis 1) min and max over every batch."""

    def __init__(self):
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, a: np.ndarray) -> None:
        a = np.moveaxis(np.asarray(a, dtype=np.float64), 1, 0).reshape(a.shape[1], -1)
        mn, mx = a.min(axis=1), a.max(axis=1)
        self.lo = mn if self.lo is None else np.minimum(self.lo, mn)
        self.hi = mx if self.hi is None else np.maximum(self.hi, mx)


def channel_ranges(model: onnx.ModelProto, tensors: Sequence[str], feeds: FeedsFactory
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (axis 1) min and max of `tensors` over all batches of `feeds()`, measured on ORT CPU."""
    accs = {t: ChannelRange() for t in tensors}
    capture(model, {t: [a] for t, a in accs.items()}, feeds)
    return {t: (a.lo, a.hi) for t, a in accs.items()}


class TensorRange:
    """Accumulator: the global min and max of a tensor over every batch (what ORT's MinMax calibration keeps)."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.size:
            self.lo, self.hi = min(self.lo, float(a.min())), max(self.hi, float(a.max()))


def tensor_ranges(model: onnx.ModelProto, tensors: Sequence[str], feeds: FeedsFactory,
                  shapes: dict | None = None) -> dict[str, tuple[float, float]]:
    """Global (min, max) of `tensors` over all batches of `feeds()`, streamed (one batch of captured tensors in
    memory at a time)."""
    accs = {t: TensorRange() for t in dict.fromkeys(tensors)}
    capture(model, {t: [a] for t, a in accs.items()}, feeds, shapes, label="activation ranges")
    return {t: (a.lo, a.hi) for t, a in accs.items() if np.isfinite(a.lo)}


# ------------------------------------------------------------------------------------------ INT8 calibration
def default_calibration_ops() -> list[str]:
    """The op types ORT's quantize_static calibrates when it is given none (its own default)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return list(set(list(QLinearOpsRegistry.keys()) + list(QDQRegistry.keys())))


def tensors_to_calibrate(model_path, op_types: Sequence[str] | None = None) -> tuple[list[str], onnx.ModelProto]:
    """The tensors ORT's calibrator would calibrate for the model file at `model_path` (the same shape
    inference, ORT's own selection code), in graph order, and the shape-inferred graph (weights not loaded)."""
    from pathlib import Path
    from types import SimpleNamespace

    from onnxruntime.quantization.calibrate import CalibraterBase

    from ..ir.modelio import load_graph

    model_path = Path(model_path)
    inferred = model_path.with_name(model_path.stem + ".calib-inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
    try:
        g = load_graph(inferred)
    finally:
        inferred.unlink(missing_ok=True)
    ops = list(op_types) if op_types else default_calibration_ops()
    names, _ = CalibraterBase.select_tensors_to_calibrate(SimpleNamespace(op_types_to_calibrate=ops), g)
    order: dict[str, int] = {i.name: -1 for i in g.graph.input}
    for n in g.graph.node:
        for x in list(n.input) + list(n.output):
            order.setdefault(x, len(order))
    return sorted(names, key=lambda x: order.get(x, 1 << 30)), g


def _with_reducers(g: onnx.ModelProto, names: list[str]) -> list[str]:
    """Add a ReduceMin and a ReduceMax output for each of `names` to `g`, each placed right after the node
    that produces the tensor (graph inputs: first). Returns the new outputs, (min, max) per name."""
    from onnx import helper

    vi = {v.name: v for v in list(g.graph.value_info) + list(g.graph.input) + list(g.graph.output)}
    outs, reducers = [], {}
    for i, name in enumerate(names):
        et = vi[name].type.tensor_type.elem_type
        for op in ("ReduceMin", "ReduceMax"):
            o = f"__onnxcompress_{op}_{i}"
            reducers.setdefault(name, []).append(helper.make_node(op, [name], [o], keepdims=0, name=o))
            g.graph.output.append(helper.make_tensor_value_info(o, et, []))
            outs.append(o)
    nodes = [r for i in g.graph.input for r in reducers.pop(i.name, [])]
    for n in g.graph.node:
        nodes.append(n)
        for o in n.output:
            nodes.extend(reducers.pop(o, []))
    nodes.extend(r for rs in reducers.values() for r in rs)
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    return outs


def minmax_ranges(model_path, batches: Iterable[dict], op_types: Sequence[str] | None = None,
                  symmetric: bool = False, threads: int | None = None, progress=None):
    """ORT's MinMax calibration (a ``TensorsData``, bit-identical to ``MinMaxCalibrater``'s), in one streamed pass.

    `model_path`: a model file (external weights are read by ORT from their file, never by Python); `batches`:
    an iterable of feeds. Each tensor ORT would calibrate gets a ReduceMin and a ReduceMax output, placed right
    after its producer in a graph-only copy written beside the model; the session runs the nodes in that order
    (PRIORITY_BASED: ORT's default order is a DFS from the outputs, which would run the whole network before
    the first reducer and keep every activation alive: +271 MB vs +71 MB on ResNet-50) and unoptimised, as
    ORT's calibrator runs (optimised, ranges move by an ulp). Per batch only the scalars come back and are
    folded into a running min/max (``np.fmin``/``np.fmax``: NaNs ignored like ORT's ``nanmin``)."""
    from pathlib import Path

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    model_path = Path(model_path)
    names, g = tensors_to_calibrate(model_path, op_types)
    outs = _with_reducers(g, names)
    aug = model_path.with_name(model_path.stem + ".calib-aug.onnx")
    onnx.save_model(g, str(aug))
    del g
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # weight pre-packing stays on although it copies the weights of Gemm/MatMul (a VGG-16 classifier: +400 MB):
    # without it a Gemm's output moves by an ulp (ResNet-50's logits, measured) and the ranges are no longer ORT's
    if threads:
        so.intra_op_num_threads = threads
    lo: list = [None] * len(names)
    hi: list = [None] * len(names)
    n = 0
    try:
        sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        for feeds in batches:
            res = sess.run(outs, feeds)
            for i in range(len(names)):
                a, b = res[2 * i], res[2 * i + 1]
                lo[i] = a if lo[i] is None else np.fmin(lo[i], a)
                hi[i] = b if hi[i] is None else np.fmax(hi[i], b)
            n += 1
            if progress and n % 8 == 0:
                progress(f"INT8 calibration: {n} batches")
        del sess
    finally:
        aug.unlink(missing_ok=True)
    if n == 0:
        raise ValueError("no calibration data")
    data = {}
    for name, a, b in zip(names, lo, hi):
        a, b = np.asarray(a).reshape(1), np.asarray(b).reshape(1)
        if symmetric:
            m = np.fmax(np.abs(a), np.abs(b))
            a, b = -m, m
        data[name] = (a, b)
    return TensorsData(CalibrationMethod.MinMax, data)


def reader_batches(reader) -> Iterable[dict]:
    """An ORT CalibrationDataReader as an iterator of feeds."""
    while True:
        x = reader.get_next()
        if not x:
            return
        yield x
