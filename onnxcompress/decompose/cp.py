"""CP (CANDECOMP/PARAFAC) decomposition of conv kernels: ALS, EPC, chain weights, CLE.

Numpy/scipy only. Conventions follow ALGORITHMS.md §2: ``K ≈ Σ_r λ_r a_r ∘ b_r ∘ ...`` with
unit-norm factor columns; factor ``n`` has shape ``(I_n, R)``. Unfoldings are C-order (tensorly's).

ALS uses a dimension tree: per sweep only two large GEMMs touch the full tensor (the MTTKRP of
mode 0 against an explicit Khatri-Rao product of the other modes, and the partial contraction
``U_0ᵀ K_(0)``); all other MTTKRPs are cheap contractions of that partial result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

__all__ = [
    "CPResult",
    "cp_als",
    "epc",
    "cp_kernel",
    "cp4_rank_for_ratio",
    "cp3_rank_for_ratio",
    "cp_params",
    "chain_weights",
    "compose_chain",
    "cle_scales",
    "apply_cle",
    "equalize_chain",
    "khatri_rao",
    "fake_quant_int8",
]

Variant = Literal["cp4", "cp3"]
Balance = Literal["sqrt_size", "equal", "none"]

#: Defaults chosen by measurement (benchmarks/bench_cp.py; random-normal ResNet-18 shapes at ratio 4
#: and degenerate decaying-spectrum 64x64x3x3 kernels): with line search, 25 sweeps reach the error
#: plain ALS has after ~40; the error keeps falling ~0.1-0.5 %/sweep after that while κ grows.
DEFAULT_KERNEL_ITERS = 25
DEFAULT_KERNEL_TOL = 1e-5
DEFAULT_EPC_ROUNDS = 15


@dataclass
class CPResult:
    """A CP model ``K̂ = Σ_r weights[r] · ∘_n factors[n][:, r]`` and its fit statistics.

    Components are sorted by decreasing λ. ``history``: relative error per sweep (ALS) or κ per
    round, starting with the input's κ (EPC).
    """

    weights: np.ndarray
    factors: list[np.ndarray]
    rel_error: float
    kappa: float
    n_iter: int
    history: list[float] = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(f.shape[0]) for f in self.factors)

    def to_tensor(self) -> np.ndarray:
        """Dense reconstruction of the CP model."""
        first = self.factors[0] * self.weights
        rest = khatri_rao(self.factors[1:])
        return (first @ rest.T).reshape(self.shape)


# ----------------------------------------------------------------------------------------------
# helpers


def khatri_rao(mats: Sequence[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product, rows in C order (first matrix slowest)."""
    out = mats[0]
    r = out.shape[1]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, r)
    return out


def _rng(random_state: int | np.random.Generator | None) -> np.random.Generator:
    return random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)


