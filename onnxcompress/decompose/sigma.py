"""Tucker2 of conv kernels: plain HOOI and data-aware (Σ-norm) variants.

ALGORITHMS.md §1.2–1.3 and §4.

Kernel K (T, S, Kh, Kw) ≈ G ×₁ U_T ×₂ U_S with core G (R4, R3, Kh, Kw),
U_T (T, R4), U_S (S, R3).  The replacement chain is

    conv1 = U_Sᵀ as (R3, S, 1, 1)      no bias, stride 1, no pads
    conv2 = G    as (R4, R3, Kh, Kw)   original strides / pads / dilations
    conv3 = U_T  as (T, R4, 1, 1)      carries the bias

(see :meth:`Tucker2Factors.chain_weights`).  ``U_S`` is always returned with
orthonormal columns; ``U_T`` too.

Data-aware objective: with W = K.reshape(T, S·Kh·Kw) (columns in (s, h, w)
order, the ONNX im2col order) and Σ = E[p pᵀ] of the conv's im2col patch p,
the output error is E‖(W − Ŵ)p‖² = ‖(W − Ŵ)L‖², Σ (+ small ridge) = L Lᵀ.

numpy/scipy only; no onnx import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

from .svd import regularized_cholesky
from .tucker2 import hooi, top_eigvecs

__all__ = [
    "Tucker2Factors",
    "tucker2_hooi",
    "tucker2_kron",
    "tucker2_sigma_als",
    "refit_last",
    "tucker2_reconstruct",
    "kron_factors",
]


@dataclass
class Tucker2Factors:
    core: np.ndarray  # (R4, R3, Kh, Kw) – ONNX weight of conv2
    U_T: np.ndarray  # (T, R4)          – conv3 weight (T, R4, 1, 1)
    U_S: np.ndarray  # (S, R3)          – conv1 weight U_Sᵀ (R3, S, 1, 1)
    rel_error: float  # weight space ‖K − K̂‖/‖K‖
    output_rel_error: float | None  # ‖(W − Ŵ)L‖/‖WL‖ (regularized Σ), None without Σ
    n_iter: int
    history: list[float] = field(default_factory=list)  # per-iteration objective (rel. error)
    info: dict = field(default_factory=dict)  # solver diagnostics (e.g. matvec counts)

    @property
    def ranks(self) -> tuple[int, int]:
        """(R3, R4)."""
        return self.U_S.shape[1], self.U_T.shape[1]

    def reconstruct(self) -> np.ndarray:
        """K̂ (T, S, Kh, Kw)."""
        return tucker2_reconstruct(self.core, self.U_T, self.U_S)

    def chain_weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ONNX weights (conv1 (R3,S,1,1), conv2 (R4,R3,Kh,Kw), conv3 (T,R4,1,1))."""
        r3, r4 = self.ranks
        w1 = np.ascontiguousarray(self.U_S.T).reshape(r3, self.U_S.shape[0], 1, 1)
        w3 = np.ascontiguousarray(self.U_T).reshape(self.U_T.shape[0], r4, 1, 1)
        return w1, np.ascontiguousarray(self.core), w3


def tucker2_reconstruct(core: np.ndarray, U_T: np.ndarray, U_S: np.ndarray) -> np.ndarray:
    """K̂[t,s,h,w] = Σ U_T[t,a] core[a,r,h,w] U_S[s,r]."""
    return np.einsum("ta,arhw,sr->tshw", U_T, core, U_S, optimize=True)


# --------------------------------------------------------------------------- utils


def _check_kernel(K: np.ndarray, r3: int, r4: int) -> tuple[np.ndarray, int, int]:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 4:
        raise ValueError(f"kernel must be (T, S, Kh, Kw), got shape {K.shape}")
    T, S = K.shape[:2]
    r3, r4 = int(r3), int(r4)
    if r3 < 1 or r4 < 1:
        raise ValueError(f"ranks must be >= 1, got r3={r3}, r4={r4}")
    return K, min(r3, S), min(r4, T)


def _sym_sigma(sigma: np.ndarray, D: int) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (D, D):
        raise ValueError(f"sigma must be ({D}, {D}) for this kernel, got {sigma.shape}")
    return 0.5 * (sigma + sigma.T)


