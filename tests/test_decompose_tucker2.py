import numpy as np
import pytest

from onnxcompress.decompose.allocate import LayerSpec, proportional_ranks
from onnxcompress.decompose.tucker2 import tucker2, tucker2_params


def _kernel(T=24, S=20, k=(3, 3), seed=0):
    return np.random.default_rng(seed).standard_normal((T, S) + k)


def test_full_rank_is_exact():
    K = _kernel()
    res = tucker2(K, 20, 24)
    assert res.rel_error < 1e-12
    assert np.linalg.norm(res.to_tensor() - K) / np.linalg.norm(K) < 1e-12


def test_error_identity_and_monotone_in_ranks():
    K = _kernel(seed=1)
    errs = []
    for r in (2, 5, 10, 15, 20):
        res = tucker2(K, r, r)
        direct = np.linalg.norm(res.to_tensor() - K) / np.linalg.norm(K)
        assert abs(direct - res.rel_error) < 1e-10
        # ||K - K^||^2 = ||K||^2 - ||G||^2
        assert abs(np.sum(K**2) - np.sum(res.core**2) - direct**2 * np.sum(K**2)) < 1e-8 * np.sum(K**2)
        errs.append(res.rel_error)
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:]))


def test_hooi_not_worse_than_hosvd_and_matches_tensorly():
    from tensorly.decomposition import partial_tucker  # a core dependency: never skipped

    K = _kernel(32, 24, seed=2)
    hosvd = tucker2(K, 8, 10, n_iter_max=0)
    hooi = tucker2(K, 8, 10, n_iter_max=100, tol=1e-12)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    (core, (ut, us)), _ = partial_tucker(K, rank=[10, 8], modes=[0, 1], init="svd", n_iter_max=100, tol=1e-12)
    rec = np.einsum("ab...,ta,sb->ts...", core, ut, us)
    ref = np.linalg.norm(rec - K) / np.linalg.norm(K)
    assert abs(ref - hooi.rel_error) < 1e-4


def test_exact_on_low_rank_kernel():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((5, 4, 3, 3))
    UT = np.linalg.qr(rng.standard_normal((16, 5)))[0]
    US = np.linalg.qr(rng.standard_normal((12, 4)))[0]
    K = np.einsum("abhw,ta,sb->tshw", G, UT, US)
    assert tucker2(K, 4, 5).rel_error < 1e-6  # subspaces are found with float32 GEMMs


@pytest.mark.parametrize("T,S", [(64, 64), (128, 64), (256, 256), (512, 512)])
@pytest.mark.parametrize("ratio", [1.5, 2, 3, 4, 8])
def test_proportional_ranks_hit_target(T, S, ratio):
    r = proportional_ranks(LayerSpec("l", T, S, 3, 3, 8, 8, 8, 8, 0), ratio)
    assert r is not None
    achieved = T * S * 9 / tucker2_params(T, S, 9, *r)
    assert abs(achieved - ratio) / ratio < 0.05
