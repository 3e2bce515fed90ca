"""Quantization-aware factorization (QAF): fit the factors of a conv chain *on* the integer grid they are
stored on (Cherniuk et al. 2023, "Quantization Aware Factorization", arXiv 2308.04595; ALGORITHMS §5).

Numpy only. A chain (CP4, CP3, Tucker2, SVD) is a list of weight tensors in their ONNX layout that compose
multilinearly into the kernel ``K`` (T, S, k): the composition is linear in each weight given the others. For
one weight ``Z`` (a matrix whose rows or columns are the quantization channels) every chain here can be written
as ``Y ≈ L · Z · Rᵀ`` for an unfolding ``Y`` of ``K``; the fit only needs ``A = LᵀL``, ``B = RᵀR``,
``F = Lᵀ Y R`` and ``‖Y‖²`` (:class:`LinearProblem`).

ADMM per weight (AO-ADMM as in the QAF paper and KamikaziZen/admm-quantization ``source/admm.py``)::

    Z̃ = argmin ‖Y − L Z Rᵀ‖² + ρ‖Z − (H + U)‖²     (ridge least squares: (A ⊗ B + ρI) vec Z = vec(F + ρ(H+U)))
    H  = Π_Q(Z̃ − U)                                 (projection onto the grid)
    U  = U + H − Z̃                                  (scaled dual update)

stopping when the primal residual ‖H − Z̃‖²/‖H‖² and the dual residual ‖H − H_prev‖²/‖U‖² are both below
``tol``. ρ = tr(A)·tr(B)/(a·b) (the paper's tr(G)/R). The weights are visited in turn (outer sweeps), each
against the current values of the others; after the first sweep every weight is on its grid. The best
grid-feasible chain seen is returned, and never one worse than round-to-nearest of the input chain.

**The grid is the one ONNX Runtime stores** (onnxruntime/quantization ``qdq_quantizer._calc_initializer_quant_params``
→ ``quant_utils.compute_data_quant_params`` / ``compute_scale_zp`` / ``quantize_nparray``, read in ORT 1.32):
per-channel weights are always symmetric; for INT8 ``qmin, qmax = -127, 127`` (``ONNX_INT_TYPE_SYMMETRIC_RANGE``,
``reduce_range=False`` by default), ``scale = float32(2·amax/254)`` with ``amax`` the channel's max-abs in
float32, zero point 0, ``q = clip(round_half_even(w/scale), -128, 127)``. Any channel ``v = s·q`` with integer
``|q| ≤ 127`` and ``max|q| = 127`` is therefore a fixed point: ORT recomputes ``scale = s`` (to 1 ulp) and the same
integers. For INT4 ORT uses ``qmin, qmax = -8, 7`` even when symmetric (INT4 has no entry in the symmetric
table), i.e. ``scale = amax/7.5``: the largest positive weight is clipped to 7·scale and *no* channel is a
fixed point (requantizing a dequantized INT4 weight changes it; measured in tests/test_qaf.py). So INT4 here
uses the full range ``[-8, 7]`` with per-channel scales chosen by MSE, and the scales are handed to ORT
explicitly (onnxcompress/int4.py: TensorQuantOverrides, or our own DequantizeLinear): ORT then computes
``clip(round(w/scale), -8, 7)``, which reproduces the fitted integers.

``Grid.scale == "mse"`` lets a channel's scale shrink below ``amax/qmax`` (clipping its largest entries) when
that lowers the channel's squared error; the clipped result still has ``max|q| = qmax``, so it is still a
fixed point of the max-abs rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from ._blas import one_blas_thread

__all__ = [
    "Grid",
    "INT8",
    "INT4",
    "quantize",
    "fake_quant",
    "ort_int8_weight",
    "LinearProblem",
    "FactorFit",
    "admm_fit",
    "ChainFit",
    "qaf_chain",
    "compose",
    "chain_problems",
]

ChainKind = Literal["cp4", "cp3", "tucker2", "svd"]


@dataclass(frozen=True)
class Grid:
    """Per-channel integer grid: values ``s_c · q`` with integer ``qmin ≤ q ≤ qmax`` along ``axis``
    (``qmin`` None: ``-qmax``, symmetric).

    ``scale``: ``maxabs`` (the smallest scale that clips nothing: ``max|w_c|/qmax`` when symmetric, ORT's rule) or
    ``mse`` (the best of ``n_alpha`` scales from ``alpha_min`` to 1 times that one; clipping allowed).
    """

    bits: int = 8
    qmax: int = 127
    axis: int = 0
    scale: Literal["maxabs", "mse"] = "maxabs"
    alpha_min: float = 0.5
    n_alpha: int = 26
    qmin: int | None = None

    @property
    def lo(self) -> int:
        return -self.qmax if self.qmin is None else self.qmin

    def along(self, axis: int) -> "Grid":
        return Grid(self.bits, self.qmax, axis, self.scale, self.alpha_min, self.n_alpha, self.qmin)


#: ORT's per-channel symmetric INT8 weights: a fixed point of ORT's own max-abs rule, no scales to hand over.
INT8 = Grid(8, 127, 0, "maxabs")
#: INT4 weights: the full int4 range [-8, 7] with MSE-chosen scales, handed to ORT explicitly (onnxcompress/int4.py).
INT4 = Grid(4, 7, 0, "mse", qmin=-8)


def _channels_first(w: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def quantize(w: np.ndarray, grid: Grid = INT8, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (same shape as ``w``, int32) and per-channel scales (float64) of ``w`` on ``grid``
    (``scales`` given: round to those)."""
    x, shape = _channels_first(w, grid.axis)
    lo, hi = grid.lo, grid.qmax
    if scales is not None:
        s = np.asarray(scales, dtype=np.float64)
        q = np.clip(np.rint(x / s[:, None]), lo, hi)
        return np.moveaxis(q.reshape(shape), 0, grid.axis).astype(np.int32), s
    if x.shape[1]:
        pos, neg = np.maximum(x.max(axis=1), 0.0), np.maximum(-x.min(axis=1), 0.0)
    else:
        pos = neg = np.zeros(x.shape[0])
    s_max = np.maximum(pos / hi, neg / -lo) if lo < 0 else pos / hi
    s_max = np.where(s_max > 0, s_max, 1.0)
    if grid.scale == "maxabs" or x.shape[1] == 0:
        s = s_max
    elif grid.scale == "mse":
        alphas = np.linspace(grid.alpha_min, 1.0, grid.n_alpha)
        cand = alphas[:, None] * s_max[None, :]                                       # (n_alpha, C)
        qs = np.clip(np.rint(x[None] / cand[:, :, None]), lo, hi)
        err = ((qs * cand[:, :, None] - x[None]) ** 2).sum(axis=2)                    # (n_alpha, C)
        err[-1] *= 1.0 - 1e-12          # ties: prefer the unclipped scale
        s = cand[np.argmin(err, axis=0), np.arange(x.shape[0])]
    else:
        raise ValueError(f"unknown grid scale rule {grid.scale!r}")
    q = np.clip(np.rint(x / s[:, None]), lo, hi)
    q = np.moveaxis(q.reshape(shape), 0, grid.axis).astype(np.int32)
    return q, s


def fake_quant(w: np.ndarray, grid: Grid = INT8, scales: np.ndarray | None = None) -> np.ndarray:
    """Quantize-dequantize ``w`` on ``grid`` (float64): the projection Π_Q of the ADMM."""
    q, s = quantize(w, grid, scales)
    shape = [1] * q.ndim
    shape[grid.axis] = -1
    return q * s.reshape(shape)


def ort_int8_weight(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime 1.32's per-channel symmetric INT8 weight quantization, float32 arithmetic as ORT's:
    ``scale = float32(2·amax/254)``, ``q = clip(round(float32(w)/scale), -128, 127)``. Returns (int8 codes, scales)."""
    w32 = np.asarray(w, dtype=np.float32)
    x = np.moveaxis(w32, axis, 0)
    amax = np.abs(x.reshape(x.shape[0], -1)).max(axis=1)
    scale = (2.0 * amax.astype(np.float64) / 254.0).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)
    q = np.clip(np.round(x / scale.reshape((-1,) + (1,) * (x.ndim - 1))), -128, 127)
    return np.moveaxis(q, 0, axis).astype(np.int8), scale


# ----------------------------------------------------------------------------------------------
# one weight: ADMM on a linear least-squares problem


@dataclass
class LinearProblem:
    """``min ‖Y − L Z Rᵀ‖²`` given by ``A = LᵀL`` (a×a, None = I), ``B = RᵀR`` (b×b, None = I), ``F = LᵀYR``
    (a×b) and ``y_sq = ‖Y‖²``. ``kron`` > 1: ``RᵀR`` is ``kron(B, I_kron)`` and only the small ``B`` is held
    (Tucker2's core: B = kron(W1·W1ᵀ, I_k)); products with it and its eigenvectors use the structure, which makes
    a 3×3 core's solve k = 9 times cheaper and its eigendecomposition k³ times (ResNet-18's QAF pass: 316 s → see
    tests/test_qaf.py::test_kron_structured_problem_equals_the_dense_one)."""

    F: np.ndarray
    y_sq: float
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    kron: int = 1

    def right(self, z: np.ndarray, m: np.ndarray) -> np.ndarray:
        """``z @ kron(m, I_kron)`` (``z @ m`` when kron is 1)."""
        if self.kron == 1:
            return z @ m
        a, k = z.shape[0], self.kron
        y = np.matmul(z.reshape(a, -1, k).transpose(0, 2, 1), m)       # (a, k, n)
        return y.transpose(0, 2, 1).reshape(a, -1)

    def error_sq(self, z: np.ndarray) -> float:
        az = z if self.A is None else self.A @ z
        azb = az if self.B is None else self.right(az, self.B)
        return float(self.y_sq - 2.0 * np.vdot(z, self.F) + np.vdot(azb, z))

    def rho(self) -> float:
        a, b = self.F.shape
        ta = 1.0 if self.A is None else float(np.trace(self.A)) / a
        tb = 1.0 if self.B is None else float(np.trace(self.B)) / (b // self.kron)
        return max(ta * tb, np.finfo(float).tiny)


class _RidgeSolver:
    """Solves ``A Z B + ρ Z = RHS`` through the eigendecompositions of A and B (both symmetric PSD; B's
    Kronecker structure kept)."""

    def __init__(self, p: LinearProblem, rho: float):
        a, b = p.F.shape
        self.p = p
        if p.A is None:
            self.va, ea = None, np.ones(a)
        else:
            ea, self.va = np.linalg.eigh(p.A)
        if p.B is None:
            self.vb, eb = None, np.ones(b)
        else:
            eb, self.vb = np.linalg.eigh(p.B)
            eb = np.repeat(eb, p.kron)
        self.den = np.maximum(ea, 0.0)[:, None] * np.maximum(eb, 0.0)[None, :] + rho

    def __call__(self, rhs: np.ndarray) -> np.ndarray:
        x = rhs if self.va is None else self.va.T @ rhs
        x = x if self.vb is None else self.p.right(x, self.vb)
        x = x / self.den
        x = x if self.va is None else self.va @ x
        return x if self.vb is None else self.p.right(x, self.vb.T)


@dataclass
class FactorFit:
    """One weight's ADMM: ``rel_error_*`` are ‖Y − L Z Rᵀ‖/‖Y‖ of the starting value rounded to the grid (rtn)
    and of the ADMM result."""

    name: str
    iterations: int
    primal_residual: float
    dual_residual: float
    rel_error_rtn: float
    rel_error_admm: float
    converged: bool
    scales: np.ndarray | None = field(default=None, repr=False)   # fixed per-channel scales (``mse`` grids)


def admm_fit(p: LinearProblem, z0: np.ndarray, grid: Grid, *, rho: float | None = None, max_iter: int = 100,
             tol: float = 1e-5, name: str = "", rescale_every: int = 10) -> tuple[np.ndarray, FactorFit]:
    """Fit ``Z`` on ``grid`` (channels along ``grid.axis`` of the (a, b) matrix). Returns the best feasible
    iterate (never worse than round-to-nearest of ``z0``) and its :class:`FactorFit`.

    ``maxabs`` grids re-derive each channel's scale from its max-abs at every projection (that keeps the result
    a fixed point of ORT's INT8 rule); ``mse`` grids (scales handed to ORT explicitly) re-choose the scales by
    MSE every ``rescale_every`` iterations and project onto that grid in between (the search costs 26
    projections; measured on the five digits CP4 chains at 4 bits: every iteration 42.5 s, every 10th 11.0 s,
    never (fixed from ``z0``) 8.7 s, errors within 0.002 of each other; on tests/test_qaf.py's Tucker2 chain the
    remaining 4-bit loss is 0.62 / 0.67 / 0.79 of RTN's). ``FactorFit.scales``: the scales of the returned iterate."""
    z0 = np.asarray(z0, dtype=np.float64)
    rho = p.rho() if rho is None else float(rho)
    solve = _RidgeSolver(p, rho)
    ynorm = np.sqrt(max(p.y_sq, np.finfo(float).tiny))

    def rel(z):
        return float(np.sqrt(max(p.error_sq(z), 0.0)) / ynorm)

    fixed = quantize(z0, grid)[1] if grid.scale == "mse" else None
    h = fake_quant(z0, grid, fixed)
    u = np.zeros_like(z0)
    best, best_err, best_s = h, rel(h), fixed
    err_rtn = best_err
    prim = dual = np.inf
    it = 0
    converged = False
    for it in range(1, max_iter + 1):
        zt = solve(p.F + rho * (h + u))
        h_prev = h
        if fixed is not None and it % max(rescale_every, 1) == 0:
            fixed = quantize(zt - u, grid)[1]
        h = fake_quant(zt - u, grid, fixed)
        u = u + h - zt
        hn = max(float(np.vdot(h, h)), np.finfo(float).tiny)
        prim = float(np.vdot(h - zt, h - zt)) / hn
        un = float(np.vdot(u, u))
        dual = float(np.vdot(h - h_prev, h - h_prev)) / un if un > 0 else 0.0
        e = rel(h)
        if e < best_err:
            best, best_err, best_s = h, e, fixed
        if prim < tol and dual < tol:
            converged = True
            break
    return best, FactorFit(name, it, prim, dual, err_rtn, best_err, converged, best_s)


# ----------------------------------------------------------------------------------------------
# chains


def _mats(weights: Sequence[np.ndarray], kind: ChainKind) -> list[np.ndarray]:
    """ONNX chain weights -> the matrices the fit works on (rows = ONNX axis 0 = the quantization channels)."""
    ws = [np.asarray(w, dtype=np.float64) for w in weights]
    if kind == "cp4":
        w1, wv, wh, w4 = ws
        return [w1.reshape(w1.shape[0], -1), wv.reshape(wv.shape[0], -1), wh.reshape(wh.shape[0], -1),
                w4.reshape(w4.shape[0], -1)]
    if kind in ("cp3", "tucker2"):
        return [w.reshape(w.shape[0], -1) for w in ws]
    if kind == "svd":
        return [w.reshape(w.shape[0], -1) for w in ws]
    raise ValueError(f"unknown chain kind {kind!r}")


def compose(mats: Sequence[np.ndarray], kind: ChainKind, k: int = 1) -> np.ndarray:
    """The kernel as a (T, S·k) matrix (column order (s, spatial), as ONNX's flattening) from the chain matrices.

    cp4: [W1 (R,S), C (R,Kh), D (R,Kw), W4 (T,R)]; cp3: [W1 (R,S), Wd (R,k), W3 (T,R)];
    tucker2: [W1 (R3,S), G (R4,R3·k), W3 (T,R4)]; svd: [A (r,S), B (T,r)].
    """
    if kind == "cp4":
        w1, c, d, w4 = mats
        m = (w1[:, :, None, None] * c[:, None, :, None] * d[:, None, None, :]).reshape(w1.shape[0], -1)
        return w4 @ m                                                   # one GEMM (T, R) x (R, S·Kh·Kw)
    if kind == "cp3":
        w1, wd, w3 = mats
        return w3 @ (w1[:, :, None] * wd[:, None, :]).reshape(w1.shape[0], -1)
    if kind == "tucker2":
        w1, g, w3 = mats
        r4, r3 = g.shape[0], w1.shape[0]
        gk = g.reshape(r4, r3, k)
        return np.einsum("ta,abk,bs->tsk", w3, gk, w1, optimize=True).reshape(w3.shape[0], -1)
    if kind == "svd":
        a, b = mats
        return b @ a
    raise ValueError(f"unknown chain kind {kind!r}")


def _mttkrp(x: np.ndarray, n: int, others: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """``K_(n) · KhatriRao(others)`` without forming the Khatri-Rao product: one GEMM against the largest other
    mode, then r-diagonal contractions of the rest."""
    others = sorted(others, key=lambda jo: -x.shape[jo[0]])
    j0, u0 = others[0]
    y = np.tensordot(u0, x, axes=([0], [j0]))              # (R, remaining modes in order)
    modes = [m for m in range(x.ndim) if m != j0]
    for j, u in others[1:]:
        ax = modes.index(j) + 1
        y = np.moveaxis(y, ax, 1)
        sh = y.shape
        y = np.einsum("rjk,jr->rk", y.reshape(sh[0], sh[1], -1), u, optimize=True).reshape((sh[0],) + sh[2:])
        modes.remove(j)
    return np.ascontiguousarray(y.reshape(y.shape[0], -1).T)   # only mode n is left


def chain_problems(kernel: np.ndarray, mats: Sequence[np.ndarray], kind: ChainKind, i: int,
                   k: int = 1, kh: int = 1, kw: int = 1) -> LinearProblem:
    """The linear least-squares problem of weight ``i`` (others fixed), in the layout of ``mats[i]``.

    ``kernel``: (T, S·k) matrix (cp4: k = kh·kw, column order (s, h, w)).
    """
    t = kernel.shape[0]
    y_sq = float(np.vdot(kernel, kernel))
    if kind in ("cp4", "cp3"):
        if kind == "cp4":
            w1, c, d, w4 = mats
            s = w1.shape[1]
            x = kernel.reshape(t, s, kh, kw)
            modes = [w4.T, w1, c, d]        # each (R, I_n): rows of the ONNX weight are r except W4
            order = {3: 0, 0: 1, 1: 2, 2: 3}  # chain index -> tensor mode (T, S, Kh, Kw)
        else:
            w1, wd, w3 = mats
            s = w1.shape[1]
            x = kernel.reshape(t, s, k)
            modes = [w3.T, w1, wd]
            order = {2: 0, 0: 1, 1: 2}
        n = order[i]
        others = [(j, modes[j].T) for j in range(len(modes)) if j != n]      # (tensor mode, (I_j, R))
        gram = np.ones((w1.shape[0], w1.shape[0]))
        for _, o in others:
            gram = gram * (o.T @ o)
        mttkrp = _mttkrp(x, n, others)                                       # (I_n, R)
        if n == 0:      # W4 / W3 (T, R): Y = K_(0) = W4 Φᵀ -> L = I, R = Φ
            return LinearProblem(mttkrp, y_sq, None, gram)
        # (R, I_n) weight: K_(n)ᵀ = Φ Z -> L = Φ, R = I
        return LinearProblem(mttkrp.T, y_sq, gram, None)
    if kind == "tucker2":
        w1, g, w3 = mats
        r4, r3, s = g.shape[0], w1.shape[0], w1.shape[1]
        gk = g.reshape(r4, r3, k)
        x = kernel.reshape(t, s, k)
        if i == 2:      # W3 (T, R4): K_(0) = W3 M, M[a,(s,k)] = Σ_b G[a,b,k] W1[b,s]
            m = np.einsum("abk,bs->ask", gk, w1, optimize=True).reshape(r4, -1)
            return LinearProblem(kernel @ m.T, y_sq, None, m @ m.T)
        if i == 1:      # G (R4, R3·k): K_(0) = W3 G P, P = kron(W1, I_k)
            f = np.einsum("ta,tsk,bs->abk", w3, x, w1, optimize=True).reshape(r4, -1)
            return LinearProblem(f, y_sq, w3.T @ w3, w1 @ w1.T, kron=k)
        if i == 0:      # W1 (R3, S): K_(1)ᵀ = Nᵀ W1, N[b,(t,k)] = Σ_a W3[t,a] G[a,b,k]
            nmat = np.einsum("ta,abk->btk", w3, gk, optimize=True).reshape(r3, -1)
            yt = np.moveaxis(x, 1, 0).reshape(s, -1)                         # (S, T·k)
            return LinearProblem(nmat @ yt.T, y_sq, nmat @ nmat.T, None)
    if kind == "svd":
        a, b = mats
        if i == 1:      # B (T, r): W = B A -> L = I, R = Aᵀ
            return LinearProblem(kernel @ a.T, y_sq, None, a @ a.T)
        if i == 0:      # A (r, S): L = B, R = I
            return LinearProblem(b.T @ kernel, y_sq, b.T @ b, None)
    raise ValueError(f"bad chain kind/index {kind!r}/{i}")


@dataclass
class ChainFit:
    """Result of :func:`qaf_chain`. ``weights``: the chain on its grids, ONNX shapes, float64 (exactly
    ``codes · scales``). ``rel_error_*``: ‖K − K̂‖/‖K‖ of the float chain, of round-to-nearest of it, of QAF."""

    weights: list[np.ndarray]
    codes: list[np.ndarray | None]
    scales: list[np.ndarray | None]
    rel_error_float: float
    rel_error_rtn: float
    rel_error_qaf: float
    sweeps: int
    factors: list[FactorFit] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    skipped: str | None = None     # why no ADMM ran (``weights`` are then the input chain, unchanged)

    def to_dict(self) -> dict:
        return {"rel_error_float": self.rel_error_float, "rel_error_rtn": self.rel_error_rtn,
                **({"skipped": self.skipped} if self.skipped else {}),
                "rel_error_qaf": self.rel_error_qaf, "sweeps": self.sweeps,
                "admm_iterations": sum(f.iterations for f in self.factors),
                "factors": [{"name": f.name, "iterations": f.iterations, "primal_residual": f.primal_residual,
                             "dual_residual": f.dual_residual, "rel_error_rtn": f.rel_error_rtn,
                             "rel_error_admm": f.rel_error_admm, "converged": f.converged}
                            for f in self.factors]}


_NAMES = {"cp4": ["cp_in", "cp_v", "cp_h", "cp_out"], "cp3": ["cp_in", "cp_dw", "cp_out"],
          "tucker2": ["t2_in", "t2_core", "t2_out"], "svd": ["svd_a", "svd_b"]}


def qaf_chain(kernel: np.ndarray, weights: Sequence[np.ndarray], kind: ChainKind,
              grids: Grid | Sequence[Grid | None] = INT8, *, sweeps: int = 4, max_iter: int = 50,
              tol: float = 1e-5, sweep_tol: float = 1e-4, rho_scale: float = 1.0,
              min_headroom: float = 0.0) -> ChainFit:
    """QAF of one chain. ``kernel``: the original conv kernel (T, S, *spatial) or matrix (T, S·k); ``weights``:
    the chain's ONNX weights (e.g. ``decompose.cp.chain_weights``, after balancing/equalisation: any
    diagonal rescaling between convs must be done before, it would move the values off the grid);
    ``grids``: one per weight (None keeps that weight in float), all along axis 0 of the ONNX weight.
    ``sweeps``: passes over the weights; stops when the relative error improves by less than ``sweep_tol``.
    ``min_headroom``: no ADMM when round-to-nearest's error is within this fraction of the float chain's
    (``(e_rtn − e_float) / e_rtn < min_headroom``): the fit cannot gain more than that gap (the float chain's
    error bounds what a grid-constrained chain of the same ranks reaches, up to HOOI's own sub-optimality), so
    it is not worth its cost (INT8 Tucker2 of a whole ResNet-18: 316 s for nothing measurable). The result is
    then the input chain, unchanged, with ``skipped`` saying why.
    """
    with one_blas_thread():
        return _qaf_chain(kernel, weights, kind, grids, sweeps, max_iter, tol, sweep_tol, rho_scale, min_headroom)


def _qaf_chain(kernel, weights, kind, grids, sweeps, max_iter, tol, sweep_tol, rho_scale,
               min_headroom=0.0) -> ChainFit:
    shapes = [np.asarray(w).shape for w in weights]
    mats = _mats(weights, kind)
    n = len(mats)
    gl = [grids] * n if isinstance(grids, Grid) or grids is None else list(grids)
    if len(gl) != n:
        raise ValueError(f"{kind} chain has {n} weights, got {len(gl)} grids")
    gl = [None if g is None else g.along(0) for g in gl]
    kern = np.asarray(kernel, dtype=np.float64)
    t = kern.shape[0]
    kh = kw = 1
    if kind == "cp4":
        kh, kw = mats[1].shape[1], mats[2].shape[1]
    k = {"cp4": kh * kw, "cp3": mats[1].shape[1] if kind == "cp3" else 1,
         "tucker2": (mats[1].shape[1] // mats[0].shape[0]) if kind == "tucker2" else 1, "svd": 1}[kind]
    kern = kern.reshape(t, -1)
    norm = float(np.linalg.norm(kern)) or 1.0

    def rel(ms):
        return float(np.linalg.norm(kern - compose(ms, kind, k)) / norm)

    err_float = rel(mats)
    rtn = [m if g is None else fake_quant(m, g) for m, g in zip(mats, gl)]
    err_rtn = rel(rtn)
    if err_rtn > 0 and (err_rtn - err_float) / err_rtn < min_headroom:
        why = (f"round-to-nearest is within {100 * (err_rtn - err_float) / err_rtn:.2f}% of the float chain's "
               f"weight error (< {100 * min_headroom:g}%): nothing for QAF to gain")
        return ChainFit([np.asarray(w, dtype=np.float64) for w in weights], [None] * n, [None] * n, err_float,
                        err_rtn, err_rtn, 0, skipped=why)
    cur = [m.copy() for m in mats]
    cur_s: list[np.ndarray | None] = [None] * n
    best, best_err, best_s = rtn, err_rtn, [None] * n
    history: list[float] = []
    fits: list[FactorFit] = []
    order = [i for i in range(n) if gl[i] is not None]
    sw = 0
    for sw in range(1, sweeps + 1):
        sweep_fits = []
        for i in order:
            p = chain_problems(kern, cur, kind, i, k, kh, kw)
            z, fit = admm_fit(p, cur[i], gl[i], rho=p.rho() * rho_scale, max_iter=max_iter, tol=tol,
                              name=_NAMES[kind][i])
            cur[i] = z
            cur_s[i] = fit.scales
            sweep_fits.append(fit)
        e = rel(cur)
        history.append(e)
        if e < best_err:
            best, best_err, best_s = [c.copy() for c in cur], e, list(cur_s)
            fits = sweep_fits if not fits else _merge(fits, sweep_fits)
        elif not fits:
            fits = sweep_fits
        else:
            fits = _merge(fits, sweep_fits)
        if len(history) > 1 and history[-2] - history[-1] < sweep_tol * history[-2]:
            break
    codes, scales, out = [], [], []
    for m, g, shp, sc in zip(best, gl, shapes, best_s):
        if g is None:
            codes.append(None)
            scales.append(None)
            out.append(m.reshape(shp))
            continue
        q, s = quantize(m, g, sc)
        codes.append(q.reshape(shp))
        scales.append(s)
        out.append((q * s[:, None]).reshape(shp))
    return ChainFit(out, codes, scales, err_float, err_rtn, best_err, sw, fits, history)


def _merge(acc: list[FactorFit], new: list[FactorFit]) -> list[FactorFit]:
    """Per weight: iterations summed over sweeps, residuals and errors of the latest sweep."""
    return [FactorFit(b.name, a.iterations + b.iterations, b.primal_residual, b.dual_residual, a.rel_error_rtn,
                      b.rel_error_admm, b.converged) for a, b in zip(acc, new)]