def _output_rel_error(W: np.ndarray, W_hat: np.ndarray, Csig: np.ndarray) -> float:
    E = W - W_hat
    num = float(np.sum((E @ Csig) * E))
    den = float(np.sum((W @ Csig) * W))
    if den <= 0:
        return 0.0
    return math.sqrt(max(num, 0.0) / den)


def _regularize(sigma: np.ndarray, eps: float) -> np.ndarray:
    C = sigma.copy()
    d = C.shape[0]
    C[np.diag_indices(d)] += eps * float(np.trace(sigma)) / d
    return C


# --------------------------------------------------------------------------- HOOI


def tucker2_hooi(K: np.ndarray, r3: int, r4: int, n_iter_max: int = 50, tol: float = 1e-6) -> Tucker2Factors:
    """Plain Tucker2 (HOSVD init + HOOI) of a conv kernel, weight-space optimal.

    Stops when the change of the relative error (‖K‖² − ‖G‖²)^½/‖K‖ between
    sweeps is below ``tol`` (as tensorly's partial_tucker), or after
    ``n_iter_max`` sweeps (``n_iter_max=0`` gives HOSVD + one U_T update).
    ``rel_error`` is computed explicitly from K − K̂ (accurate when tiny);
    ``history`` holds the per-sweep errors from the ‖K‖² − ‖G‖² identity.
    """
    K, r3, r4 = _check_kernel(K, r3, r4)
    T, S, Kh, Kw = K.shape
    K3 = K.reshape(T, S, Kh * Kw)
    if n_iter_max <= 0:
        X1 = K3.transpose(1, 0, 2).reshape(S, -1)
        U_S, _ = top_eigvecs(X1 @ X1.T, r3)
        X0 = K3.reshape(T, -1)
        U_T, _ = top_eigvecs(X0 @ X0.T, r4)
        G = np.einsum("ta,tsk,sr->ark", U_T, K3, U_S, optimize=True)
        it, hist = 0, []
    else:
        U_T, U_S, G, it, hist = hooi(K3, r3, r4, n_iter_max, tol)
    core = G.reshape(r4, r3, Kh, Kw)
    Khat = tucker2_reconstruct(core, U_T, U_S)
    kn = float(np.linalg.norm(K))
    rel = float(np.linalg.norm(K - Khat)) / kn if kn > 0 else 0.0
    return Tucker2Factors(core=core, U_T=U_T, U_S=U_S, rel_error=rel, output_rel_error=None, n_iter=it, history=hist)


# --------------------------------------------------------------------------- Kronecker whitening


