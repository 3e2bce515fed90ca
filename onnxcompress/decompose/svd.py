"""Truncated SVD for Gemm/MatMul weights and 1x1 convs (ALGORITHMS.md §6).

Convention: ``W`` is (out, in) and acts as ``y = W @ x``.  A rank-``r``
factorization is returned as ``W ≈ A @ B`` with ``B`` (r, in) applied first
and ``A`` (out, r) second, i.e. ``y ≈ A @ (B @ x)``.

Both factorizations split the kept singular values as Σ^½ on each side, so
the two factors have equal per-rank-component norms (balanced ranges for
INT8 quantization).

Data-aware variant (SVD-LLM whitening): with the input second moment
Σ = E[x xᵀ] (plus a small ridge) = L Lᵀ, the truncated SVD of ``W L`` gives
the rank-r ``Ŵ`` that minimizes E‖(W − Ŵ)x‖² (Eckart–Young in the output
norm).  numpy/scipy only; no onnx import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

__all__ = [
    "SVDResult",
    "svd_factor",
    "whitened_svd",
    "svd_rank_for_ratio",
    "regularized_cholesky",
    "sigma_output_rel_error",
]


@dataclass
class SVDResult:
    """``W ≈ A @ B``; apply ``B`` first (in→r), then ``A`` (r→out)."""

    A: np.ndarray  # (out, r)  second factor
    B: np.ndarray  # (r, in)   first factor
    rank: int
    rel_error: float  # weight space ‖W − AB‖_F / ‖W‖_F
    output_rel_error: float | None = None  # ‖(W − AB)L‖/‖WL‖ under Σ = LLᵀ, when Σ given
    eps_used: float | None = None  # ridge actually used for the Cholesky (whitened only)

    def reconstruct(self) -> np.ndarray:
        return self.A @ self.B


# --------------------------------------------------------------------------- helpers


def regularized_cholesky(
    sigma: np.ndarray, eps: float = 1e-6, max_eps: float = 1e-1
) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``Σ + ε·tr(Σ)/D·I`` (ALGORITHMS §4).

    The ridge is relative to the mean eigenvalue.  If the factorization
    fails (Σ not PSD to working precision, e.g. rank-deficient statistics),
    ε is grown by 10× up to ``max_eps``.  Returns ``(L, eps_used)``.
    A zero (or non-finite-trace) Σ raises ``ValueError``.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be square, got {sigma.shape}")
    d = sigma.shape[0]
    sym = 0.5 * (sigma + sigma.T)
    scale = float(np.trace(sym)) / d
    if not np.isfinite(scale) or scale <= 0.0:
        raise ValueError("sigma has non-positive or non-finite trace")
    e = float(eps)
    while True:
        c = sym.copy()
        c[np.diag_indices(d)] += e * scale
        try:
            return sla.cholesky(c, lower=True, check_finite=False), e
        except np.linalg.LinAlgError:
            if e >= max_eps:
                raise
            e = min(max(e * 10.0, 1e-12), max_eps)


def sigma_output_rel_error(
    W: np.ndarray, W_hat: np.ndarray, sigma: np.ndarray, eps: float = 0.0
) -> float:
    """sqrt(tr(E Σ Eᵀ) / tr(W Σ Wᵀ)) with E = W − Ŵ and Σ + ε·tr(Σ)/D·I.

    This equals ‖(W − Ŵ)L‖/‖WL‖ for Σ = LLᵀ and needs no factorization.
    Rows of W are outputs, columns match Σ's index.
    """
    W = np.asarray(W, dtype=np.float64)
    E = W - np.asarray(W_hat, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    d = sigma.shape[0]
    ridge = eps * float(np.trace(sigma)) / d if eps else 0.0
    num = float(np.sum((E @ sigma) * E)) + ridge * float(np.sum(E * E))
    den = float(np.sum((W @ sigma) * W)) + ridge * float(np.sum(W * W))
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def _check_rank(W: np.ndarray, rank: int) -> int:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {W.shape}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return min(rank, min(W.shape))


# --------------------------------------------------------------------------- API


_GRAM_MIN = 64   # from this size on, the eigh of the small Gram matrix is ~4x faster than a full SVD


def _gram_factors(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ and all singular values, from the eigendecomposition of the smaller
    Gram matrix (measured 0.05 s vs 0.24 s for a 2048×512 SVD). Directions with a negligible singular value
    carry nothing (W v ≈ 0) and get zero factors."""
    tall = W.shape[0] >= W.shape[1]
    G = W.T @ W if tall else W @ W.T
    lam, Q = np.linalg.eigh(G)
    lam, Q = lam[::-1], Q[:, ::-1]
    s = np.sqrt(np.clip(lam, 0.0, None))
    Qr, sr = Q[:, :r], s[:r]
    keep = sr > sr[0] * 1e-10 if r else sr > 0
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, sr, 1.0)), 0.0)
    sq = np.sqrt(sr) * keep
    if tall:   # Q = V: A = W V Σ^-½ (= U Σ^½), B = Σ^½ Vᵀ
        A = (W @ Qr) * inv_sqrt
        B = sq[:, None] * Qr.T
    else:      # Q = U: A = U Σ^½, B = Σ^-½ Uᵀ W (= Σ^½ Vᵀ)
        A = Qr * sq
        B = inv_sqrt[:, None] * (Qr.T @ W)
    return A, B, s


