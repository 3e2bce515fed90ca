"""Streamed input statistics for data-aware factorization (ALGORITHMS.md §4).

* :class:`SecondMoment` – float64 streaming accumulator of E[p pᵀ] and E[p].
* :func:`im2col` – ONNX-order (s, h, w) patches of an NCHW input.
* :class:`ConvInputStats` – per-Conv accumulator: im2col with the conv's own
  pads/strides/dilations, spatial subsampling, bounded memory.

numpy only; no onnx import.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from typing import Callable

__all__ = ["SecondMoment", "im2col", "conv_output_shape", "ConvInputStats"]

# rows converted to float64 at a time inside SecondMoment.update (bounds the temporary)
_CHUNK_ELEMS = 1 << 22


class SecondMoment:
    """Streaming float64 accumulator of Σ = E[p pᵀ] and μ = E[p].

    ``update(X)`` takes a batch of row vectors X (N, D).  An optional scalar
    ``weight`` makes each row count ``weight`` times (used to keep spatially
    subsampled batches correctly weighted).  Memory is O(D²) regardless of
    the number of updates.
    """

    def __init__(self, dim: int | None = None):
        self.dim: int | None = None
        self._S: np.ndarray | None = None
        self._s: np.ndarray | None = None
        self.count: float = 0.0  # total (weighted) number of vectors represented
        self.n_samples: int = 0  # rows actually accumulated
        if dim is not None:
            self._alloc(int(dim))

    def _alloc(self, dim: int) -> None:
        self.dim = dim
        self._S = np.zeros((dim, dim), dtype=np.float64)
        self._s = np.zeros(dim, dtype=np.float64)

    def update(self, X: np.ndarray, weight: float = 1.0) -> "SecondMoment":
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2:
            raise ValueError(f"expected (N, D) batch, got shape {X.shape}")
        if self.dim is None:
            self._alloc(X.shape[1])
        if X.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: got {X.shape[1]}, expected {self.dim}")
        n = X.shape[0]
        if n == 0:
            return self
        if weight <= 0:
            raise ValueError("weight must be > 0")
        step = max(1, _CHUNK_ELEMS // max(self.dim, 1))
        for i in range(0, n, step):
            Xc = np.ascontiguousarray(X[i : i + step], dtype=np.float64)
            G = Xc.T @ Xc  # numpy dispatches this to BLAS syrk
            if weight != 1.0:
                G *= weight
                self._s += weight * Xc.sum(axis=0)
            else:
                self._s += Xc.sum(axis=0)
            self._S += G
        self.count += float(weight) * n
        self.n_samples += n
        return self

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's data into this one (in place); returns self."""
        if other.dim is None or other.count == 0:
            return self
        if self.dim is None:
            self._alloc(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"dimension mismatch: {other.dim} vs {self.dim}")
        self._S += other._S
        self._s += other._s
        self.count += other.count
        self.n_samples += other.n_samples
        return self

    def _require(self) -> None:
        if self.dim is None or self.count == 0:
            raise ValueError("no data accumulated")

    @property
    def sigma(self) -> np.ndarray:
        """E[p pᵀ] (D, D), float64, exactly symmetric."""
        self._require()
        S = self._S / self.count
        return 0.5 * (S + S.T)

    @property
    def mean(self) -> np.ndarray:
        """E[p] (D,), float64."""
        self._require()
        return self._s / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Cov(p) = E[ppᵀ] − μμᵀ (for the centered variant of §4)."""
        mu = self.mean
        return self.sigma - np.outer(mu, mu)


def _pair(v, name: str) -> tuple[int, int]:
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must have 2 entries, got {v}")
    return t


def conv_output_shape(
    h: int,
    w: int,
    kh: int,
    kw: int,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> tuple[int, int]:
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilations, "dilations")
    pt, pl, pb, pr = (int(p) for p in pads)
    ho = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    return ho, wo


def window_view(x, kh, kw, strides, pads, dilations):
    """Return (view, ho, wo) where view[n, s, i, j, a, b] spans the dilated window.

    view has shape (N, S, Ho_full, Wo_full, eh, ew) over the padded input
    (no stride applied yet; eh = (kh−1)·dh + 1).
    """
    if x.ndim != 4:
        raise ValueError(f"expected NCHW input, got shape {x.shape}")
    dh, dw = _pair(dilations, "dilations")
    if len(pads) != 4:
        raise ValueError(f"pads must be [top, left, bottom, right], got {pads}")
    pt, pl, pb, pr = (int(p) for p in pads)
    if min(pt, pl, pb, pr) < 0:
        raise ValueError("negative pads are not supported")
    ho, wo = conv_output_shape(x.shape[2], x.shape[3], kh, kw, strides, pads, dilations)
    if ho < 1 or wo < 1:
        raise ValueError("kernel larger than padded input")
    if pt or pl or pb or pr:
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    view = sliding_window_view(x, (eh, ew), axis=(2, 3))
    return view, ho, wo


def im2col(
    x: np.ndarray,
    kh: int,
    kw: int,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> np.ndarray:
    """Patches of an NCHW input as rows, ONNX Conv semantics.

    Returns (N·H'·W', S·kh·kw); rows are ordered (n, h', w') and columns
    (s, i, j), so ``patches @ K.reshape(T, -1).T`` reshaped to (N, H', W', T)
    is the conv output.  ``pads`` = [top, left, bottom, right] (zeros).
    dtype is preserved.
    """
    x = np.asarray(x)
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilations, "dilations")
    view, ho, wo = window_view(x, kh, kw, strides, pads, dilations)
    v = view[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, ::dh, ::dw]
    # (N, S, Ho, Wo, kh, kw) -> (N, Ho, Wo, S, kh, kw)
    n, s = x.shape[0], x.shape[1]
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, s * kh * kw)


class ConvInputStats:
    """Input second moment of one Conv, accumulated batch by batch.

    ``update(x)`` (x: NCHW activations entering the conv) forms the conv's
    im2col patches and feeds them to a :class:`SecondMoment`.  When a batch
    has more than ``max_positions`` output positions, ``max_positions`` of
    them are drawn uniformly without replacement (seeded RNG) and gathered
    directly, without materializing the full im2col matrix; each kept row is
    weighted by (positions / kept) so batches stay weighted by their size.
    Memory is O(D² + max_positions·D), D = S·kh·kw, whatever the number of
    batches.
    """

    def __init__(
        self,
        kh: int,
        kw: int,
        strides: Sequence[int] = (1, 1),
        pads: Sequence[int] = (0, 0, 0, 0),
        dilations: Sequence[int] = (1, 1),
        max_positions: int | None = 4096,
        seed: int = 0,
    ):
        self.kh, self.kw = int(kh), int(kw)
        self.strides = _pair(strides, "strides")
        self.pads = tuple(int(p) for p in pads)
        self.dilations = _pair(dilations, "dilations")
        if max_positions is not None and max_positions < 1:
            raise ValueError("max_positions must be >= 1 or None")
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        self.moment = SecondMoment()

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The (possibly subsampled) patch rows of one batch; advances the RNG."""
        return self._sample(np.asarray(x))[0]

    def _sample(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        view, ho, wo = window_view(x, self.kh, self.kw, self.strides, self.pads, self.dilations)
        n, s = x.shape[0], x.shape[1]
        total = n * ho * wo
        if self.max_positions is None or total <= self.max_positions:
            sh, sw = self.strides
            dh, dw = self.dilations
            v = view[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, ::dh, ::dw]
            P = np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(total, -1)
            return P, 1.0
        m = self.max_positions
        flat = np.sort(self.rng.choice(total, size=m, replace=False))
        ni, rem = np.divmod(flat, ho * wo)
        ii, jj = np.divmod(rem, wo)
        sh, sw = self.strides
        dh, dw = self.dilations
        # advanced indices separated by a slice -> broadcast dim first: (m, S, eh, ew)
        g = view[ni, :, ii * sh, jj * sw]
        P = np.ascontiguousarray(g[:, :, ::dh, ::dw]).reshape(m, s * self.kh * self.kw)
        return P, total / m

    def update(self, x: np.ndarray) -> "ConvInputStats":
        P, w = self._sample(np.asarray(x))
        self.moment.update(P, weight=w)
        return self

    def merge(self, other: "ConvInputStats") -> "ConvInputStats":
        self.moment.merge(other.moment)
        return self

    @property
    def dim(self) -> int | None:
        return self.moment.dim

    @property
    def sigma(self) -> np.ndarray:
        return self.moment.sigma

    @property
    def mean(self) -> np.ndarray:
        return self.moment.mean

    @property
    def covariance(self) -> np.ndarray:
        return self.moment.covariance

    @property
    def count(self) -> float:
        return self.moment.count


class RowStats:
    """E[x xᵀ] of the rows of 2-D views of a tensor; `view(a)` makes rows (N, D). At most `max_rows` rows
    per batch are kept (uniformly at random, reweighted so batches count by their size)."""

    def __init__(self, view: Callable[[np.ndarray], np.ndarray], max_rows: int | None = 4096, seed: int = 0):
        self.view = view
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)
        self.moment = SecondMoment()

    def update(self, a: np.ndarray) -> None:
        X = self.view(np.asarray(a))
        n = X.shape[0]
        if self.max_rows is not None and n > self.max_rows:
            idx = np.sort(self.rng.choice(n, size=self.max_rows, replace=False))
            self.moment.update(X[idx], weight=n / self.max_rows)
        else:
            self.moment.update(X)

    @property
    def sigma(self) -> np.ndarray:
        return self.moment.sigma

    @property
    def count(self) -> float:
        return self.moment.count


def rows_last(a: np.ndarray) -> np.ndarray:
    """(..., D) → (N, D)."""
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def rows_second_last(a: np.ndarray) -> np.ndarray:
    """(..., D, n) → (N, D): columns of the last two dims are the vectors (Wm @ X)."""
    if a.ndim < 2:
        return a.reshape(1, -1)
    return np.moveaxis(a, -2, -1).reshape(-1, a.shape[-2])


def rows_channels(a: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) → (N·spatial, C)."""
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
