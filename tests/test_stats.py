"""Tests for onnxcompress.decompose.stats (im2col, streamed second moments)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import correlate

from onnxcompress.decompose.stats import ConvInputStats, SecondMoment, conv_output_shape, im2col


def direct_conv(x, K, strides, pads, dilations):
    """Reference ONNX Conv (group=1, no bias) by explicit loops over kernel taps."""
    n, s, h, w = x.shape
    t, s2, kh, kw = K.shape
    assert s == s2
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    xp = np.zeros((n, s, h + pt + pb, w + pl + pr), dtype=np.float64)
    xp[:, :, pt : pt + h, pl : pl + w] = x
    ho = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((n, t, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for b in range(kw):
                    patch = xp[:, :, i * sh + a * dh, j * sw + b * dw]  # (n, s)
                    y[:, :, i, j] += patch @ K[:, :, a, b].T
    return y


def conv_via_im2col(x, K, strides, pads, dilations):
    n = x.shape[0]
    t, s, kh, kw = K.shape
    P = im2col(x, kh, kw, strides, pads, dilations)
    ho, wo = conv_output_shape(x.shape[2], x.shape[3], kh, kw, strides, pads, dilations)
    return (P @ K.reshape(t, -1).T).reshape(n, ho, wo, t).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    "strides,pads,dilations",
    [
        ((1, 1), (0, 0, 0, 0), (1, 1)),
        ((1, 1), (1, 1, 1, 1), (1, 1)),
        ((2, 1), (1, 2, 0, 1), (1, 2)),  # asymmetric pads, stride (2,1), dilation (1,2)
        ((2, 2), (0, 3, 2, 0), (2, 1)),
    ],
)
def test_im2col_matches_direct_conv(strides, pads, dilations):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 11))
    K = rng.standard_normal((4, 5, 3, 2))
    ref = direct_conv(x, K, strides, pads, dilations)
    got = conv_via_im2col(x, K, strides, pads, dilations)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_im2col_matches_scipy_correlate():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 8, 7))
    K = rng.standard_normal((2, 3, 3, 3))
    ref = np.stack([correlate(x[0], K[t], mode="valid")[0] for t in range(2)])[None]
    np.testing.assert_allclose(conv_via_im2col(x, K, (1, 1), (0, 0, 0, 0), (1, 1)), ref, atol=1e-12)


def test_im2col_order_and_dtype():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    P = im2col(x, 2, 2)
    assert P.dtype == np.float32 and P.shape == (2 * 3 * 3, 3 * 2 * 2)
    # row (n=1, i=2, j=0); columns ordered (s, a, b)
    row = P[1 * 9 + 2 * 3 + 0]
    np.testing.assert_array_equal(row, x[1, :, 2:4, 0:2].reshape(-1))


@settings(max_examples=25, deadline=None)
@given(
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    seed=st.integers(0, 1000),
)
def test_im2col_property(kh, kw, sh, sw, dh, dw, pads, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 7, 6))
    K = rng.standard_normal((3, 2, kh, kw))
    ref = direct_conv(x, K, (sh, sw), pads, (dh, dw))
    got = conv_via_im2col(x, K, (sh, sw), pads, (dh, dw))
    np.testing.assert_allclose(got, ref, atol=1e-11)


def test_second_moment_streamed_equals_batch_and_merge():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 17)) @ rng.standard_normal((17, 17)) + 3.0
    ref_sigma = X.T @ X / len(X)
    a = SecondMoment()
    cuts = [0, 1, 7, 300, 301, 640, 1000]
    for i, j in zip(cuts[:-1], cuts[1:]):
        a.update(X[i:j])
    np.testing.assert_allclose(a.sigma, ref_sigma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.mean, X.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.covariance, np.cov(X.T, bias=True), rtol=1e-10, atol=1e-10)
    assert a.count == 1000 and a.n_samples == 1000
    assert np.array_equal(a.sigma, a.sigma.T)
    # merge of two halves == whole
    b, c = SecondMoment(17), SecondMoment()
    b.update(X[:400])
    c.update(X[400:])
    b.merge(c)
    np.testing.assert_allclose(b.sigma, ref_sigma, rtol=1e-12)
    assert b.count == 1000
    # merging an empty accumulator is a no-op; merging into an empty one copies
    b.merge(SecondMoment())
    e = SecondMoment().merge(b)
    np.testing.assert_allclose(e.sigma, ref_sigma, rtol=1e-12)


def test_second_moment_weights_float64_and_errors():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 4))
    a = SecondMoment().update(X, weight=3.0).update(X[:10])
    Xw = np.concatenate([X, X, X, X[:10]])
    np.testing.assert_allclose(a.sigma, Xw.T @ Xw / len(Xw), rtol=1e-12)
    assert a.count == len(Xw)
    # float32 input with a large offset: float64 accumulation keeps the mean exact-ish
    Y = (1e4 + rng.standard_normal((20000, 3))).astype(np.float32)
    m = SecondMoment()
    for i in range(0, 20000, 100):
        m.update(Y[i : i + 100])
    np.testing.assert_allclose(m.mean, Y.astype(np.float64).mean(0), rtol=1e-13)
    assert m.sigma.dtype == np.float64
    with pytest.raises(ValueError):
        m.update(np.zeros((2, 5)))
    with pytest.raises(ValueError):
        SecondMoment().sigma


def test_conv_input_stats_exact_without_subsampling():
    rng = np.random.default_rng(4)
    cfg = dict(strides=(2, 1), pads=(1, 2, 0, 1), dilations=(1, 2))
    cs = ConvInputStats(3, 3, max_positions=None, **cfg)
    batches = [rng.standard_normal((2, 4, 8, 9)).astype(np.float32) for _ in range(3)]
    for xb in batches:
        cs.update(xb)
    P = np.concatenate([im2col(xb, 3, 3, **cfg) for xb in batches]).astype(np.float64)
    np.testing.assert_allclose(cs.sigma, P.T @ P / len(P), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cs.mean, P.mean(0), rtol=1e-10, atol=1e-12)
    assert cs.dim == 4 * 9 and cs.count == len(P)


def test_conv_input_stats_subsampling():
    rng = np.random.default_rng(5)
    cfg = dict(strides=(1, 2), pads=(1, 0, 2, 1), dilations=(2, 1))
    x = rng.standard_normal((3, 4, 10, 12))
    full = im2col(x, 3, 2, **cfg)
    cs = ConvInputStats(3, 2, max_positions=40, seed=11, **cfg)
    P = cs.patches(x)
    assert P.shape == (40, 4 * 3 * 2)
    # every sampled row is a genuine (distinct) im2col row
    full_rows = {r.tobytes() for r in full}
    assert all(r.tobytes() in full_rows for r in P)
    assert len({r.tobytes() for r in P}) == 40
    # seeded and deterministic
    P2 = ConvInputStats(3, 2, max_positions=40, seed=11, **cfg).patches(x)
    np.testing.assert_array_equal(P, P2)
    # weighting: count reflects all positions; memory stays D×D
    cs2 = ConvInputStats(3, 2, max_positions=40, seed=0, **cfg)
    for _ in range(5):
        cs2.update(x)
    assert cs2.count == pytest.approx(5 * len(full))
    assert cs2.moment.n_samples == 200
    assert cs2.moment._S.shape == (24, 24)
    # unbiased: averaging many subsampled estimates approaches the full Σ
    acc = SecondMoment()
    cs3 = ConvInputStats(3, 2, max_positions=60, seed=1, **cfg)
    for _ in range(300):
        acc.update(cs3.patches(x))
    ref = full.T @ full / len(full)
    assert np.linalg.norm(acc.sigma - ref) / np.linalg.norm(ref) < 0.03
