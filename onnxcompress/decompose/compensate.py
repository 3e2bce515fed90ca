"""Error-compensating, damped data-aware factorization of one layer (ALGORITHMS.md §4, sequential variant).

The layer y = W x + b of the original model is replaced by a factorized Ŵ (rank-r SVD A·B, or a Tucker2
kernel) with bias b̂. Rows come from two models run on the same calibration inputs:

* x̃: the layer's input in the model *as compressed so far* (earlier layers already factorized),
* y:  the layer's output in the *original* model (the target; BN already folded into W, b).

Objective (one layer, N rows, δ = λ·mean(diag Σ̃)):

    min_{Ŵ structured, b̂}  (1/N) Σ‖y − Ŵ x̃ − b̂‖²  +  δ‖Ŵ − W‖²_F

* centred (b̂ free): b̂ = μ_y − Ŵ μ_x̃, and with Σ̃ = Cov(x̃), C_yx = Cov(y, x̃), C = Σ̃ + δI = LLᵀ the
  objective is ‖(Ŵ − M*)L‖²_F + const, M* = (C_yx + δW) C⁻¹. The bias correction of §4 is the special
  case x̃ = x: b̂ = b + (W − Ŵ)μ.
* uncentred (no bias slot, or b̂ = b kept): the same with raw moments of x̃ and y − b.

So any Σ-norm factorizer applies unchanged: whitened SVD of M* under C (reduced-rank ridge regression,
jointly optimal in A and B: no separate refit of the last factor is needed), Σ-Tucker2 of M* under C.
λ → ∞ gives the plain factors of W; λ → 0 the undamped least-squares fit. With x̃ = x and λ > 0,
M* = W and this is SVD-LLM / Σ-Tucker2 with the damping Σ + δI of GPTQ.

Every candidate (plain, plain + bias correction, one per λ) is scored on *held-out* rows (moments of
rows the fit never saw), :func:`choose`; the plain factors win ties, so a data-aware step is kept only
when it lowers the measured held-out output error.

numpy/scipy only; no onnx import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

__all__ = [
    "LAMBDAS",
    "Candidate",
    "Choice",
    "CrossMoment",
    "HeldOutRows",
    "Regression",
    "apply_factors",
    "choose",
    "damped_target",
    "heldout_mse",
    "svd_candidates",
    "tucker2_candidates",
]

#: default damping grid (relative to mean(diag Σ̃)); chosen per layer on held-out rows
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)

_CHUNK = 4096


class CrossMoment:
    """Streaming moments of paired rows (x ∈ R^D, y ∈ R^T): Σ x xᵀ, Σ x yᵀ, Σ‖y‖², Σ x, Σ y (float64
    accumulators; each chunk's products are formed in `dtype`, float32 by default: twice as fast and
    well inside the damping). Memory O(D² + D·T)."""

    def __init__(self, dtype=np.float32):
        self.dtype = dtype
        self.Sxx = self.Sxy = self.sx = self.sy = None
        self.syy = 0.0
        self.count = 0.0
        self.rows = 0

    def update(self, X: np.ndarray, Y: np.ndarray, weight: float = 1.0) -> CrossMoment:
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"row mismatch {X.shape} vs {Y.shape}")
        if self.Sxx is None:
            D, T = X.shape[1], Y.shape[1]
            self.Sxx = np.zeros((D, D))
            self.Sxy = np.zeros((D, T))
            self.sx, self.sy = np.zeros(D), np.zeros(T)
        for i in range(0, X.shape[0], _CHUNK):
            Xc = np.ascontiguousarray(X[i:i + _CHUNK], dtype=self.dtype)
            Yc = np.ascontiguousarray(Y[i:i + _CHUNK], dtype=self.dtype)
            self.Sxx += weight * (Xc.T @ Xc)
            self.Sxy += weight * (Xc.T @ Yc)
            self.syy += weight * float(np.einsum("ij,ij->", Yc, Yc, dtype=np.float64))
            self.sx += weight * Xc.sum(axis=0, dtype=np.float64)
            self.sy += weight * Yc.sum(axis=0, dtype=np.float64)
        self.count += weight * X.shape[0]
        self.rows += X.shape[0]
        return self

    def regression(self) -> Regression:
        if self.Sxx is None or self.count == 0:
            raise ValueError("no rows accumulated")
        n = self.count
        Sxx = self.Sxx / n
        return Regression(Sxx=0.5 * (Sxx + Sxx.T), Sxy=self.Sxy / n, syy=self.syy / n, mx=self.sx / n,
                          my=self.sy / n, count=n, rows=self.rows)


@dataclass
class Regression:
    """Raw moments of one layer's paired rows: E[x xᵀ] (D, D), E[x yᵀ] (D, T), E‖y‖², E[x], E[y]."""
    Sxx: np.ndarray
    Sxy: np.ndarray
    syy: float
    mx: np.ndarray
    my: np.ndarray
    count: float
    rows: int

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """(Cov(x) (D, D), Cov(y, x) (T, D))."""
        return self.Sxx - np.outer(self.mx, self.mx), (self.Sxy - np.outer(self.mx, self.my)).T

    def shifted(self, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(E[x xᵀ], E[(y − b) xᵀ]) for a fixed bias b (None: 0)."""
        Cyx = self.Sxy.T.copy()
        if b is not None:
            Cyx -= np.outer(b, self.mx)
        return self.Sxx, Cyx


def damped_target(W: np.ndarray, reg: Regression, lam: float, centred: bool = True,
                  bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M*, C): C = Σ̃ + δI, δ = lam·mean(diag Σ̃), M* = (C_yx + δW) C⁻¹; W is (T, D). Σ̃, C_yx centred
    (b̂ free) or raw with y − bias (b̂ = bias)."""
    M, C, _ = damped_problem(W, reg, lam, centred, bias)
    return M, C


def damped_problem(W: np.ndarray, reg: Regression, lam: float, centred: bool = True,
                   bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M*, C, M*·C = C_yx + δW) — the last one spares the Σ-ALS a T·D² product."""
    Sxx, Cyx = reg.centred() if centred else reg.shifted(bias)
    D = Sxx.shape[0]
    delta = lam * max(float(np.trace(Sxx)) / D, 1e-30)
    C = Sxx.copy()
    C[np.diag_indices(D)] += delta
    rhs = Cyx + delta * W
    try:
        cf = sla.cho_factor(C, lower=True, check_finite=False)
        M = sla.cho_solve(cf, rhs.T, check_finite=False).T
    except np.linalg.LinAlgError:
        M = sla.lstsq(C, rhs.T, check_finite=False)[0].T
    return M, C, rhs


def heldout_mse(reg: Regression, What: np.ndarray, b: np.ndarray | None, quad: float | None = None) -> float:
    """E‖y − Ŵ x − b‖² over the rows of `reg` (per row, summed over outputs), from the moments alone.
    `quad`: tr(Ŵ E[xxᵀ] Ŵᵀ) when already known (the T·D² product dominates for big layers)."""
    if quad is None:
        quad = quad_form(reg, What)
    e = reg.syy - 2.0 * float(np.sum(What * reg.Sxy.T)) + quad
    if b is not None:
        e += -2.0 * float(b @ reg.my) + 2.0 * float(b @ (What @ reg.mx)) + float(b @ b)
    return max(e, 0.0)


def apply_factors(factors, X: np.ndarray) -> np.ndarray:
    """Rows X (N, D) through the factorized map, X Ŵᵀ (N, T), without forming Ŵ: SVD (A, B) or Tucker2
    (core (R4, R3, kh, kw), U_T, U_S; D in (s, h, w) order)."""
    if isinstance(factors, tuple):
        A, B = factors
        return (X @ np.asarray(B, X.dtype).T) @ np.asarray(A, X.dtype).T
    core = np.asarray(factors.core, X.dtype)
    U_S, U_T = np.asarray(factors.U_S, X.dtype), np.asarray(factors.U_T, X.dtype)
    r4, r3 = core.shape[:2]
    k = int(np.prod(core.shape[2:]))
    Z = np.einsum("nsl,sr->nrl", X.reshape(X.shape[0], U_S.shape[0], k), U_S, optimize=True)
    return (Z.reshape(X.shape[0], r3 * k) @ core.reshape(r4, r3 * k).T) @ U_T.T


class HeldOutRows:
    """Held-out rows (X (N, D), Y (N, T)) kept as they are (float32): scoring a candidate on them costs
    about N·(cost of one factorized row) instead of the T·D² of the moment form, and no D² accumulator."""

    def __init__(self):
        self.X, self.Y = [], []

    def update(self, X: np.ndarray, Y: np.ndarray) -> HeldOutRows:
        self.X.append(np.asarray(X, np.float32))
        self.Y.append(np.asarray(Y, np.float32))
        return self

    def finish(self) -> HeldOutRows:
        if len(self.X) != 1:
            self.X, self.Y = [np.concatenate(self.X)], [np.concatenate(self.Y)]
        return self

    @property
    def rows(self) -> int:
        return sum(len(x) for x in self.X)

    @property
    def syy(self) -> float:
        return float(sum(np.einsum("ij,ij->", y, y, dtype=np.float64) for y in self.Y)) / max(self.rows, 1)

    def mse(self, factors, b: np.ndarray | None) -> float:
        self.finish()
        E = self.Y[0] - apply_factors(factors, self.X[0])
        if b is not None:
            E -= np.asarray(b, np.float32)
        return float(np.einsum("ij,ij->", E, E, dtype=np.float64)) / max(self.rows, 1)


def quad_form(reg: Regression, What: np.ndarray) -> float:
    """tr(Ŵ E[xxᵀ] Ŵᵀ)."""
    return float(np.sum((What @ reg.Sxx) * What))


@dataclass
class Candidate:
    """One factorization of a layer. `factors`: SVD (A (T, r), B (r, D)) or a Tucker2Factors."""
    label: str                    # plain | plain+bias | da(λ=…)
    lam: float | None
    factors: object
    bias: np.ndarray | None
    W_hat: np.ndarray = field(repr=False)     # (T, D) the map the chain applies
    heldout_mse: float | None = None
    fit_mse: float | None = None


@dataclass
class Choice:
    """The candidate kept for one layer and why."""
    chosen: Candidate
    plain_mse: float              # held-out E‖y − Ŵx̃ − b‖² of the plain factors
    ref_power: float              # held-out E‖y‖² (for relative errors)
    scores: dict                  # label -> held-out mse
    reason: str

    @property
    def data_aware(self) -> bool:
        return self.chosen.label != "plain"

    def rel_db(self, mse: float) -> float:
        """Held-out layer SQNR (dB) of an mse."""
        return 10.0 * math.log10(max(self.ref_power, 1e-300) / max(mse, 1e-300))


def _bias_for(reg: Regression, What: np.ndarray, centred: bool, bias: np.ndarray | None):
    return (reg.my - What @ reg.mx) if centred else bias


def svd_candidates(W: np.ndarray, bias: np.ndarray | None, rank: int, fit: Regression,
                   lams=LAMBDAS, centred: bool = True, plain: tuple | None = None) -> list[Candidate]:
    """Plain SVD of W (or the given `plain` (A, B)), plain + bias correction (centred only), and the damped
    compensating whitened SVD for each λ. W (T, D); `centred`: the chain has a bias slot that may be refit."""
    from .svd import svd_factor, whitened_svd

    W = np.asarray(W, dtype=np.float64)
    if plain is None:
        p = svd_factor(W, rank)
        plain = (p.A, p.B)
    A0, B0 = (np.asarray(a, np.float64) for a in plain)
    Wp = A0 @ B0
    out = [Candidate("plain", None, (A0, B0), bias, Wp)]
    if centred:
        out.append(Candidate("plain+bias", None, (A0, B0), _bias_for(fit, Wp, True, bias), Wp))
    for lam in lams:
        M, C = damped_target(W, fit, lam, centred, bias)
        r = whitened_svd(M, rank, C, eps=1e-12)
        Wh = r.A @ r.B
        out.append(Candidate(f"da(lam={lam:g})", lam, (r.A, r.B), _bias_for(fit, Wh, centred, bias), Wh))
    return out


def tucker2_candidates(K: np.ndarray, bias: np.ndarray | None, r3: int, r4: int, fit: Regression,
                       plain, lams=LAMBDAS, centred: bool = True, als_iter: int = 2, cg: int = 5,
                       init_hooi_iter: int = 5) -> list[Candidate]:
    """Like :func:`svd_candidates` for a k×k kernel K (T, S, kh, kw): `plain` is the plain Tucker2 result
    (any object with core, U_T, U_S); data-aware = Tucker2-ALS-Σ of the damped target M* under C."""
    from .sigma import tucker2_reconstruct, tucker2_sigma_als

    K = np.asarray(K, dtype=np.float64)
    T = K.shape[0]
    W = K.reshape(T, -1)
    Wp = tucker2_reconstruct(np.asarray(plain.core, np.float64), np.asarray(plain.U_T, np.float64),
                             np.asarray(plain.U_S, np.float64)).reshape(T, -1)
    out = [Candidate("plain", None, plain, bias, Wp)]
    if centred:
        out.append(Candidate("plain+bias", None, plain, _bias_for(fit, Wp, True, bias), Wp))
    for lam in lams:
        M, C, MC = damped_problem(W, fit, lam, centred, bias)
        res = tucker2_sigma_als(M.reshape(K.shape), r3, r4, C, eps=0.0, n_iter_max=als_iter, cg_maxiter=cg,
                                init_hooi_iter=init_hooi_iter, WC=MC)
        Wh = res.reconstruct().reshape(T, -1)
        out.append(Candidate(f"da(lam={lam:g})", lam, res, _bias_for(fit, Wh, centred, bias), Wh))
    return out


def choose(cands: list[Candidate], heldout: Regression | HeldOutRows, fit: Regression | None = None,
           margin: float = 0.0) -> Choice:
    """Score every candidate on the held-out rows (their moments, or the rows themselves); keep the best,
    the plain factors unless a data-aware one is lower by more than `margin` (relative). `fit`: also score
    the kept candidate on the fit moments (a diagnostic: over-fitting shows as fit ≫ held-out)."""
    scores, quads = {}, {}
    for c in cands:
        if isinstance(heldout, HeldOutRows):
            c.heldout_mse = heldout.mse(c.factors, c.bias)
        else:            # moments: candidates sharing Ŵ (plain / plain+bias) share the quadratic term
            q = quads.get(id(c.W_hat))
            if q is None:
                q = quads[id(c.W_hat)] = quad_form(heldout, c.W_hat)
            c.heldout_mse = heldout_mse(heldout, c.W_hat, c.bias, q)
        scores[c.label] = c.heldout_mse
    plain = cands[0]
    best = min(cands, key=lambda c: c.heldout_mse)
    if best is plain or best.heldout_mse >= plain.heldout_mse * (1.0 - margin):
        best = plain
        reason = "plain: no data-aware candidate lowers the held-out output error"
    else:
        reason = f"{best.label}: held-out output error {best.heldout_mse / max(plain.heldout_mse, 1e-300):.3f}x plain"
    if fit is not None:        # the kept candidate on its own fit rows (overfitting shows as fit ≫ held-out)
        best.fit_mse = heldout_mse(fit, best.W_hat, best.bias)
    return Choice(chosen=best, plain_mse=plain.heldout_mse, ref_power=heldout.syy, scores=scores, reason=reason)
