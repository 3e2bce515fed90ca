"""Tests for onnxcompress.decompose.svd (plain and whitened truncated SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress.decompose.svd import (
    SVDResult,
    regularized_cholesky,
    sigma_output_rel_error,
    svd_factor,
    svd_rank_for_ratio,
    whitened_svd,
)


def _anisotropic_inputs(rng, n, d, decay=3.0):
    """Rows x = z diag(scales) Qᵀ: strongly anisotropic, randomly rotated."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.logspace(0, -decay, d)
    return (rng.standard_normal((n, d)) * scales) @ Q.T


def _out_err(W, W_hat, X):
    """Relative output error on the rows of X (y = W x)."""
    return np.linalg.norm((W - W_hat) @ X.T) / np.linalg.norm(W @ X.T)


def test_full_rank_exact_and_shapes():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20, 33))
    res = svd_factor(W, 20)
    assert isinstance(res, SVDResult)
    assert res.A.shape == (20, 20) and res.B.shape == (20, 33) and res.rank == 20
    assert np.linalg.norm(W - res.A @ res.B) / np.linalg.norm(W) <= 1e-10
    assert res.rel_error <= 1e-10
    assert res.output_rel_error is None
    # rank above min(out, in) is clamped
    assert svd_factor(W, 100).rank == 20


def test_balanced_split():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 25)) * np.logspace(0, 2, 25)
    res = svd_factor(W, 10)
    np.testing.assert_allclose(np.linalg.norm(res.A, axis=0), np.linalg.norm(res.B, axis=1), rtol=1e-12)
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(res.A, axis=0) ** 2, s[:10], rtol=1e-12)


def test_rel_error_matches_direct_and_eckart_young():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((30, 50))
    s = np.linalg.svd(W, compute_uv=False)
    prev = math.inf
    for r in range(1, 31):
        res = svd_factor(W, r)
        direct = np.linalg.norm(W - res.A @ res.B) / np.linalg.norm(W)
        assert res.rel_error == pytest.approx(direct, rel=1e-9, abs=1e-12)
        assert res.rel_error == pytest.approx(math.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)), abs=1e-12)
        assert res.rel_error <= prev + 1e-15
        prev = res.rel_error


def test_whitened_never_worse_than_plain_on_calibration_set():
    rng = np.random.default_rng(3)
    d_in, d_out, n = 48, 24, 3000
    X = _anisotropic_inputs(rng, n, d_in, decay=2.5)
    sigma = X.T @ X / n
    W = rng.standard_normal((d_out, d_in))
    strictly_better = 0
    for r in range(1, d_out):
        p = svd_factor(W, r, sigma=sigma)
        w = whitened_svd(W, r, sigma)
        ep, ew = _out_err(W, p.A @ p.B, X), _out_err(W, w.A @ w.B, X)
        assert ew <= ep * (1 + 1e-9) + 1e-12, (r, ew, ep)
        # reported output errors agree with the calibration-set measurement
        assert p.output_rel_error == pytest.approx(ep, rel=1e-8)
        assert w.output_rel_error == pytest.approx(ew, rel=1e-8)
        strictly_better += ew < 0.9 * ep
    assert strictly_better >= d_out // 2


def test_whitened_equals_plain_for_isotropic_sigma():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((16, 40))
    sigma = 3.7 * np.eye(40)
    for r in (1, 5, 12, 16):
        p = svd_factor(W, r, sigma=sigma)
        w = whitened_svd(W, r, sigma)
        np.testing.assert_allclose(w.A @ w.B, p.A @ p.B, atol=1e-10)
        assert w.output_rel_error == pytest.approx(p.output_rel_error, rel=1e-8, abs=1e-12)
        assert w.rel_error == pytest.approx(p.rel_error, rel=1e-8, abs=1e-12)


def test_whitened_full_rank_exact():
    rng = np.random.default_rng(5)
    X = _anisotropic_inputs(rng, 500, 30, decay=4)
    W = rng.standard_normal((12, 30))
    w = whitened_svd(W, 12, X.T @ X / 500)
    assert np.linalg.norm(W - w.A @ w.B) / np.linalg.norm(W) <= 1e-8


def test_spec_example_magnitude_heldout():
    """ALGORITHMS §6: 128×256, anisotropic inputs, r=16/32 – whitened ≪ plain."""
    rng = np.random.default_rng(6)
    d_in, d_out = 256, 128
    Q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    scales = 0.85 ** np.arange(d_in)  # input energy in a few dozen directions

    def draw(n):
        return (rng.standard_normal((n, d_in)) * scales) @ Q.T

    Xc, Xt = draw(4000), draw(2000)
    W = rng.standard_normal((d_out, d_in))
    sigma = Xc.T @ Xc / len(Xc)
    for r in (16, 32):
        p = svd_factor(W, r)
        ep = _out_err(W, p.A @ p.B, Xt)
        w = whitened_svd(W, r, sigma)
        ew = _out_err(W, w.A @ w.B, Xt)
        assert ep > 0.5  # spec: ≈0.83 / 0.69
        assert ew < 0.2 * ep and ew < 0.15, (r, ep, ew)  # spec: ≈0.07 / 0.01


def test_cholesky_retry_on_singular_sigma():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((5, 20))  # rank-5 second moment in 20-D
    sigma = X.T @ X / 5
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(sigma - 1e-9 * np.eye(20))
    L, e = regularized_cholesky(sigma, eps=0.0)
    assert e > 0.0
    assert np.all(np.isfinite(L))
    W = rng.standard_normal((8, 20))
    res = whitened_svd(W, 5, sigma, eps=0.0)
    assert res.eps_used is not None and res.eps_used > 0
    # rank 5 captures everything the inputs can see
    assert _out_err(W, res.A @ res.B, X) < 1e-4
    with pytest.raises(ValueError):
        regularized_cholesky(np.zeros((4, 4)))


def test_sigma_output_rel_error_definition():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((200, 10))
    W, Wh = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))
    sigma = X.T @ X / 200
    assert sigma_output_rel_error(W, Wh, sigma) == pytest.approx(_out_err(W, Wh, X), rel=1e-10)


def test_svd_rank_for_ratio():
    assert svd_rank_for_ratio(128, 256, 2) == 42
    assert svd_rank_for_ratio(1000, 10, 1) == 9
    assert svd_rank_for_ratio(1, 1, 2) is None
    assert svd_rank_for_ratio(4, 4, 3) is None  # 16/24 < 1
    assert svd_rank_for_ratio(100, 100, 2) == 25  # exact boundary
    with pytest.raises(ValueError):
        svd_rank_for_ratio(10, 10, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.floats(1.0, 20.0))
def test_svd_rank_for_ratio_budget(out, inp, ratio):
    r = svd_rank_for_ratio(out, inp, ratio)
    if r is None:
        assert out * inp < ratio * (out + inp) * (1 + 1e-9)
    else:
        assert 1 <= r <= min(out, inp)
        assert r * (out + inp) * ratio <= out * inp * (1 + 1e-9)
        assert (r + 1) * (out + inp) * ratio > out * inp * (1 - 1e-9)
