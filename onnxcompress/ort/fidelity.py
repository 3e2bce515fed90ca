"""Fidelity of an optimized model against its original, streamed over batches: top-1/top-5 agreement, SQNR,
cosine similarity, max abs diff, accuracy when labels are known."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from .session import make_session


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(a64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den > 0 else num


@dataclass
class Fidelity:
    samples: int = 0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_diff: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_drop: float | None = None
    output_std_before: float | None = None   # mean over output elements of their std across samples
    output_std_after: float | None = None
    output_max_abs_after: float | None = None
    provider: str = "cpu"
    data: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class FidelityAccumulator:
    """Streams output pairs (reference, candidate) and labels into fidelity metrics."""

    def __init__(self):
        self.n = 0
        self.sig = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.agree1 = 0
        self.agree5 = 0
        self.cos_sum = 0.0
        self.classes = True
        self.correct_ref = 0
        self.correct_new = 0
        self.labelled = 0
        self.moments = None          # per output element: sum and sum of squares, original and candidate
        self.new_max = 0.0

    def update(self, ref: np.ndarray, new: np.ndarray, labels: np.ndarray | None = None) -> None:
        ref = np.asarray(ref, np.float64)
        new = np.asarray(new, np.float64)
        n = ref.shape[0] if ref.ndim else 1
        self.n += n
        self.sig += float(np.sum(ref * ref))
        self.noise += float(np.sum((ref - new) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - new))) if ref.size else 0.0)
        r2, n2 = ref.reshape(n, -1), new.reshape(n, -1)
        if r2.shape[1] <= 1 << 16:   # degenerate-output check (bounded memory: one vector per moment)
            m = np.stack([r2.sum(0), (r2 * r2).sum(0), n2.sum(0), (n2 * n2).sum(0)])
            self.moments = m if self.moments is None or self.moments.shape != m.shape else self.moments + m
        self.new_max = max(self.new_max, float(np.max(np.abs(new))) if new.size else 0.0)
        den = np.linalg.norm(r2, axis=1) * np.linalg.norm(n2, axis=1)
        self.cos_sum += float(np.sum(np.where(den > 0, np.sum(r2 * n2, axis=1) / np.maximum(den, 1e-300), 1.0)))
        if ref.ndim != 2 or ref.shape[1] < 2:
            self.classes = False
            return
        t1r, t1n = ref.argmax(1), new.argmax(1)
        self.agree1 += int(np.sum(t1r == t1n))
        k = min(5, ref.shape[1])
        top5n = np.argpartition(-new, k - 1, axis=1)[:, :k]
        self.agree5 += int(np.sum(np.any(top5n == t1r[:, None], axis=1)))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            self.labelled += n
            self.correct_ref += int(np.sum(t1r == labels))
            self.correct_new += int(np.sum(t1n == labels))

    def result(self, provider: str = "cpu", data: str = "") -> Fidelity:
        f = Fidelity(samples=self.n, provider=provider, data=data)
        if self.n == 0:
            return f
        f.sqnr_db = (math.inf if self.noise == 0 else 10 * math.log10(self.sig / self.noise)) if self.sig > 0 else None
        if f.sqnr_db == math.inf:
            f.sqnr_db = 999.0
        f.max_abs_diff = self.max_abs
        f.cosine = self.cos_sum / self.n
        f.output_max_abs_after = self.new_max
        if self.moments is not None and self.n > 1:
            mean = self.moments / self.n
            f.output_std_before = float(np.mean(np.sqrt(np.maximum(mean[1] - mean[0] ** 2, 0.0))))
            f.output_std_after = float(np.mean(np.sqrt(np.maximum(mean[3] - mean[2] ** 2, 0.0))))
        if self.classes:
            f.top1_agreement = self.agree1 / self.n
            f.top5_agreement = self.agree5 / self.n
        if self.labelled:
            f.accuracy_before = self.correct_ref / self.labelled
            f.accuracy_after = self.correct_new / self.labelled
            f.accuracy_drop = f.accuracy_before - f.accuracy_after
        return f


def feeds_for(batch_inputs, input_names: list[str]) -> dict:
    if isinstance(batch_inputs, dict):
        return batch_inputs
    return {input_names[0]: np.ascontiguousarray(batch_inputs, dtype=np.float32)}


def fidelity(reference, candidate, batches: Iterable, provider: str = "cpu", data: str = "",
             output_index: int = 0) -> Fidelity:
    """Compare two sessions (or models) on streamed (inputs, labels) batches; `output_index` picks the
    output compared (the first by default)."""
    ref = reference if hasattr(reference, "run") else make_session(reference, provider)
    new = candidate if hasattr(candidate, "run") else make_session(candidate, provider)
    names = [i.name for i in ref.get_inputs()]
    acc = FidelityAccumulator()
    for inputs, labels in batches:
        feeds = feeds_for(inputs, names)
        a = ref.run(None, feeds)[output_index]
        b = new.run(None, feeds)[output_index]
        acc.update(a, b, labels)
    return acc.result(provider, data)


def fidelity_sequential(reference, candidate, batches_factory, provider: str = "cpu", data: str = "",
                        output_index: int = 0, max_kept_mb: float = 256.0) -> Fidelity:
    """:func:`fidelity` with one model in memory at a time: the reference (a path or a ModelProto) runs over
    `batches_factory()` first and its compared outputs are kept (logits: small), its session is dropped, then
    the candidate runs over `batches_factory()` again. Sessions are lean (evaluation, not timing: no weight
    pre-packing, no arena; measured as fast here). Once the kept outputs pass `max_kept_mb`, the remaining
    batches are compared with both sessions alive. Same metrics, same order, as :func:`fidelity`."""
    from .session import model_nbytes, release_memory

    nbytes = max(model_nbytes(m) for m in (reference, candidate))
    ref = make_session(reference, provider, lean=True)
    names = [i.name for i in ref.get_inputs()]
    kept, size, overflow = [], 0, False
    for inputs, _ in batches_factory():
        a = ref.run(None, feeds_for(inputs, names))[output_index]
        kept.append(a)
        size += a.nbytes
        if size > max_kept_mb * 2**20:
            overflow = True
            break
    if not overflow:
        del ref
        release_memory(nbytes)
    new = make_session(candidate, provider, lean=True)
    acc = FidelityAccumulator()
    for i, (inputs, labels) in enumerate(batches_factory()):
        feeds = feeds_for(inputs, names)
        a = kept[i] if i < len(kept) else ref.run(None, feeds)[output_index]
        acc.update(a, new.run(None, feeds)[output_index], labels)
    del new
    ref = None
    release_memory(nbytes)
    return acc.result(provider, data)
