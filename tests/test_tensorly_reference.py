"""Our numerics against tensorly, the well-kept reference implementation (a dev dependency: the package's
own HOOI and ALS are faster — measured in benchmarks/bench_cp.py — but must not be worse)."""
import numpy as np
import pytest

tl = pytest.importorskip("tensorly")


def _kernel(T=24, S=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    # decaying spectrum on both channel modes, like trained kernels
    K = rng.standard_normal((T, S, k, k))
    K *= (0.8 ** np.arange(T))[:, None, None, None] * (0.85 ** np.arange(S))[None, :, None, None]
    return K


@pytest.mark.parametrize("r3,r4", [(4, 6), (8, 12), (16, 24)])
def test_tucker2_matches_tensorly_partial_tucker(r3, r4):
    from tensorly.decomposition import partial_tucker

    from onnxcompress.decompose.tucker2 import tucker2

    K = _kernel()
    (core, factors), _ = partial_tucker(K, rank=[r4, r3], modes=[0, 1], init="svd", n_iter_max=100, tol=1e-10)
    ref = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    ref_err = np.linalg.norm(K - ref) / np.linalg.norm(K)
    ours = tucker2(K, r3, r4, n_iter_max=100, tol=1e-10)
    assert ours.rel_error <= ref_err * (1 + 1e-6) + 1e-12
    # the same subspaces (the fast HOOI chooses them with float32 GEMMs: agreement to ~1e-5)
    np.testing.assert_allclose(ours.to_tensor(), ref, atol=1e-4 * np.abs(K).max())


def test_cp_als_no_worse_than_tensorly_parafac():
    from tensorly.decomposition import parafac

    from onnxcompress.decompose.cp import cp_als

    rng = np.random.default_rng(1)
    A, B, C = (rng.standard_normal((n, 6)) for n in (12, 10, 9))
    X = np.einsum("ir,jr,kr->ijk", A, B, C) + 1e-3 * rng.standard_normal((12, 10, 9))
    ref = parafac(X, 6, init="svd", n_iter_max=2000, tol=1e-12, normalize_factors=True)
    ref_err = np.linalg.norm(X - tl.cp_to_tensor(ref)) / np.linalg.norm(X)
    ours = cp_als(X, 6, init="svd", n_iter_max=2000, tol=1e-12, random_state=0, dtype=np.float64)
    assert ours.rel_error <= ref_err * 1.05 + 1e-9