def _normalize(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm columns and their former norms; zero columns are left as they are."""
    norms = np.linalg.norm(u, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    return u / safe, norms


def _hadamard_grams(grams: Sequence[np.ndarray], skip: int) -> np.ndarray:
    out = None
    for k, g in enumerate(grams):
        if k == skip:
            continue
        out = g.copy() if out is None else out * g
    return out


def _contract_partial(y: np.ndarray, factors: Sequence[np.ndarray], keep: int) -> np.ndarray:
    """MTTKRP from a partial tensor ``y[r, i_1, ..., i_m]``: contract every axis but ``keep``.

    ``factors[j]`` belongs to axis ``j + 1`` of ``y``. Returns ``(I_keep, R)``.
    """
    out = np.moveaxis(y, keep + 1, 1)  # (R, I_keep, rest...)
    others = [f for j, f in enumerate(factors) if j != keep]
    r, ik = out.shape[0], out.shape[1]
    if not others:
        return np.ascontiguousarray(out.T)
    kr = khatri_rao(others)  # (prod rest, R)
    out = out.reshape(r, ik, -1)
    return np.einsum("rij,jr->ir", out, kr, optimize=True)


def _solve_spd(gamma: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """Return ``rhs @ inv(gamma + ridge·tr/R·I)`` for symmetric PSD ``gamma``.

    Uses numpy's LAPACK only: alternating calls into numpy's and scipy's separate OpenBLAS thread
    pools were measured to be up to 25x slower on a loaded 2-core machine.
    """
    r = gamma.shape[0]
    g = gamma.copy()
    g.flat[:: r + 1] += ridge * max(np.trace(gamma) / r, np.finfo(float).tiny)
    try:
        return np.linalg.solve(g, rhs.T).T
    except np.linalg.LinAlgError:
        e, v = np.linalg.eigh(g)
        e = np.maximum(e, e.max() * 1e-14)
        return ((rhs @ v) / e) @ v.T


class _Sweeper:
    """Dimension-tree MTTKRP for one sweep over the modes 0..N-1 in order.

    The two GEMMs against the full tensor run in ``dtype`` (float32 halves their cost); every
    other quantity is float64.
    """

    def __init__(self, tensor: np.ndarray, dtype: np.dtype | type = np.float64):
        self.shape = tensor.shape
        k0 = tensor.reshape(self.shape[0], -1)
        self.norm_sq = float(np.vdot(k0, k0))
        self.dtype = np.dtype(dtype)
        self.k0 = k0.astype(self.dtype, copy=False)  # (I_0, prod rest)
        self._y: np.ndarray | None = None

    def mttkrp0(self, factors: Sequence[np.ndarray]) -> np.ndarray:
        kr = khatri_rao(factors[1:]).astype(self.dtype, copy=False)
        return (self.k0 @ kr).astype(np.float64, copy=False)

    def set_mode0(self, u0: np.ndarray) -> None:
        r = u0.shape[1]
        y = u0.T.astype(self.dtype) @ self.k0
        self._y = y.astype(np.float64, copy=False).reshape((r,) + self.shape[1:])

    def mttkrp(self, n: int, factors: Sequence[np.ndarray]) -> np.ndarray:
        """MTTKRP for mode ``n >= 1``; factors ``< n`` must already be contracted via ``absorb``."""
        return _contract_partial(self._y, factors[n:], 0)

    def absorb(self, un: np.ndarray) -> None:
        """Contract the leading remaining mode of the partial tensor with ``un`` (unit columns)."""
        y = self._y
        r, i = y.shape[0], y.shape[1]
        self._y = np.einsum("rik,ir->rk", y.reshape(r, i, -1), un, optimize=True).reshape((r,) + y.shape[2:])


def _fit_err_sq(norm_sq: float, u: np.ndarray, f: np.ndarray, gamma: np.ndarray) -> float:
    """‖K − U Φᵀ‖² from the MTTKRP ``f = K_(n) Φ`` and ``gamma = ΦᵀΦ``."""
    return norm_sq - 2.0 * float(np.vdot(u, f)) + float(np.vdot(u.T @ u, gamma))


def _svd_init(tensor: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Leading left singular vectors of each unfolding (via the I_n×I_n Gram); random columns pad R > I_n."""
    factors = []
    for n, size in enumerate(tensor.shape):
        un = np.moveaxis(tensor, n, 0).reshape(size, -1)
        e, v = np.linalg.eigh(un @ un.T)
        v = v[:, ::-1][:, : min(rank, size)]
        if rank > size:
            pad = rng.standard_normal((size, rank - size))
            v = np.concatenate([v, pad / np.linalg.norm(pad, axis=0)], axis=1)
        factors.append(v)
    return factors


def _result(tensor: np.ndarray, weights: np.ndarray, factors: list[np.ndarray], n_iter: int,
            history: list[float], norm: float) -> CPResult:
    order = np.argsort(-weights, kind="stable")
    weights = weights[order]
    factors = [f[:, order] for f in factors]
    res = CPResult(weights, factors, 0.0, float(np.linalg.norm(weights) / norm) if norm > 0 else 0.0,
                   n_iter, history)
    res.rel_error = float(np.linalg.norm(tensor - res.to_tensor()) / norm) if norm > 0 else 0.0
    return res


# ----------------------------------------------------------------------------------------------
# ALS


def cp_als(
    tensor: np.ndarray,
    rank: int,
    *,
    init: Literal["svd", "random"] | Sequence[np.ndarray] = "svd",
    n_iter_max: int = 200,
    tol: float = 1e-7,
    random_state: int | np.random.Generator | None = None,
    ridge: float = 1e-12,
    linesearch: bool = True,
    dtype: np.dtype | type = np.float64,
) -> CPResult:
    """N-way CP by alternating least squares.

    Stops when the relative decrease of the relative error in one sweep is below ``tol``
    (``tol=0`` runs exactly ``n_iter_max`` sweeps). ``ridge`` is a relative Tikhonov term on
    the R×R normal equations. ``linesearch`` tries an extrapolated step every second sweep (Bro's
    rule, as tensorly's ``linesearch=True``): it shortens swamps, and an accepted step reuses its
    mode-0 MTTKRP. ``init`` may also be a list of initial factors. ``dtype`` is the precision of
    the two full-tensor GEMMs per sweep (float32 is ~2x faster; enough for fp32 weights).
    """
    tensor = np.asarray(tensor, dtype=np.float64)
    if tensor.ndim < 2:
        raise ValueError("cp_als needs a tensor with at least 2 modes")
    if rank < 1:
        raise ValueError("rank must be >= 1")
    rng = _rng(random_state)
    n_modes = tensor.ndim
    if isinstance(init, str):
        if init == "svd":
            factors = _svd_init(tensor, rank, rng)
        elif init == "random":
            factors = [_normalize(rng.standard_normal((s, rank)))[0] for s in tensor.shape]
        else:
            raise ValueError(f"unknown init {init!r}")
    else:
        factors = [np.array(f, dtype=np.float64) for f in init]
        if len(factors) != n_modes or any(f.shape != (s, rank) for f, s in zip(factors, tensor.shape)):
            raise ValueError("init factors do not match tensor shape and rank")
        factors = [_normalize(f)[0] for f in factors]

    sw = _Sweeper(tensor, dtype)
    norm = np.sqrt(sw.norm_sq)
    if norm == 0:
        return CPResult(np.zeros(rank), factors, 0.0, 0.0, 0, [])
    grams = [f.T @ f for f in factors]
    weights = np.ones(rank)
    history: list[float] = []
    f0: np.ndarray | None = None  # mode-0 MTTKRP cached from an accepted extrapolation
    acc_pow, acc_fail = 2.0, 0
    it = 0
    for it in range(1, n_iter_max + 1):
        ls_sweep = linesearch and it % 2 == 0 and it > 5
        if ls_sweep:
            start = ([f.copy() for f in factors], weights.copy())
            steps = []
        for n in range(n_modes):
            if n == 0:
                f = f0 if f0 is not None else sw.mttkrp0(factors)
                f0 = None
            else:
                f = sw.mttkrp(n, factors)
            gamma = _hadamard_grams(grams, n)
            u = _solve_spd(gamma, f, ridge)
            if n == n_modes - 1:
                err_sq = _fit_err_sq(sw.norm_sq, u, f, gamma)
            factors[n], weights = _normalize(u)
            grams[n] = factors[n].T @ factors[n]
            if ls_sweep:
                steps.append(weights)
            if n == 0:
                sw.set_mode0(factors[0])
            elif n < n_modes - 1:
                sw.absorb(factors[n])
        if ls_sweep:
            ext = _extrapolate(sw, start, factors, steps, it ** (1.0 / acc_pow))
            # as tensorly: accept if better than the previous sweep (not necessarily this one)
            if ext[0] < (history[-1] * norm) ** 2:
                err_sq, factors, weights, grams, f0 = ext
                acc_fail = 0
            else:
                acc_fail += 1
                if acc_fail == 4:
                    acc_pow, acc_fail = acc_pow + 1.0, 0
        history.append(float(np.sqrt(max(err_sq, 0.0)) / norm))
        if len(history) > 1 and history[-2] - history[-1] < tol * history[-2]:
            break
    return _result(tensor, weights, factors, it, history, norm)


def _extrapolate(sw: _Sweeper, start, factors: list[np.ndarray], steps: list[np.ndarray], jump: float):
    """Bro's line search over one sweep, parameterized as tensorly's ``linesearch``.

    ``start`` = (unit factors, λ) before the sweep; the sweep moved λ through the modes as
    ``steps`` (norms after each mode update). Tensorly's unnormalized factors are
    ``unit_n·steps[n]/steps[n-1]`` with λ fixed at its start value; extrapolate those by ``jump``.
    Returns ``(err², unit factors, λ, grams, mode-0 MTTKRP for the next sweep)``.
    """
    old, lam0 = start
    scale_prev = lam0
    ext = []
    for n, (u_old, u_new) in enumerate(zip(old, factors)):
        ratio = steps[n] / np.where(scale_prev > 0, scale_prev, 1.0)
        scale_prev = steps[n]
        ext.append(u_old + jump * (u_new * ratio - u_old))
    units, lam = [], lam0.copy()
    for u in ext:
        un, nrm = _normalize(u)
        units.append(un)
        lam = lam * nrm
    grams = [un.T @ un for un in units]
    f0 = sw.mttkrp0(units)
    err_sq = _fit_err_sq(sw.norm_sq, units[0] * lam, f0, _hadamard_grams(grams, 0))
    return err_sq, units, lam, grams, f0


# ----------------------------------------------------------------------------------------------
# EPC


def _ridge_mu(gs: np.ndarray, e: np.ndarray, norm_sq: float, target_sq: float) -> float:
    """Root μ of ``‖K‖² − Σ_j g_j μ(2+μe_j)/(1+μe_j)² = target`` (decreasing in μ).

    Vectorised bisection: each pass evaluates a 33-point log grid and keeps the bracketing cell.

    Returns ``np.inf`` when even the unregularized least-squares fit is above ``target``.
    """

    def err(mu: np.ndarray) -> np.ndarray:
        me = mu[:, None] * e[None, :]
        return norm_sq - ((gs[None, :] * mu[:, None]) * (2.0 + me) / (1.0 + me) ** 2).sum(axis=1)

    emax = float(e.max())
    lo, hi = -18.0, 18.0  # log10(μ·e_max)
    grid = np.logspace(lo, hi, 9) / emax
    if err(grid[-1:])[0] > target_sq:
        return np.inf
    if err(grid[:1])[0] < target_sq:
        return float(grid[0])
    for _ in range(8):
        pts = np.linspace(lo, hi, 33)
        vals = err(10.0 ** pts / emax)
        k = int(np.searchsorted(-vals, -target_sq))  # first index with err <= target
        k = min(max(k, 1), len(pts) - 1)
        lo, hi = pts[k - 1], pts[k]
    return float(10.0 ** hi / emax)  # feasible side of the bracket


def epc(
    tensor: np.ndarray,
    cp: CPResult,
    *,
    delta: float | None = None,
    n_rounds: int = 50,
    tol: float = 1e-4,
    dtype: np.dtype | type = np.float64,
) -> CPResult:
    """Error-preserving correction (Phan et al.): min ‖λ‖₂ s.t. ‖K − K̂‖ ≤ δ (ALGORITHMS §2.3).

    Each mode update is the closed form ``U_n = F (Γ + I/μ)⁻¹`` (ridge LS), with μ solved so
    that the error equals δ. ``delta`` defaults to the error of ``cp``. Stops when ‖λ‖ changes
    by less than ``tol`` (relative) in one round. ``dtype`` as in :func:`cp_als`.
    """
    tensor = np.asarray(tensor, dtype=np.float64)
    sw = _Sweeper(tensor, dtype)
    norm = np.sqrt(sw.norm_sq)
    if norm == 0:
        return cp
    if delta is None:
        delta = cp.rel_error * norm
    delta_sq = float(delta) ** 2
    n_modes = tensor.ndim
    factors = [_normalize(np.array(f, dtype=np.float64))[0] for f in cp.factors]
    weights = np.array(cp.weights, dtype=np.float64)
    grams = [f.T @ f for f in factors]
    history = [float(np.linalg.norm(weights) / norm)]
    it = 0
    for it in range(1, n_rounds + 1):
        for n in range(n_modes):
            if n == 0:
                f = sw.mttkrp0(factors)
            else:
                f = sw.mttkrp(n, factors)
            gamma = _hadamard_grams(grams, n)
            u_cur = factors[n] * weights
            cur_sq = _fit_err_sq(sw.norm_sq, u_cur, f, gamma)
            e, v = np.linalg.eigh(gamma)
            e = np.maximum(e, max(float(e[-1]), 1e-300) * 1e-13)
            fv = f @ v
            gs = np.einsum("ij,ij->j", fv, fv)
            # LS optimum err(∞) = ‖K‖² − Σ g_j/e_j; if δ is out of reach keep the current error.
            target = delta_sq if sw.norm_sq - float(np.sum(gs / e)) < delta_sq else cur_sq
            mu = _ridge_mu(gs, e, sw.norm_sq, max(target, 0.0))
            scale = 1.0 / e if not np.isfinite(mu) else mu / (1.0 + mu * e)
            u = (fv * scale) @ v.T
            factors[n], weights = _normalize(u)
            grams[n] = factors[n].T @ factors[n]
            if n == 0:
                sw.set_mode0(factors[0])
            elif n < n_modes - 1:
                sw.absorb(factors[n])
        history.append(float(np.linalg.norm(weights) / norm))
        if abs(history[-2] - history[-1]) < tol * history[-2]:
            break
    return _result(tensor, weights, factors, it, history, norm)


# ----------------------------------------------------------------------------------------------
# conv kernels


def cp4_rank_for_ratio(T: int, S: int, Kh: int, Kw: int, ratio: float) -> int:
    """Largest R with P₀ / P_CP4 ≥ ratio: ``⌊T·S·Kh·Kw / (ratio·(S+Kh+Kw+T))⌋`` (at least 1)."""
    return max(1, int(np.floor(T * S * Kh * Kw / (ratio * (S + Kh + Kw + T)))))


def cp3_rank_for_ratio(T: int, S: int, Kh: int, Kw: int, ratio: float) -> int:
    """Largest R with P₀ / P_CP3 ≥ ratio: ``⌊T·S·Kh·Kw / (ratio·(S+Kh·Kw+T))⌋`` (at least 1)."""
    return max(1, int(np.floor(T * S * Kh * Kw / (ratio * (S + Kh * Kw + T)))))


def cp_params(T: int, S: int, Kh: int, Kw: int, rank: int, variant: Variant = "cp4") -> int:
    """Weight count of the CP chain (no bias)."""
    mid = Kh + Kw if variant == "cp4" else Kh * Kw
    return rank * (S + mid + T)


def cp_kernel(
    kernel: np.ndarray,
    rank: int,
    *,
    variant: Variant = "cp4",
    use_epc: bool = True,
    n_iter_max: int = DEFAULT_KERNEL_ITERS,
    tol: float = DEFAULT_KERNEL_TOL,
    epc_rounds: int = DEFAULT_EPC_ROUNDS,
    random_state: int | np.random.Generator | None = 0,
    dtype: np.dtype | type = np.float32,
) -> CPResult:
    """CP of a conv kernel (T,S,Kh,Kw): ``cp4`` = 4-way CP, ``cp3`` = 3-way CP of (T,S,Kh·Kw).

    Factors are ordered as the tensor modes: cp4 ``[A(T), B(S), C(Kh), D(Kw)]``, cp3
    ``[A(T), B(S), W(Kh·Kw)]``. With ``use_epc`` the ALS result is corrected by error-preserving EPC.
    ``dtype`` is the precision of the full-tensor GEMMs (float32 default: ONNX weights are fp32).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError("kernel must be (T, S, Kh, Kw)")
    t, s, kh, kw = kernel.shape
    if variant == "cp4":
        x = kernel
    elif variant == "cp3":
        x = kernel.reshape(t, s, kh * kw)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    res = cp_als(x, rank, init="svd", n_iter_max=n_iter_max, tol=tol, random_state=random_state, dtype=dtype)
    if use_epc:
        res = epc(x, res, n_rounds=epc_rounds, dtype=dtype)
    return res


def _balanced_factors(cp: CPResult, balance: Balance) -> list[np.ndarray]:
    """Distribute λ over the factors (ALGORITHMS §2.4)."""
    lam = np.asarray(cp.weights, dtype=np.float64)
    factors = [np.asarray(f, dtype=np.float64) for f in cp.factors]
    n = len(factors)
    if balance == "none":
        return [factors[0] * lam] + factors[1:]  # A is the last conv of the chain
    if balance == "equal":
        per = lam ** (1.0 / n)
        return [f * per for f in factors]
    if balance == "sqrt_size":
        sizes = np.array([f.shape[0] for f in factors], dtype=np.float64)
        c = (lam / np.prod(np.sqrt(sizes))) ** (1.0 / n)
        return [f * (c * np.sqrt(sz)) for f, sz in zip(factors, sizes)]
    raise ValueError(f"unknown balance {balance!r}")


def chain_weights(
    cp: CPResult,
    variant: Variant,
    kernel_shape: Sequence[int],
    *,
    balance: Balance = "sqrt_size",
) -> list[np.ndarray]:
    """ONNX Conv weights of the CP chain (float64; cast to float32 by the caller).

    cp4: ``[W1 (R,S,1,1), Wv (R,1,Kh,1), Wh (R,1,1,Kw), W4 (T,R,1,1)]``;
    cp3: ``[W1 (R,S,1,1), Wd (R,1,Kh,Kw), W3 (T,R,1,1)]``.
    ``balance``: ``sqrt_size`` column norms ∝ √I_n, ``equal`` λ^(1/N) each, ``none`` λ in the last conv.
    """
    t, s, kh, kw = (int(v) for v in kernel_shape)
    r = cp.rank
    f = _balanced_factors(cp, balance)
    if variant == "cp4":
        if cp.shape != (t, s, kh, kw):
            raise ValueError(f"CP shape {cp.shape} does not match kernel {tuple(kernel_shape)} (cp4)")
        a, b, c, d = f
        return [
            np.ascontiguousarray(b.T).reshape(r, s, 1, 1),
            np.ascontiguousarray(c.T).reshape(r, 1, kh, 1),
            np.ascontiguousarray(d.T).reshape(r, 1, 1, kw),
            np.ascontiguousarray(a).reshape(t, r, 1, 1),
        ]
    if variant == "cp3":
        if cp.shape != (t, s, kh * kw):
            raise ValueError(f"CP shape {cp.shape} does not match kernel {tuple(kernel_shape)} (cp3)")
        a, b, w = f
        return [
            np.ascontiguousarray(b.T).reshape(r, s, 1, 1),
            np.ascontiguousarray(w.T).reshape(r, 1, kh, kw),
            np.ascontiguousarray(a).reshape(t, r, 1, 1),
        ]
    raise ValueError(f"unknown variant {variant!r}")


def compose_chain(weights: Sequence[np.ndarray]) -> np.ndarray:
    """Dense (T,S,Kh,Kw) kernel equivalent to a CP4 or CP3 chain (stride 1, no dilation)."""
    if len(weights) == 4:
        w1, wv, wh, w4 = weights
        return np.einsum("rs,rh,rw,tr->tshw", w1[:, :, 0, 0], wv[:, 0, :, 0], wh[:, 0, 0, :], w4[:, :, 0, 0])
    if len(weights) == 3:
        w1, wd, w3 = weights
        return np.einsum("rs,rhw,tr->tshw", w1[:, :, 0, 0], wd[:, 0], w3[:, :, 0, 0])
    raise ValueError("expected 3 (cp3) or 4 (cp4) chain weights")


# ----------------------------------------------------------------------------------------------
# cross-layer equalization and INT8 helpers


def cle_scales(range_out_prev: np.ndarray, range_in_next: np.ndarray) -> np.ndarray:
    """Data-free CLE scales ``s_r = √(r1_r·r2_r)/r2_r`` (Nagel et al. 2019; ALGORITHMS §2.4.3).

    Divide output channel r of the first conv by ``s_r`` and multiply input channel r of the
    next by ``s_r``; both ranges become ``√(r1·r2)``. Channels with a zero range get ``s = 1``.
    """
    r1 = np.asarray(range_out_prev, dtype=np.float64)
    r2 = np.asarray(range_in_next, dtype=np.float64)
    ok = (r1 > 0) & (r2 > 0)
    return np.where(ok, np.sqrt(np.where(ok, r1 * r2, 1.0)) / np.where(ok, r2, 1.0), 1.0)


def _is_depthwise(w_first: np.ndarray, w_next: np.ndarray) -> bool:
    return w_next.shape[1] == 1 and w_next.shape[0] == w_first.shape[0] and w_next.shape[0] > 1


def out_ranges(w: np.ndarray) -> np.ndarray:
    """Max-abs per output channel (axis 0)."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_ranges(w_next: np.ndarray, depthwise: bool) -> np.ndarray:
    """Max-abs per input channel: axis 0 for a depthwise (group = channels) conv, else axis 1."""
    a = np.abs(w_next)
    if depthwise:
        return a.reshape(a.shape[0], -1).max(axis=1)
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).max(axis=1)


