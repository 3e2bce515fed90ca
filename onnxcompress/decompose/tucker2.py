"""Tucker2 of a conv kernel over its two channel modes (ALGORITHMS.md §1): HOSVD init + HOOI.

K (T, S, kh, kw) ≈ core ×₁ U_T ×₂ U_S with core (R4, R3, kh, kw), U_T (T, R4), U_S (S, R3), orthonormal
factors. Numpy only; top eigenvectors of small Gram matrices instead of SVDs of wide unfoldings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._blas import one_blas_thread


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




def _subspace_step(gram: np.ndarray, U: np.ndarray) -> np.ndarray:
    """One orthogonal-iteration step towards the top-r eigenvectors of `gram`, warm-started at U:
    O(n²r) instead of eigh's O(n³); HOOI re-solves these subspaces every sweep, so one step per sweep
    converges to the same fixed point."""
    Q, _ = np.linalg.qr(gram @ U)
    return Q


def _top_eigvecs(gram: np.ndarray, r: int) -> np.ndarray:
    w, v = np.linalg.eigh(gram)
    return v[:, ::-1][:, :r]


def tucker2(kernel: np.ndarray, r3: int, r4: int, *, n_iter_max: int = 5, tol: float = 1e-5) -> Tucker2Result:
    """Tucker2 by HOOI. `r3` ranks the input channels (S), `r4` the output channels (T)."""
    with one_blas_thread():
        return _tucker2(kernel, r3, r4, n_iter_max, tol)


def _tucker2(kernel, r3, r4, n_iter_max, tol) -> Tucker2Result:
    K = np.asarray(kernel, dtype=np.float64)
    T, S = K.shape[:2]
    if not (1 <= r3 <= S and 1 <= r4 <= T):
        raise ValueError(f"ranks (r3={r3}, r4={r4}) out of range for kernel {K.shape}")
    Kr = K.reshape(T, S, -1)                     # (T, S, k)
    k = Kr.shape[2]
    norm2 = float(np.sum(K * K))
    # The iterations only choose subspaces: float32 GEMMs (2x faster), float64 eigh; the final core and
    # error are computed in float64 from the chosen factors.
    X_T = Kr.reshape(T, S * k).astype(np.float32)                      # unfold0
    X_S = np.ascontiguousarray(Kr.transpose(1, 0, 2)).reshape(S, T * k).astype(np.float32)   # unfold1
    U_T = _top_eigvecs((X_T @ X_T.T).astype(np.float64), r4)           # HOSVD init
    U_S = _top_eigvecs((X_S @ X_S.T).astype(np.float64), r3)
    err_prev, it = np.inf, 0
    full = r3 == S and r4 == T
    for it in range(1, n_iter_max + 1):
        if full:
            break
        # U_T ← top-r4 left singular vectors of unfold0(K ×₂ U_Sᵀ)
        M = (X_S.reshape(S, T, k).transpose(1, 2, 0).reshape(T * k, S) @ U_S.astype(np.float32)).reshape(T, k * r3)
        U_T = _subspace_step((M @ M.T).astype(np.float64), U_T)
        # U_S ← top-r3 left singular vectors of unfold1(K ×₁ U_Tᵀ)
        N = (U_T.T.astype(np.float32) @ X_T).reshape(r4, S, k).transpose(1, 0, 2).reshape(S, r4 * k)
        U_S = _subspace_step((N @ N.T).astype(np.float64), U_S)
        G = U_S.T.astype(np.float32) @ N                                # (r3, r4·k)
        err = np.sqrt(max(norm2 - float(np.sum(G.astype(np.float64) ** 2)), 0.0) / norm2) if norm2 > 0 else 0.0
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
