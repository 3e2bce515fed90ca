"""Tests for onnxcompress.decompose.sigma (plain and data-aware Tucker2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxcompress.decompose.sigma import (
    Tucker2Factors,
    refit_last,
    tucker2_hooi,
    tucker2_kron,
    tucker2_reconstruct,
    tucker2_sigma_als,
)
from onnxcompress.decompose.stats import ConvInputStats, conv_output_shape, im2col


# --------------------------------------------------------------------------- helpers


def conv(x, K, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """ONNX Conv (group 1, no bias) via im2col (im2col is checked in test_stats)."""
    n = x.shape[0]
    t, s, kh, kw = K.shape
    P = im2col(x, kh, kw, strides, pads, dilations)
    ho, wo = conv_output_shape(x.shape[2], x.shape[3], kh, kw, strides, pads, dilations)
    return (P @ K.reshape(t, -1).T).reshape(n, ho, wo, t).transpose(0, 3, 1, 2)


def run_chain(x, f: Tucker2Factors, strides, pads, dilations):
    w1, w2, w3 = f.chain_weights()
    z1 = conv(x, w1)
    z2 = conv(z1, w2, strides, pads, dilations)
    return conv(z2, w3), z2


def low_multilinear_kernel(rng, T, S, k=(3, 3), r=(6, 5), noise=0.05):
    G = rng.standard_normal((r[0], r[1]) + k)
    A = rng.standard_normal((T, r[0]))
    B = rng.standard_normal((S, r[1]))
    K = tucker2_reconstruct(G, A, B)
    return K + noise * np.linalg.norm(K) / math.sqrt(K.size) * rng.standard_normal(K.shape)


def relu_features(rng, n, S, H, mix, bias):
    """ReLU of channel-mixed, spatially smoothed Gaussian noise (correlated in s, h, w)."""
    z = rng.standard_normal((n, S, H + 2, H + 2))
    z = (z[:, :, :-2, :-2] + z[:, :, 1:-1, 1:-1] + z[:, :, 2:, 2:] + z[:, :, 1:-1, :-2] + z[:, :, :-2, 1:-1]) / math.sqrt(5)
    x = np.einsum("cs,nshw->nchw", mix, z) + bias[None, :, None, None]
    return np.maximum(x, 0.0)


@pytest.fixture(scope="module")
def relu_problem():
    """T=32, S=24, 3×3 conv with pads 1 on correlated ReLU features (ALGORITHMS §4 table)."""
    rng = np.random.default_rng(1)
    T, S = 32, 24
    mix = rng.standard_normal((S, S)) * (0.7 ** np.arange(S))[None, :]
    bias = 0.5 * rng.standard_normal(S)
    K = rng.standard_normal((T, S, 3, 3))
    stats = ConvInputStats(3, 3, pads=(1, 1, 1, 1), max_positions=2048, seed=0)
    for _ in range(4):
        stats.update(relu_features(rng, 16, S, 16, mix, bias))
    P_test = im2col(relu_features(rng, 16, S, 16, mix, bias), 3, 3, pads=(1, 1, 1, 1))
    return K, stats.sigma, P_test


def heldout_err(K, Khat, P):
    T = K.shape[0]
    W = K.reshape(T, -1)
    return np.linalg.norm((W - Khat.reshape(T, -1)) @ P.T) / np.linalg.norm(W @ P.T)


# --------------------------------------------------------------------------- plain HOOI


def test_hooi_full_rank_exact_and_orthonormal():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((10, 7, 3, 3))
    f = tucker2_hooi(K, 7, 10)
    assert f.core.shape == (10, 7, 3, 3) and f.U_T.shape == (10, 10) and f.U_S.shape == (7, 7)
    assert f.rel_error <= 1e-12
    assert np.linalg.norm(K - f.reconstruct()) / np.linalg.norm(K) <= 1e-12
    g = tucker2_hooi(K, 3, 4)
    np.testing.assert_allclose(g.U_T.T @ g.U_T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(g.U_S.T @ g.U_S, np.eye(3), atol=1e-12)


def test_hooi_error_identity_and_monotone_in_ranks():
    rng = np.random.default_rng(1)
    K = low_multilinear_kernel(rng, 16, 12, r=(8, 6), noise=0.3)
    kn2 = float(np.sum(K * K))
    errs = {}
    for r3 in range(1, 13, 2):
        for r4 in range(1, 17, 3):
            f = tucker2_hooi(K, r3, r4, n_iter_max=100, tol=1e-12)
            lhs = float(np.sum((K - f.reconstruct()) ** 2))
            rhs = kn2 - float(np.sum(f.core**2))
            assert abs(lhs - rhs) <= 1e-10 * kn2
            assert f.history[-1] == pytest.approx(f.rel_error, abs=1e-7)
            errs[r3, r4] = f.rel_error
    for (r3, r4), e in errs.items():
        for (a, b), e2 in errs.items():
            if a >= r3 and b >= r4:
                assert e2 <= e + 1e-9, ((r3, r4), e, (a, b), e2)


def test_hooi_not_worse_than_hosvd():
    rng = np.random.default_rng(2)
    K = low_multilinear_kernel(rng, 20, 16, r=(10, 9), noise=0.5)
    for r3, r4 in [(2, 3), (4, 4), (6, 9), (9, 10)]:
        hosvd = tucker2_hooi(K, r3, r4, n_iter_max=0)
        hooi = tucker2_hooi(K, r3, r4)
        assert hooi.rel_error <= hosvd.rel_error + 1e-12
        hist = np.array(hooi.history)
        assert np.all(np.diff(hist) <= 1e-12)


def test_hooi_agrees_with_tensorly():
    import tensorly as tl  # a core dependency: never skipped
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    rng = np.random.default_rng(3)
    K = low_multilinear_kernel(rng, 24, 16, r=(10, 8), noise=0.2)
    for r3, r4 in [(4, 6), (8, 10), (12, 14)]:
        out = partial_tucker(K, rank=[r4, r3], modes=[0, 1], init="svd", n_iter_max=200, tol=1e-12)
        (core, (UT, US)), _ = out if len(out) == 2 and isinstance(out[0], tuple) else (out, None)
        Ktl = tucker2_reconstruct(core, UT, US)
        e_tl = np.linalg.norm(K - Ktl) / np.linalg.norm(K)
        f = tucker2_hooi(K, r3, r4, n_iter_max=200, tol=1e-12)
        assert abs(f.rel_error - e_tl) <= 1e-6 * e_tl
        assert np.linalg.norm(f.reconstruct() - Ktl) / np.linalg.norm(K) < 1e-4


@pytest.mark.parametrize("full", [True, False])
def test_chain_composes_to_reconstruction(full):
    """conv1 (1×1) → conv2 (core, original stride/pads/dilation) → conv3 (1×1) == conv with K̂."""
    rng = np.random.default_rng(4)
    T, S = 6, 5
    K = rng.standard_normal((T, S, 3, 2))
    f = tucker2_hooi(K, S, T) if full else tucker2_hooi(K, 3, 4)
    w1, w2, w3 = f.chain_weights()
    assert w1.shape == (f.ranks[0], S, 1, 1) and w3.shape == (T, f.ranks[1], 1, 1)
    Kc = np.einsum("ta,arhw,rs->tshw", w3[:, :, 0, 0], w2, w1[:, :, 0, 0])
    np.testing.assert_allclose(Kc, f.reconstruct(), atol=1e-13)
    cfg = ((2, 1), (1, 2, 0, 1), (1, 2))
    x = rng.standard_normal((2, S, 9, 8))
    y_chain, _ = run_chain(x, f, *cfg)
    y_ref = conv(x, K if full else f.reconstruct(), *cfg)
    assert np.linalg.norm(y_chain - y_ref) / np.linalg.norm(y_ref) <= 1e-12


# --------------------------------------------------------------------------- data-aware


def test_kron_and_als_full_rank_exact(relu_problem):
    K, sigma, _ = relu_problem
    T, S = K.shape[:2]
    for f in (tucker2_kron(K, S, T, sigma), tucker2_sigma_als(K, S, T, sigma, n_iter_max=3)):
        assert f.rel_error <= 1e-9
        assert f.output_rel_error <= 1e-8


def test_data_aware_beats_plain_on_correlated_relu_features(relu_problem):
    """ALGORITHMS §4 table: held-out output error Σ-ALS ≤ Kron ≤ plain (≈0.73/0.75/0.96 at R=4)."""
    K, sigma, P_test = relu_problem
    res = {}
    for R in (4, 8, 12):
        plain = heldout_err(K, tucker2_hooi(K, R, R).reconstruct(), P_test)
        kron = tucker2_kron(K, R, R, sigma)
        als = tucker2_sigma_als(K, R, R, sigma)
        e_k, e_a = heldout_err(K, kron.reconstruct(), P_test), heldout_err(K, als.reconstruct(), P_test)
        assert e_a <= e_k <= plain, (R, e_a, e_k, plain)
        # on the calibration Σ ALS (Kron init) is never worse than Kron
        assert als.output_rel_error <= kron.output_rel_error + 1e-12
        # data-aware costs weight-space accuracy (expected)
        assert als.rel_error >= tucker2_hooi(K, R, R).rel_error - 1e-12
        res[R] = (plain, e_k, e_a)
    assert res[4][0] > 0.85 and res[4][2] < res[4][0] - 0.1
    assert res[12][2] < res[8][2] < res[4][2]


@pytest.mark.parametrize("init,dense_max", [("hosvd", 10**6), ("hosvd", 0), ("kron", 0), ("hooi", 10**6)])
def test_als_monotone_and_consistent(relu_problem, init, dense_max):
    """Objective is monotone for both U_S solvers; returned core layout matches the internal one."""
    K, sigma, _ = relu_problem
    f = tucker2_sigma_als(K, 6, 8, sigma, n_iter_max=15, tol=0.0, init=init, dense_max=dense_max)
    h = np.array(f.history)
    assert len(h) == f.n_iter + 1 and f.n_iter >= 3
    assert np.all(np.diff(h) <= 1e-12), h
    # closed-form objective == explicit ‖(W − Ŵ)L‖/‖WL‖ of the returned (core, U_T, U_S)
    assert f.output_rel_error == pytest.approx(h[-1], rel=1e-8)
    assert f.core.shape == (8, 6, 3, 3)
    np.testing.assert_allclose(f.U_S.T @ f.U_S, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(f.U_T.T @ f.U_T, np.eye(8), atol=1e-10)


def test_als_dense_and_cg_agree(relu_problem):
    K, sigma, _ = relu_problem
    a = tucker2_sigma_als(K, 5, 5, sigma, n_iter_max=8, tol=0.0, init="hosvd", dense_max=10**6)
    b = tucker2_sigma_als(K, 5, 5, sigma, n_iter_max=8, tol=0.0, init="hosvd", dense_max=0, cg_maxiter=200, cg_tol=1e-12)
    assert b.output_rel_error == pytest.approx(a.output_rel_error, rel=1e-6)


def test_als_identity_sigma_matches_hooi():
    """Σ = I with HOOI init: within 0.1 % of the HOOI error (ALGORITHMS §7.8)."""
    rng = np.random.default_rng(5)
    K = low_multilinear_kernel(rng, 16, 12, r=(9, 7), noise=0.4)
    D = 12 * 9
    for r3, r4 in [(3, 4), (6, 8)]:
        hooi = tucker2_hooi(K, r3, r4, n_iter_max=100, tol=1e-10)
        for dense_max in (10**6, 0):
            als = tucker2_sigma_als(K, r3, r4, np.eye(D), init=hooi, dense_max=dense_max)
            assert abs(als.output_rel_error - hooi.rel_error) <= 1e-3 * hooi.rel_error
            assert als.rel_error == pytest.approx(als.output_rel_error, rel=1e-5)


def test_kron_exact_for_kronecker_sigma():
    """If Σ = Σ_S ⊗ Σ_K exactly, Kron whitening is already Σ-optimal: ALS barely improves."""
    rng = np.random.default_rng(6)
    S, T, k = 10, 12, 9
    A = rng.standard_normal((S, S))
    B = rng.standard_normal((k, k))
    sigma = np.kron(A @ A.T + 0.1 * np.eye(S), B @ B.T + 0.1 * np.eye(k))
    K = rng.standard_normal((T, S, 3, 3))
    kron = tucker2_kron(K, 4, 5, sigma, n_iter_max=200, tol=1e-12)
    plain = tucker2_hooi(K, 4, 5)
    als = tucker2_sigma_als(K, 4, 5, sigma, init=kron, dense_max=0, n_iter_max=5)
    W = K.reshape(T, -1)
    from onnxcompress.decompose.svd import sigma_output_rel_error

    e_plain = sigma_output_rel_error(W, plain.reconstruct().reshape(T, -1), sigma)
    assert kron.output_rel_error < e_plain
    assert als.output_rel_error <= kron.output_rel_error + 1e-12
    assert als.output_rel_error >= kron.output_rel_error - 1e-4


def test_als_rejects_bad_shapes(relu_problem):
    K, sigma, _ = relu_problem
    with pytest.raises(ValueError):
        tucker2_sigma_als(K, 4, 4, sigma[:-1, :-1])
    with pytest.raises(ValueError):
        tucker2_sigma_als(K, 4, 4, sigma, init=np.eye(5, 4))
    with pytest.raises(ValueError):
        tucker2_kron(K, 0, 4, sigma)


# --------------------------------------------------------------------------- output refit


def test_refit_last_exact_recovery():
    rng = np.random.default_rng(7)
    Z = rng.standard_normal((500, 6))
    W3 = rng.standard_normal((9, 6))
    b = rng.standard_normal(9)
    W3h, bh = refit_last(Z, Z @ W3.T + b)
    np.testing.assert_allclose(W3h, W3, atol=1e-6)
    np.testing.assert_allclose(bh, b, atol=1e-6)


def test_refit_last_reduces_output_error(relu_problem):
    K, sigma, _ = relu_problem
    rng = np.random.default_rng(8)
    T, S = K.shape[:2]
    mix = rng.standard_normal((S, S)) * (0.7 ** np.arange(S))[None, :]
    bias_in = 0.5 * rng.standard_normal(S)
    x = relu_features(rng, 8, S, 12, mix, bias_in)
    cfg = ((1, 1), (1, 1, 1, 1), (1, 1))
    y = conv(x, K, *cfg) + 0.3  # original conv with a bias
    f = tucker2_hooi(K, 5, 6)
    y_chain, z2 = run_chain(x, f, *cfg)
    y_chain = y_chain + 0.3
    Z = z2.transpose(0, 2, 3, 1).reshape(-1, 6)
    Y = y.transpose(0, 2, 3, 1).reshape(-1, T)
    W3, b = refit_last(Z, Y)
    y_refit = Z @ W3.T + b
    e0 = np.linalg.norm(y_chain.transpose(0, 2, 3, 1).reshape(-1, T) - Y) / np.linalg.norm(Y)
    e1 = np.linalg.norm(y_refit - Y) / np.linalg.norm(Y)
    assert W3.shape == (T, 6) and b.shape == (T,)
    assert e1 < 0.9 * e0, (e0, e1)