def apply_cle(
    w_first: np.ndarray,
    w_next: np.ndarray,
    *,
    depthwise_next: bool | None = None,
    scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescale two consecutive bias-free convs: ``w_first[r] /= s_r``, next's input channel r ``*= s_r``.

    ``scales`` defaults to :func:`cle_scales` of the weight ranges. ``depthwise_next`` is inferred
    from the shapes when ``None``. Returns ``(w_first', w_next', s)``; the composition is unchanged.
    """
    dw = _is_depthwise(w_first, w_next) if depthwise_next is None else depthwise_next
    if scales is None:
        scales = cle_scales(out_ranges(w_first), in_ranges(w_next, dw))
    s = np.asarray(scales, dtype=np.float64)
    if np.any(s <= 0):
        raise ValueError("CLE scales must be positive (diagonal scaling only)")
    shape_first = (-1,) + (1,) * (w_first.ndim - 1)
    w1 = w_first / s.reshape(shape_first)
    if dw:
        w2 = w_next * s.reshape((-1,) + (1,) * (w_next.ndim - 1))
    else:
        w2 = w_next * s.reshape((1, -1) + (1,) * (w_next.ndim - 2))
    return w1, w2, s


def equalize_chain(weights: Sequence[np.ndarray], n_sweeps: int = 4) -> list[np.ndarray]:
    """Data-free CLE over every consecutive pair of a CP chain, repeated ``n_sweeps`` times."""
    ws = [np.asarray(w, dtype=np.float64) for w in weights]
    for _ in range(n_sweeps):
        for i in range(len(ws) - 1):
            ws[i], ws[i + 1], _ = apply_cle(ws[i], ws[i + 1], depthwise_next=i + 1 < len(ws) - 1)
    return ws


def fake_quant_int8(w: np.ndarray, axis: int | None = 0) -> np.ndarray:
    """Symmetric INT8 quantize-dequantize (max-abs), per channel along ``axis`` or per tensor."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        amax = np.abs(w).max()
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    step = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / step), -127, 127) * step
