"""Tucker2 of a conv kernel over its two channel modes (ALGORITHMS.md §1): HOSVD init + HOOI.

K (T, S, kh, kw) ≈ core ×₁ U_T ×₂ U_S with core (R4, R3, kh, kw), U_T (T, R4), U_S (S, R3), orthonormal
factors. Numpy only; top eigenvectors of small Gram matrices instead of SVDs of wide unfoldings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tucker2Result:
    core: np.ndarray   # (R4, R3, *spatial)
    U_T: np.ndarray    # (T, R4)  output-channel factor
    U_S: np.ndarray    # (S, R3)  input-channel factor
    rel_error: float   # ||K - K̂|| / ||K||
    n_iter: int

    @property
    def ranks(self) -> tuple[int, int]:
        """(R3, R4): input-side rank, output-side rank."""
        return self.U_S.shape[1], self.U_T.shape[1]

    def to_tensor(self) -> np.ndarray:
        return np.einsum("ab...,ta,sb->ts...", self.core, self.U_T, self.U_S, optimize=True)


def _blas_one_thread():
    """OpenBLAS threads make these mid-size eigh/GEMM calls 10-40x *slower* as soon as another process
    competes for the cores (measured on 2 busy cores: 128x128 eigh 6 ms with 1 thread vs 240 ms with 2;
    256x256x3x3 Tucker2 0.4 s vs 6 s). Limit BLAS to one thread where threadpoolctl is present."""
    global _CONTROLLER
    try:
        if _CONTROLLER is None:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER = ThreadpoolController()
        return _CONTROLLER.limit(limits=1, user_api="blas")
    except Exception:
        import contextlib
        return contextlib.nullcontext()


_CONTROLLER = None


def _top_eigvecs(gram: np.ndarray, r: int) -> np.ndarray:
    w, v = np.linalg.eigh(gram)
    return v[:, ::-1][:, :r]


def tucker2(kernel: np.ndarray, r3: int, r4: int, *, n_iter_max: int = 10, tol: float = 1e-5) -> Tucker2Result:
    """Tucker2 by HOOI. `r3` ranks the input channels (S), `r4` the output channels (T)."""
    with _blas_one_thread():
        return _tucker2(kernel, r3, r4, n_iter_max, tol)


def _tucker2(kernel, r3, r4, n_iter_max, tol) -> Tucker2Result:
    K = np.asarray(kernel, dtype=np.float64)
    T, S = K.shape[:2]
    if not (1 <= r3 <= S and 1 <= r4 <= T):
        raise ValueError(f"ranks (r3={r3}, r4={r4}) out of range for kernel {K.shape}")
    Kr = K.reshape(T, S, -1)                     # (T, S, k)
    norm2 = float(np.sum(K * K))
    # HOSVD init
    U_T = _top_eigvecs(np.einsum("tsk,usk->tu", Kr, Kr, optimize=True), r4)
    U_S = _top_eigvecs(np.einsum("tsk,tuk->su", Kr, Kr, optimize=True), r3)
    err_prev, it = np.inf, 0
    full = r3 == S and r4 == T
    for it in range(1, n_iter_max + 1):
        if full:
            break
        M = np.einsum("tsk,sb->tbk", Kr, U_S, optimize=True)          # (T, R3, k)
        U_T = _top_eigvecs(np.einsum("tbk,ubk->tu", M, M, optimize=True), r4)
        N = np.einsum("tsk,ta->ask", Kr, U_T, optimize=True)          # (R4, S, k)
        U_S = _top_eigvecs(np.einsum("ask,auk->su", N, N, optimize=True), r3)
        G = np.einsum("ask,sb->abk", N, U_S, optimize=True)
        err = np.sqrt(max(norm2 - float(np.sum(G * G)), 0.0) / norm2) if norm2 > 0 else 0.0
        if abs(err_prev - err) < tol:
            break
        err_prev = err
    G = np.einsum("tsk,ta,sb->abk", Kr, U_T, U_S, optimize=True)
    # direct residual: ||K||² − ||G||² loses ~half the digits when the error is tiny
    R = Kr - np.einsum("abk,ta,sb->tsk", G, U_T, U_S, optimize=True)
    err = float(np.sqrt(np.sum(R * R) / norm2)) if norm2 > 0 else 0.0
    core = G.reshape((r4, r3) + K.shape[2:])
    return Tucker2Result(core=core, U_T=U_T, U_S=U_S, rel_error=float(err), n_iter=it)


def tucker2_params(T: int, S: int, k: int, r3: int, r4: int) -> int:
    """Weights of the Tucker2 chain (no bias): S·R3 + R3·R4·k + R4·T."""
    return S * r3 + r3 * r4 * k + r4 * T
