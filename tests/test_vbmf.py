"""Tests for onnxcompress.decompose.vbmf (ALGORITHMS.md §3, sanity test 5)."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from onnxcompress.decompose.vbmf import (
    EVBMFResult,
    evbmf,
    svd_vbmf_rank,
    tucker2_vbmf_ranks,
    unfold,
    weaken_rank,
)


SHAPES = [(64, 576), (128, 1152), (256, 256)]
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _orth(rng, n, r):
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def _low_rank_plus_noise(rng, L, M, r, sigma):
    """Rank-r signal with singular values 4..10 x sqrt(max(L,M)) sigma (well above the MP edge) + N(0, sigma^2)."""
    m = max(L, M)
    s = rng.uniform(4.0, 10.0, r) * math.sqrt(m) * sigma
    X = _orth(rng, L, r) @ np.diag(s) @ _orth(rng, M, r).T
    return X + sigma * rng.standard_normal((L, M)), np.sort(s)[::-1]


# --------------------------------------------------------------------------------------------
# EVBMF on synthetic matrices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,M", SHAPES)
@FAST
@given(r=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       log_sigma=st.floats(-4.0, 1.0))
def test_rank_and_sigma_recovered(L, M, r, seed, log_sigma):
    rng = np.random.default_rng(seed)
    sigma = 10.0**log_sigma
    Y, _ = _low_rank_plus_noise(rng, L, M, r, sigma)
    res = evbmf(Y)
    assert isinstance(res, EVBMFResult)
    assert res.rank == r
    assert abs(res.sigma2 / sigma**2 - 1.0) < 0.05
    # threshold is consistent with the reported rank
    assert res.singular_values[r - 1] > res.threshold >= res.singular_values[r]


@pytest.mark.parametrize("L,M", SHAPES)
@FAST
@given(seed=st.integers(0, 2**31 - 1), log_sigma=st.floats(-4.0, 2.0))
def test_pure_noise_gives_rank_zero(L, M, seed, log_sigma):
    rng = np.random.default_rng(seed)
    sigma = 10.0**log_sigma
    res = evbmf(sigma * rng.standard_normal((L, M)))
    assert res.rank == 0
    assert abs(res.sigma2 / sigma**2 - 1.0) < 0.05
    assert np.all(res.shrunk == 0)


@pytest.mark.parametrize("L,M", [(64, 576), (256, 256), (40, 300)])
def test_transpose_invariance(L, M):
    rng = np.random.default_rng(3)
    Y, _ = _low_rank_plus_noise(rng, L, M, 7, 0.02)
    a, b = evbmf(Y), evbmf(Y.T)
    assert a.rank == b.rank == 7
    # square inputs are not re-oriented: Y and Y.T differ by SVD round-off only, and Omega is
    # flat near its minimum, so allow a small optimizer difference
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-3)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-3)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-10)


@FAST
@given(seed=st.integers(0, 2**31 - 1), log_c=st.floats(-6.0, 4.0))
def test_scale_equivariance(seed, log_c):
    """sigma2 scales with c^2 and the rank is unchanged (guards against absolute optimizer tolerances)."""
    rng = np.random.default_rng(seed)
    Y, _ = _low_rank_plus_noise(rng, 64, 576, 5, 1.0)
    c = 10.0**log_c
    a, b = evbmf(Y), evbmf(c * Y)
    assert a.rank == b.rank == 5
    assert b.sigma2 / c**2 == pytest.approx(a.sigma2, rel=1e-4)


def test_given_sigma2_uses_threshold_formula():
    rng = np.random.default_rng(0)
    L, M = 64, 576
    Y, _ = _low_rank_plus_noise(rng, L, M, 6, 0.1)
    sigma2 = 0.01
    res = evbmf(Y, sigma2=sigma2)
    alpha = L / M  # 1/9
    tau_bar = 2.5129 * math.sqrt(alpha)
    xbar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # hand value: tau_bar = 0.837633.., xbar = 2.08144.., threshold = sqrt(576 * 0.01 * xbar) = 3.4624..
    assert xbar == pytest.approx(2.08144, abs=1e-4)
    assert res.threshold == pytest.approx(math.sqrt(M * sigma2 * xbar), rel=1e-12)
    assert res.threshold == pytest.approx(3.4625, abs=1e-3)
    s = np.linalg.svd(Y, compute_uv=False)
    assert res.rank == int(np.sum(s > res.threshold)) == 6
    # a huge sigma2 kills everything
    assert evbmf(Y, sigma2=1e6).rank == 0


def test_shrinkage_reconstruction_beats_truncated_svd():
    """EVB posterior-mean singular values give a better estimate of the signal than plain truncation."""
    rng = np.random.default_rng(11)
    L, M, r, sigma = 128, 1152, 10, 0.05
    s = rng.uniform(1.3, 2.5, r) * math.sqrt(M) * sigma  # moderate SNR, where shrinkage matters
    X = _orth(rng, L, r) @ np.diag(s) @ _orth(rng, M, r).T
    Y = X + sigma * rng.standard_normal((L, M))
    res = evbmf(Y)
    assert res.rank == r
    U, obs, Vt = np.linalg.svd(Y, full_matrices=False)
    np.testing.assert_allclose(obs, res.singular_values, rtol=1e-10)
    sh = res.shrunk[:r]
    assert np.all(sh > 0) and np.all(sh < obs[:r])
    assert np.all(res.shrunk[r:] == 0)
    X_trunc = (U[:, :r] * obs[:r]) @ Vt[:r]
    X_evb = (U[:, :r] * sh) @ Vt[:r]
    assert np.linalg.norm(X_evb - X) < 0.9 * np.linalg.norm(X_trunc - X)


@pytest.mark.parametrize("sigma", [1e-6, 1e-10])
def test_high_snr_sigma_estimate(sigma):
    """sigma2 << sigma2_hi: needs the log-scale search (a linear golden section cannot resolve it)."""
    rng = np.random.default_rng(4)
    Y = _orth(rng, 64, 3) @ np.diag([3.0, 2.0, 1.0]) @ _orth(rng, 576, 3).T
    Y += sigma * rng.standard_normal(Y.shape)
    res = evbmf(Y)
    assert res.rank == 3
    assert abs(res.sigma2 / sigma**2 - 1.0) < 0.05


def test_noise_free_low_rank_and_zero_matrix():
    rng = np.random.default_rng(5)
    Y = rng.standard_normal((64, 5)) @ rng.standard_normal((5, 576))
    assert evbmf(Y).rank == 5
    z = evbmf(np.zeros((10, 20)))
    assert z.rank == 0 and z.sigma2 == 0.0


def test_bad_input():
    with pytest.raises(ValueError):
        evbmf(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError):
        evbmf(np.ones((3, 4)), sigma2=0.0)


# --------------------------------------------------------------------------------------------
# Weakening
# --------------------------------------------------------------------------------------------
def test_weaken_hand_values():
    assert weaken_rank(64, 24, 0.0) == 64
    assert weaken_rank(64, 24, 1.0) == 24
    assert weaken_rank(64, 24, 0.5) == 44
    assert weaken_rank(64, 24, 0.3) == 52  # 64 - 0.3*40 = 52 exactly (float guard)
    assert weaken_rank(64, 24, 0.33) == 50  # floor(50.8)
    assert weaken_rank(64, 3, 1.0) == 8  # r_min
    assert weaken_rank(64, 3, 1.0, r_min=2) == 3
    assert weaken_rank(8, 2, 1.0) == 8  # full <= r_min
    assert weaken_rank(6, 2, 1.0) == 6
    assert weaken_rank(64, 0, 1.0) == 64  # EVBMF found no signal
    with pytest.raises(ValueError):
        weaken_rank(64, 10, 1.5)


@settings(max_examples=200, deadline=None)
@given(full=st.integers(1, 2048), frac=st.floats(0, 1), w=st.floats(0, 1), r_min=st.integers(1, 16))
def test_weaken_properties(full, frac, w, r_min):
    ev = int(round(frac * full))
    r = weaken_rank(full, ev, w, r_min)
    if full <= r_min or ev == 0:
        assert r == full
        return
    assert max(ev, r_min) <= r <= full
    assert weaken_rank(full, ev, 0.0, r_min) == full
    assert weaken_rank(full, ev, 1.0, r_min) == max(ev, r_min)
    # monotone non-increasing in w
    assert weaken_rank(full, ev, min(1.0, w + 0.1), r_min) <= r


# --------------------------------------------------------------------------------------------
# Tucker2 / SVD ranks
# --------------------------------------------------------------------------------------------
def _tucker_kernel(rng, T, S, kh, kw, r4, r3, noise):
    """K = G x1 U_T x2 U_S: mode-0 (output, T) rank r4, mode-1 (input, S) rank r3."""
    G = rng.standard_normal((r4, r3, kh, kw))
    K = np.einsum("abhw,ta,sb->tshw", G, _orth(rng, T, r4), _orth(rng, S, r3))
    K /= np.sqrt(np.mean(K**2))
    return K + noise * rng.standard_normal(K.shape)


def test_unfold_convention():
    X = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(unfold(X, 0), X.reshape(2, 60))
    np.testing.assert_array_equal(unfold(X, 1)[1], X[:, 1].ravel())


@pytest.mark.parametrize("T,S", [(64, 64), (96, 48)])
def test_tucker2_ranks_20_24(T, S):
    rng = np.random.default_rng(7)
    # mode-0 (output T) rank 20, mode-1 (input S) rank 24
    K = _tucker_kernel(rng, T, S, 3, 3, r4=20, r3=24, noise=0.02)
    r3, r4 = tucker2_vbmf_ranks(K)
    assert (r3, r4) == (24, 20)
    # 3-D (T, S, K) kernels work too
    assert tucker2_vbmf_ranks(K.reshape(T, S, 9)) == (24, 20)
    # weakening
    assert tucker2_vbmf_ranks(K, weakening=0.0) == (S, T)
    assert tucker2_vbmf_ranks(K, weakening=0.5) == (weaken_rank(S, 24, 0.5), weaken_rank(T, 20, 0.5))
    assert tucker2_vbmf_ranks(K, weakening=1.0, r_min=22) == (24, 22)


def test_tucker2_random_normal_kernel_keeps_full_rank():
    """i.i.d. Gaussian kernels have no structure: EVBMF rank 0 -> weakening returns full ranks."""
    rng = np.random.default_rng(1)
    K = rng.standard_normal((64, 32, 3, 3)) * 0.05
    assert evbmf(unfold(K, 0)).rank == 0
    assert tucker2_vbmf_ranks(K) == (32, 64)


def test_tucker2_rejects_matrix_and_svd_rank():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError):
        tucker2_vbmf_ranks(np.ones((4, 4)))
    W, _ = _low_rank_plus_noise(rng, 200, 120, 15, 0.01)
    assert svd_vbmf_rank(W) == 15
    assert svd_vbmf_rank(W.T) == 15
    assert svd_vbmf_rank(W, weakening=0.0) == 120
    assert svd_vbmf_rank(W, weakening=0.5) == weaken_rank(120, 15, 0.5)
    assert svd_vbmf_rank(W, r_min=20) == 20
    # 1x1 conv kernel (T, S, 1, 1)
    assert svd_vbmf_rank(W.reshape(200, 120, 1, 1)) == 15