def svd_factor(W: np.ndarray, rank: int, sigma: np.ndarray | None = None) -> SVDResult:
    """Plain truncated SVD, ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``.

    ``rank`` is clamped to min(out, in).  If ``sigma`` (in×in input second
    moment) is given, ``output_rel_error`` is filled in for comparison with
    :func:`whitened_svd`.  Computation is float64; factors are float64.
    """
    W = np.asarray(W, dtype=np.float64)
    r = _check_rank(W, rank)
    if min(W.shape) >= _GRAM_MIN:
        A, B, s = _gram_factors(W, r)
    else:
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        sq = np.sqrt(s[:r])
        A = U[:, :r] * sq
        B = sq[:, None] * Vt[:r]
    total = float(np.sum(s * s))
    tail = float(np.sum(s[r:] * s[r:]))
    rel = math.sqrt(tail / total) if total > 0 else 0.0
    out_err = None
    if sigma is not None:
        out_err = sigma_output_rel_error(W, A @ B, sigma)
    return SVDResult(A=A, B=B, rank=r, rel_error=rel, output_rel_error=out_err)


def whitened_svd(
    W: np.ndarray, rank: int, sigma: np.ndarray, eps: float = 1e-6
) -> SVDResult:
    """SVD-LLM whitened truncation, optimal in E‖(W − AB)x‖² for E[xxᵀ] = Σ.

    C = Σ + ε·tr(Σ)/D·I = LLᵀ (ε grown on Cholesky failure); SVD of W L,
    truncate to r; ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ L⁻¹`` (triangular
    solve, L is never inverted).  ``output_rel_error`` is measured under the
    given (unregularized) Σ, like :func:`svd_factor` with ``sigma``.
    """
    W = np.asarray(W, dtype=np.float64)
    r = _check_rank(W, rank)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"sigma must be ({W.shape[1]}, {W.shape[1]}), got {sigma.shape}")
    L, eps_used = regularized_cholesky(sigma, eps)
    WL = W @ L
    U, s, Vt = np.linalg.svd(WL, full_matrices=False)
    sq = np.sqrt(s[:r])
    A = U[:, :r] * sq
    M = sq[:, None] * Vt[:r]  # (r, in) = S^½ Vᵀ ; B = M L⁻¹  ⇔  Lᵀ Bᵀ = Mᵀ
    B = sla.solve_triangular(L, M.T, lower=True, trans="T", check_finite=False).T
    W_hat = A @ B
    wn = float(np.linalg.norm(W))
    rel = float(np.linalg.norm(W - W_hat)) / wn if wn > 0 else 0.0
    out_err = sigma_output_rel_error(W, W_hat, sigma)
    return SVDResult(A=A, B=B, rank=r, rel_error=rel, output_rel_error=out_err, eps_used=eps_used)


def svd_rank_for_ratio(out: int, inp: int, ratio: float) -> int | None:
    """Rank giving a parameter compression ``ratio`` = P₀ / P_svd (≥ 1 compresses).

    r = floor(out·in / (ratio·(out + in))); ``None`` when r < 1.  The result
    is also clamped to min(out, in) (only matters for ratio < 1).
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    out, inp = int(out), int(inp)
    if out < 1 or inp < 1:
        return None
    r = math.floor(out * inp / (ratio * (out + inp)) + 1e-9)
    if r < 1:
        return None
    return min(r, out, inp)