def kron_factors(sigma: np.ndarray, S: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ ≈ Σ_S ⊗ Σ_K (index order (s, k)): Σ_S = (1/k)Σ_k Σ_kk, Σ_K[k,l] = tr(Σ_kl)/S."""
    S4 = np.asarray(sigma, dtype=np.float64).reshape(S, k, S, k)
    sig_S = np.einsum("akbk->ab", S4) / k
    sig_K = np.einsum("akal->kl", S4) / S
    return 0.5 * (sig_S + sig_S.T), 0.5 * (sig_K + sig_K.T)


def _kron_init(K3, r3, r4, sigma, eps, n_iter_max, tol):
    """Kronecker-whitened HOOI. Returns (U_T, U_S orthonormal, G (R4,R3,k), n_iter, hist, L_S, L_K)."""
    T, S, k = K3.shape
    sig_S, sig_K = kron_factors(sigma, S, k)
    L_S, _ = regularized_cholesky(sig_S, eps)
    L_K, _ = regularized_cholesky(sig_K, eps)
    # K' = K ×₂ L_Sᵀ ×₃ L_Kᵀ
    Kw = np.einsum("tsk,si,kj->tij", K3, L_S, L_K, optimize=True)
    U_T, U_Sw, Gw, it, hist = hooi(Kw, r3, r4, n_iter_max, tol)
    # un-whiten: U_S = L_S^{-T} U_S',  core = G' ×₃ L_K^{-T}
    U_S_raw = sla.solve_triangular(L_S, U_Sw, lower=True, trans="T", check_finite=False)
    Q, R = np.linalg.qr(U_S_raw)
    LKinvT = sla.solve_triangular(L_K, np.eye(k), lower=True, trans="T", check_finite=False)
    # G[a, r, i] = Σ_{r', j} R[r, r'] G'[a, r', j] (L_K^{-T})[i, j]
    G = np.einsum("rq,aqj,ij->ari", R, Gw, LKinvT, optimize=True)
    return U_T, Q, G, it, hist, L_S, L_K


def tucker2_kron(
    K: np.ndarray,
    r3: int,
    r4: int,
    sigma: np.ndarray,
    eps: float = 1e-6,
    n_iter_max: int = 50,
    tol: float = 1e-6,
) -> Tucker2Factors:
    """Data-aware Tucker2 via the Kronecker approximation Σ ≈ Σ_S ⊗ Σ_K (§4).

    Whiten K with the Cholesky factors of Σ_S and Σ_K, run HOOI, un-whiten.
    Exact Σ-optimal HOOI when Σ is a Kronecker product; a cheap, good
    initializer otherwise.  ``U_S`` is re-orthonormalized (QR, R absorbed in
    the core).  ``history`` holds the whitened-space HOOI errors.
    """
    K, r3, r4 = _check_kernel(K, r3, r4)
    T, S, Kh, Kw = K.shape
    k = Kh * Kw
    D = S * k
    sig = _sym_sigma(sigma, D)
    K3 = K.reshape(T, S, k)
    U_T, U_S, G, it, hist, _, _ = _kron_init(K3, r3, r4, sig, eps, n_iter_max, tol)
    core = G.reshape(r4, r3, Kh, Kw)
    Khat = tucker2_reconstruct(core, U_T, U_S)
    W = K.reshape(T, D)
    kn = float(np.linalg.norm(K))
    rel = float(np.linalg.norm(K - Khat)) / kn if kn > 0 else 0.0
    out = _output_rel_error(W, Khat.reshape(T, D), _regularize(sig, eps))
    return Tucker2Factors(core=core, U_T=U_T, U_S=U_S, rel_error=rel, output_rel_error=out, n_iter=it, history=hist)


# --------------------------------------------------------------------------- Tucker2-ALS-Σ


class _SigmaALS:
    """State and closed-form steps of Tucker2-ALS-Σ for one kernel.

    Internal core layout: Gm (R4, k·R3) with columns ordered (l, r), i.e.
    Gm[a, l·R3 + r] = G[a, r, l].  B = U_S ⊗ I_k is never formed.
    """

    def __init__(self, W: np.ndarray, C: np.ndarray, S: int, k: int, r3: int, r4: int,
                 WC: np.ndarray | None = None):
        self.W, self.C, self.S, self.k, self.r3, self.r4 = W, C, S, k, r3, r4
        self.T = W.shape[0]
        self.D = S * k
        self.WC = W @ C if WC is None else WC  # (T, D)
        self.wnorm2 = float(np.sum(self.WC * W))
        # C with columns permuted to (l, s') order -> (D, k, S), contiguous
        self.Cp = np.ascontiguousarray(C.reshape(self.D, S, k).transpose(0, 2, 1))
        self.n_matvec = 0

    # ---- U_T / core step: closed form for fixed U_S ----
    def ut_step(self, U: np.ndarray):
        S, k, r3, r4, D, T = self.S, self.k, self.r3, self.r4, self.D, self.T
        # ΣB[(s,k), (l,r)] = Σ_{s'} Σ[(s,k),(s',l)] U[s', r]
        CB = (self.Cp.reshape(D * k, S) @ U).reshape(D, k * r3)
        # N = Bᵀ Σ B : N[(k,r),(l,r')] = Σ_s U[s,r] ΣB[(s,k),(l,r')]
        N = np.tensordot(U, CB.reshape(S, k, k * r3), axes=([0], [0]))  # (r3, k, k r3)
        N = N.transpose(1, 0, 2).reshape(k * r3, k * r3)
        N = 0.5 * (N + N.T)
        # Z = W Σ B : Z[t,(l,r)] = Σ_s WΣ[t,(s,l)] U[s,r]
        Z = np.einsum("tsl,sr->tlr", self.WC.reshape(T, S, k), U, optimize=True).reshape(T, k * r3)
        Lc = self._chol(N)
        X = sla.solve_triangular(Lc, Z.T, lower=True, check_finite=False).T  # Z Lc^{-T}
        U_T, w = top_eigvecs(X @ X.T, r4)
        # Gm = U_Tᵀ Z N⁻¹ = (U_Tᵀ X) Lc⁻¹
        Gm = sla.solve_triangular(Lc, X.T @ U_T, lower=True, trans="T", check_finite=False).T
        f = max(self.wnorm2 - float(np.sum(w)), 0.0)
        return U_T, Gm, f

    @staticmethod
    def _chol(N: np.ndarray) -> np.ndarray:
        n = N.shape[0]
        scale = max(float(np.trace(N)) / n, 1e-300)
        jitter = 0.0
        for _ in range(8):
            try:
                M = N if jitter == 0.0 else N + jitter * scale * np.eye(n)
                return sla.cholesky(M, lower=True, check_finite=False)
            except np.linalg.LinAlgError:
                jitter = 1e-12 if jitter == 0.0 else jitter * 100.0
        raise np.linalg.LinAlgError("Bᵀ Σ B is not positive definite")

    # ---- U_S step: linear system Σ_kl Σ_kl U (H_lᵀ H_k) = Σ_l (WΣ)_[l]ᵀ U_T H_l ----
    def _hre(self, Gm):
        # Hre[r', (l, a)] = G[a, r', l] = Gm[a, l·R3 + r']
        return np.ascontiguousarray(Gm.reshape(self.r4, self.k, self.r3).transpose(2, 1, 0).reshape(self.r3, self.k * self.r4))

    def _apply(self, U, Hre):
        self.n_matvec += 1
        Y = (U @ Hre).reshape(self.D, self.r4)  # rows (s', l)
        Z = self.C @ Y
        return Z.reshape(self.S, self.k * self.r4) @ Hre.T

    def us_step(self, U_T, Gm, U0, sig_S_chol, dense_max, cg_maxiter, cg_tol):
        S, k, r3, r4 = self.S, self.k, self.r3, self.r4
        Hre = self._hre(Gm)
        Q = U_T.T @ self.WC  # (R4, D), columns (s, l)
        rhs = Q.reshape(r4, S, k).transpose(1, 2, 0).reshape(S, k * r4) @ Hre.T  # (S, R3)
        if S * r3 <= dense_max:
            # M[(s,r),(s',r')] = Σ_kl Σ4[s,k,s',l] (H_lᵀ H_k)[r', r]
            H = Gm.reshape(r4, k, r3)  # H[a, l, r]
            Mkl = np.einsum("akr,alq->krlq", H, H, optimize=True)  # [k, r, l, r'] = (H_kᵀ H_l)[r, r']
            S4 = self.C.reshape(S, k, S, k)
            M = np.einsum("sktl,krlq->srtq", S4, Mkl, optimize=True).reshape(S * r3, S * r3)
            M = 0.5 * (M + M.T)
            try:
                cf = sla.cho_factor(M, lower=True, check_finite=False)
                x = sla.cho_solve(cf, rhs.reshape(-1), check_finite=False)
            except np.linalg.LinAlgError:
                x = sla.lstsq(M, rhs.reshape(-1), check_finite=False)[0]
            return x.reshape(S, r3)
        # PCG, warm-started at U0, Kronecker preconditioner P(R) = Σ_S⁻¹ R Cpre⁻¹,
        # Cpre = Σ_kl Σ_K[k,l] H_lᵀ H_k (exact inverse when Σ = Σ_S ⊗ Σ_K).
        sigK = self._sig_K
        H = Gm.reshape(r4, k, r3)  # H[a, l, r]
        tmp = np.einsum("kl,akq->alq", sigK, H, optimize=True)  # Σ_k Σ_K[k,l] H_k
        Cpre = H.transpose(0, 1, 2).reshape(r4 * k, r3).T @ tmp.reshape(r4 * k, r3)
        Cpre = 0.5 * (Cpre + Cpre.T)
        Cpre[np.diag_indices(r3)] += 1e-10 * max(float(np.trace(Cpre)) / r3, 1e-300)
        try:
            cpre_f = sla.cho_factor(Cpre, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            cpre_f = None

        def prec(R):
            Z = sla.cho_solve(sig_S_chol, R, check_finite=False)
            if cpre_f is not None:
                Z = sla.cho_solve(cpre_f, Z.T, check_finite=False).T
            return Z

        # warm start at the current iterate: every CG step lowers the quadratic,
        # so even a truncated solve decreases the Σ-objective.  Stop on a
        # relative reduction of the *initial* residual.
        x = U0.copy()
        r = rhs - self._apply(x, Hre)
        r0 = float(np.linalg.norm(r))
        if r0 == 0.0:
            return x
        z = prec(r)
        p = z.copy()
        rz = float(np.vdot(r, z))
        for _ in range(cg_maxiter):
            if float(np.linalg.norm(r)) <= cg_tol * r0 or rz <= 0.0:
                break
            Ap = self._apply(p, Hre)
            pAp = float(np.vdot(p, Ap))
            if pAp <= 0.0:
                break
            alpha = rz / pAp
            x += alpha * p
            r -= alpha * Ap
            z = prec(r)
            rz_new = float(np.vdot(r, z))
            p = z + (rz_new / rz) * p
            rz = rz_new
        return x


def tucker2_sigma_als(
    K: np.ndarray,
    r3: int,
    r4: int,
    sigma: np.ndarray,
    n_iter_max: int = 20,
    tol: float = 1e-6,
    init: "str | Tucker2Factors | np.ndarray | None" = None,
    eps: float = 1e-6,
    dense_max: int = 1024,
    cg_maxiter: int = 10,
    cg_tol: float = 1e-2,
    init_hooi_iter: int = 50,
    WC: np.ndarray | None = None,
) -> Tucker2Factors:
    """Tucker2-ALS-Σ: minimize ‖(W − Ŵ)L‖², Σ + ε·tr(Σ)/D·I = LLᵀ (§4).

    Alternates
      * U_T, core | U_S : closed form (top-R4 eigenvectors of Z N⁻¹ Zᵀ with
        Z = WΣB, N = BᵀΣB, B = U_S ⊗ I_k; core = U_Tᵀ Z N⁻¹);
      * U_S | U_T, core : the coupled linear system
        Σ_kl Σ_kl U_S (H_lᵀ H_k) = Σ_l (WΣ)_[l]ᵀ U_T H_l, solved densely when
        S·R3 ≤ ``dense_max`` else by matrix-free preconditioned CG
        (Kronecker preconditioner, warm start, ≤ ``cg_maxiter`` steps – an
        inexact solve still decreases the objective), then QR.
    The objective is monotone: a sweep that would increase it is reverted
    and the iteration stops; it also stops when the relative output error
    decreases by less than ``tol``.

    ``init``: ``None``/``'kron'`` (Kronecker-whitened HOOI, default – the
    result is then never worse than :func:`tucker2_kron`), ``'hosvd'``,
    ``'hooi'``, a :class:`Tucker2Factors`, or an (S, R3) U_S array.  Only U_S
    is used from an initializer (U_T and the core are solved for).

    ``output_rel_error`` is computed explicitly under the regularized Σ;
    ``history`` holds the relative output error after each accepted sweep
    (entry 0: the initializer with optimal U_T/core).

    ``WC``: the product W·C (T, D) when the caller already has it (the damped
    compensating target of decompose.compensate does: C_yx + δW); spares a
    T·D² product.
    """
    K, r3, r4 = _check_kernel(K, r3, r4)
    T, S, Kh, Kw = K.shape
    k = Kh * Kw
    D = S * k
    # one D×D working copy: symmetrized Σ with the ridge added in place
    C = _sym_sigma(sigma, D)
    C[np.diag_indices(D)] += eps * float(np.trace(C)) / D
    K3 = K.reshape(T, S, k)
    W = K.reshape(T, D)

    # --- initial U_S
    if init is None or (isinstance(init, str) and init == "kron"):
        _, U_S, _, _, _, _, _ = _kron_init(K3, r3, r4, C, eps, init_hooi_iter, tol)
    elif isinstance(init, str) and init == "hosvd":
        X1 = K3.transpose(1, 0, 2).reshape(S, -1)
        U_S, _ = top_eigvecs(X1 @ X1.T, r3)
    elif isinstance(init, str) and init == "hooi":
        _, U_S, _, _, _ = hooi(K3, r3, r4, init_hooi_iter, tol)
    elif isinstance(init, Tucker2Factors):
        U_S = np.linalg.qr(np.asarray(init.U_S, dtype=np.float64))[0]
    elif isinstance(init, np.ndarray):
        U_S = np.linalg.qr(np.asarray(init, dtype=np.float64))[0]
    else:
        raise ValueError(f"unknown init {init!r}")
    if U_S.shape != (S, r3):
        raise ValueError(f"init U_S has shape {U_S.shape}, expected {(S, r3)}")

    st = _SigmaALS(W, C, S, k, r3, r4, WC)   # WC: W·C when the caller has it (saves a T·D² product)
    if st.wnorm2 <= 0.0:
        core = np.zeros((r4, r3, Kh, Kw))
        U_T = np.eye(T, r4)
        return Tucker2Factors(core, U_T, U_S, 1.0 if np.any(K) else 0.0, 0.0, 0, [0.0])
    sig_S, sig_K = kron_factors(C, S, k)
    st._sig_K = sig_K
    sig_S_chol = None
    if S * r3 > dense_max:
        sig_S_chol = (regularized_cholesky(sig_S, 1e-12)[0], True)

    def rel(f):
        return math.sqrt(f / st.wnorm2)

    U_T, Gm, f = st.ut_step(U_S)
    hist = [rel(f)]
    it = 0
    for it in range(1, n_iter_max + 1):
        U_new = st.us_step(U_T, Gm, U_S, sig_S_chol, dense_max, cg_maxiter, cg_tol)
        if not np.all(np.isfinite(U_new)):
            it -= 1
            break
        Q, _ = np.linalg.qr(U_new)
        U_T2, Gm2, f2 = st.ut_step(Q)
        if f2 > f * (1.0 + 1e-12) + 1e-300:
            it -= 1  # revert: keep previous iterate, stop
            break
        dec = rel(f) - rel(f2)
        U_S, U_T, Gm, f = Q, U_T2, Gm2, f2
        hist.append(rel(f))
        if dec < tol:
            break

    core = Gm.reshape(r4, k, r3).transpose(0, 2, 1).reshape(r4, r3, Kh, Kw)
    core = np.ascontiguousarray(core)
    Khat = tucker2_reconstruct(core, U_T, U_S)
    kn = float(np.linalg.norm(K))
    rel_w = float(np.linalg.norm(K - Khat)) / kn if kn > 0 else 0.0
    out = rel(f)
    if out < 1e-4 or T * D * D <= 2**27:
        # explicit ‖(W − Ŵ)L‖ (the closed form loses digits when the error is tiny;
        # for big layers it is accurate and saves a T·D² product)
        E = W - Khat.reshape(T, D)
        out = math.sqrt(max(float(np.sum((E @ C) * E)), 0.0) / st.wnorm2)
    info = {"n_matvec": st.n_matvec, "solver": "dense" if S * r3 <= dense_max else "pcg"}
    return Tucker2Factors(
        core=core, U_T=U_T, U_S=U_S, rel_error=rel_w, output_rel_error=out, n_iter=it, history=hist, info=info
    )


# --------------------------------------------------------------------------- output refit


def refit_last(Z: np.ndarray, Y: np.ndarray, ridge: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares refit of the last 1×1 factor and bias.

    [W3, b] = argmin ‖Y − Z W3ᵀ − b‖² over rows, with Z (N, R4) the chain's
    penultimate activations and Y (N, T) the original conv outputs (both
    flattened over batch and positions).  A ridge of ``ridge·tr(ZcᵀZc)/R4``
    on the centered Gram keeps it well posed.  Returns W3 (T, R4), b (T,).
    """
    Z = np.asarray(Z, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Z.ndim != 2 or Y.ndim != 2 or Z.shape[0] != Y.shape[0]:
        raise ValueError(f"expected Z (N, R4) and Y (N, T), got {Z.shape} and {Y.shape}")
    mz = Z.mean(axis=0)
    my = Y.mean(axis=0)
    Zc = Z - mz
    Yc = Y - my
    G = Zc.T @ Zc
    r = G.shape[0]
    lam = ridge * max(float(np.trace(G)) / max(r, 1), 1e-300)
    G[np.diag_indices(r)] += lam
    rhs = Zc.T @ Yc  # (R4, T)
    try:
        W3t = sla.solve(G, rhs, assume_a="pos", check_finite=False)
    except np.linalg.LinAlgError:
        W3t = sla.lstsq(G, rhs, check_finite=False)[0]
    W3 = W3t.T
    b = my - W3 @ mz
    return W3, b
