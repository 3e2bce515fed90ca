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
