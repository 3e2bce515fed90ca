"""EVBMF rank selection (Nakajima et al. 2012/2013) and MUSCO rank weakening.

Pure numpy/scipy; no ONNX imports.  Implements ALGORITHMS.md §3.

Mode convention for Tucker2 (ALGORITHMS §1.2/§1.3), kernel K of shape
``(T, S, kh, kw)`` (ONNX ``W``: out x in x kH x kW):

* ``r4`` <-> output channels ``T``: EVBMF rank of ``unfold0(K)`` (T x S*K);
* ``r3`` <-> input channels ``S``:  EVBMF rank of ``unfold1(K)`` (S x T*K).

:func:`tucker2_vbmf_ranks` returns ``(r3, r4)``, i.e. (input side, output
side).  A kernel built as ``G x1 U_T x2 U_S`` with ``G`` of shape
``(20, 24, kh, kw)`` (mode-0 rank 20, mode-1 rank 24) gives ``(24, 20)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EVBMFResult",
    "evbmf",
    "weaken_rank",
    "tucker2_vbmf_ranks",
    "svd_vbmf_rank",
    "unfold",
]

# Constant of the EVBMF threshold (Nakajima et al. 2013, Eq. (32)): tau_bar = 2.5129 sqrt(alpha).
_TAU_BAR_CONST = 2.5129


@dataclass
class EVBMFResult:
    """Result of :func:`evbmf`.

    rank            number of singular values strictly above ``threshold``.
    sigma2          noise variance (estimated, or the one passed in), in the
                    units of ``Y`` (per entry).
    threshold       singular-value threshold sqrt(M sigma2 (1+tau)(1+alpha/tau)).
    singular_values all min(L, M) singular values of ``Y``, descending.
    shrunk          EVB posterior-mean singular values, same length as
                    ``singular_values``; zero beyond ``rank``.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    shrunk: np.ndarray


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding, remaining modes flattened in C order (tensorly convention)."""
    tensor = np.asarray(tensor)
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _omega(sigma2: float, L: int, M: int, s2: np.ndarray, residual: float, xubar: float) -> float:
    """EVB free energy Omega(sigma2) of ALGORITHMS §3 (up to constants)."""
    H = s2.size
    alpha = L / M
    x = s2 / (M * sigma2)
    big = x > xubar
    z1 = x[big]
    z2 = np.maximum(x[~big], 1e-300)  # exact zeros (noise-free low rank) -> large finite term
    tau_z1 = _tau(z1, alpha)
    obj = np.sum(z2 - np.log(z2))
    obj += np.sum(z1 - tau_z1)
    obj += np.sum(np.log((tau_z1 + 1.0) / z1))
    obj += alpha * np.sum(np.log(tau_z1 / alpha + 1.0))
    obj += residual / (M * sigma2) + (L - H) * math.log(sigma2)
    return float(obj)


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Empirical variational Bayes matrix factorisation (ALGORITHMS §3).

    ``Y`` is transposed when L > M so that L <= M (rank and singular values are
    orientation independent).  When ``sigma2`` is None it is estimated as the
    minimiser of Omega over [sigma2_lo, sigma2_hi] with scipy's bounded
    ``minimize_scalar``.  Implementation notes:

    * the search runs on Y rescaled so that sigma2_hi == 1 with a tight
      ``xatol`` (scipy's default absolute tolerance 1e-5 would be far too
      coarse for typical conv weights of magnitude 1e-2);
    * Omega is minimised both over sigma2 and over log(sigma2) on the same
      bounds, and the better of the two is kept.  Both are the same argmin
      problem; the log search only helps when sigma2_lo << sigma2_hi
      (near noise-free low-rank input), where a linear golden-section search
      cannot resolve the minimum close to the lower bound.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"evbmf expects a 2-D matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    if L == 0:
        raise ValueError("evbmf: empty matrix")
    H = L
    alpha = L / M
    tau_bar = _TAU_BAR_CONST * math.sqrt(alpha)
    xubar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    s = np.linalg.svd(Y, compute_uv=False)
    s2 = s * s
    total = float(np.sum(Y * Y))
    residual = max(total - float(np.sum(s2)), 0.0) if H < L else 0.0  # 0 when H == L (always here)

    if sigma2 is None:
        upper = (float(np.sum(s2)) + residual) / (L * M)
        if not upper > 0.0:  # all-zero matrix
            return EVBMFResult(0, 0.0, 0.0, s, np.zeros_like(s))
        h_hat = min(int(math.ceil(L / (1.0 + alpha))) - 1, H)
        tail = s2[h_hat:]
        lower = max(float(tail[0]) / (M * xubar) if tail.size else 0.0,
                    float(np.mean(tail)) / M if tail.size else 0.0)
        # Normalise so that upper == 1; Omega changes only by a constant.
        scale = upper
        s2n = s2 / scale
        resn = residual / scale
        # Numerical floor: singular values below the usual matrix_rank tolerance
        # (s_max * max(L, M) * eps) are round-off, so sigma2 cannot be smaller than
        # tol^2 / M.  Only matters for (near) noise-free input; without it an exact
        # rank-r matrix gets a rank far above r from round-off "signal".
        tol = float(s[0]) * max(L, M) * np.finfo(np.float64).eps
        lo = max(lower, tol * tol / M) / scale
        hi = 1.0
        if not lo > 0.0:
            lo = 1e-12
        if lo >= hi:  # degenerate bounds (can only happen for tiny/odd inputs)
            sig_n = hi
        else:
            # imported here: scipy.optimize costs 23 MB of resident memory at import, for every run
            from scipy.optimize import minimize_scalar

            f = lambda v: _omega(v, L, M, s2n, resn, xubar)  # noqa: E731
            r_lin = minimize_scalar(f, bounds=(lo, hi), method="bounded",
                                    options={"xatol": 1e-10, "maxiter": 1000})
            g = lambda t: _omega(math.exp(t), L, M, s2n, resn, xubar)  # noqa: E731
            r_log = minimize_scalar(g, bounds=(math.log(lo), math.log(hi)), method="bounded",
                                    options={"xatol": 1e-10, "maxiter": 1000})
            cands = [(float(r_lin.fun), float(r_lin.x)), (float(r_log.fun), math.exp(float(r_log.x)))]
            sig_n = min(cands)[1]
        sigma2 = sig_n * scale
    else:
        sigma2 = float(sigma2)
        if not sigma2 > 0.0:
            raise ValueError("sigma2 must be positive")

    threshold = math.sqrt(M * sigma2 * xubar)
    rank = int(np.sum(s > threshold))

    shrunk = np.zeros_like(s)
    if rank:
        sp = s[:rank]
        a = 1.0 - (L + M) * sigma2 / sp**2
        disc = np.maximum(a * a - 4.0 * L * M * sigma2**2 / sp**4, 0.0)
        shrunk[:rank] = sp / 2.0 * (a + np.sqrt(disc))
    return EVBMFResult(rank=rank, sigma2=float(sigma2), threshold=float(threshold),
                       singular_values=s, shrunk=shrunk)


def weaken_rank(full: int, evbmf_rank: int, weakening: float, r_min: int = 8) -> int:
    """MUSCO weakened rank: max(floor(full - w (full - evbmf_rank)), r_min).

    ``w = 0`` keeps ``full``; ``w = 1`` gives ``max(evbmf_rank, r_min)``.
    Returns ``full`` unchanged when ``full <= r_min`` or ``evbmf_rank == 0``
    (EVBMF found no signal: that says "noise-like", not "rank 0").  The result
    never exceeds ``full``.
    """
    full = int(full)
    evbmf_rank = int(evbmf_rank)
    if not 0.0 <= weakening <= 1.0:
        raise ValueError(f"weakening must be in [0, 1], got {weakening}")
    if full < 1 or evbmf_rank < 0:
        raise ValueError("full must be >= 1 and evbmf_rank >= 0")
    if full <= r_min or evbmf_rank == 0:
        return full
    evbmf_rank = min(evbmf_rank, full)
    r = math.floor(full - weakening * (full - evbmf_rank) + 1e-9)  # guard 0.3*40 = 12.000000000000002
    return int(min(max(r, r_min), full))


def tucker2_vbmf_ranks(kernel: np.ndarray, weakening: float = 1.0, r_min: int = 8) -> tuple[int, int]:
    """(r3, r4) for Tucker2 of a conv kernel ``(T, S, kh, kw)`` (or ``(T, S, K)``).

    r4 (output channels T) = weaken(T, EVBMF(unfold0(K)).rank),
    r3 (input channels S)  = weaken(S, EVBMF(unfold1(K)).rank).
    For 2-D weights use :func:`svd_vbmf_rank`.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim == 2:
        raise ValueError("tucker2_vbmf_ranks needs a conv kernel (T, S, ...); use svd_vbmf_rank for 2-D weights")
    if kernel.ndim < 3:
        raise ValueError(f"expected a (T, S, kh, kw) kernel, got shape {kernel.shape}")
    T, S = kernel.shape[0], kernel.shape[1]
    r4 = weaken_rank(T, evbmf(unfold(kernel, 0)).rank, weakening, r_min)
    r3 = weaken_rank(S, evbmf(unfold(kernel, 1)).rank, weakening, r_min)
    return r3, r4


def svd_vbmf_rank(W: np.ndarray, weakening: float = 1.0, r_min: int = 8) -> int:
    """Weakened EVBMF rank of a 2-D weight (Gemm/MatMul, or a squeezed 1x1 conv); full = min(W.shape)."""
    W = np.asarray(W)
    if W.ndim != 2:
        W = W.reshape(W.shape[0], -1)
    return weaken_rank(min(W.shape), evbmf(W).rank, weakening, r_min)
