"""Quantization-aware factorization (onnxcompress/decompose/qaf.py): ADMM on the grid ONNX Runtime stores."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import random_reader
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxcompress.decompose import qaf
from onnxcompress.decompose.cp import chain_weights, cp_kernel, equalize_chain
from onnxcompress.decompose.tucker2 import tucker2


def _kernel(t=24, s=16, kh=3, kw=3, seed=0):
    """A kernel with a decaying channel spectrum (like trained convs: not low rank, not white)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((t, s, kh, kw))
    g *= (np.arange(1.0, t + 1) ** -0.6)[:, None, None, None] * (np.arange(1.0, s + 1) ** -0.6)[None, :, None, None]
    q1, q2 = np.linalg.qr(rng.standard_normal((t, t)))[0], np.linalg.qr(rng.standard_normal((s, s)))[0]
    return np.einsum("abhw,ta,sb->tshw", g, q1, q2)


def _cp4(k, rank=20):
    res = cp_kernel(k, rank, variant="cp4", use_epc=True)
    return equalize_chain(chain_weights(res, "cp4", k.shape))


def _cp3(k, rank=20):
    t, s, kh, kw = k.shape
    res = cp_kernel(k, rank, variant="cp3", use_epc=True)
    ws = chain_weights(res, "cp3", (t, s, kh * kw, 1))
    ws[1] = ws[1].reshape(rank, 1, kh, kw)
    return equalize_chain(ws)


def _t2(k, r3=8, r4=10):
    t, s = k.shape[:2]
    res = tucker2(k, r3, r4)
    return [res.U_S.T.reshape(r3, s, 1, 1), res.core, res.U_T.reshape(t, r4, 1, 1)]


def _svd(k, r=6):
    w = k.reshape(k.shape[0], -1)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    return [(np.sqrt(sv[:r])[:, None] * vt[:r]), u[:, :r] * np.sqrt(sv[:r])]


CHAINS = {"cp4": _cp4, "cp3": _cp3, "tucker2": _t2}


# ------------------------------------------------------------------------------------------ grid


def test_quantize_grid_ranges_and_fixed_point():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5, 3, 3))
    q, s = qaf.quantize(w, qaf.INT8)
    assert np.abs(q).max() == 127 and np.all(np.abs(q).reshape(6, -1).max(axis=1) == 127)
    v = qaf.fake_quant(w, qaf.INT8)
    assert np.allclose(v, q * s[:, None, None, None])
    q2, s2 = qaf.quantize(v, qaf.INT8)        # max-abs INT8 grid points are fixed points
    assert np.array_equal(q, q2) and np.allclose(s, s2, rtol=1e-12)
    q4, _ = qaf.quantize(w, qaf.INT4)
    assert q4.min() >= -8 and q4.max() <= 7
    # MSE scales never have a larger error than max-abs ones
    e_mse = np.linalg.norm(qaf.fake_quant(w, qaf.INT4) - w)
    e_max = np.linalg.norm(qaf.fake_quant(w, qaf.Grid(4, 7, scale="maxabs", qmin=-8)) - w)
    assert e_mse <= e_max
    # other axis: per column
    qc, sc = qaf.quantize(w[:, :, 0, 0], qaf.INT8.along(1))
    assert sc.shape == (5,) and np.all(np.abs(qc).max(axis=0) == 127)


# ------------------------------------------------------------------------------------------ the LS problems


@pytest.mark.parametrize("kind", ["cp4", "cp3", "tucker2", "svd"])
def test_chain_problems_match_the_composition(kind):
    """For every weight, LinearProblem.error_sq(Z) equals ‖K − compose(chain with Z)‖² for any Z."""
    k = _kernel()
    ws = _svd(k) if kind == "svd" else CHAINS[kind](k)
    mats = qaf._mats(ws, kind)
    kk = {"cp4": 9, "cp3": 9, "tucker2": 9, "svd": 9}[kind]
    kern = k.reshape(k.shape[0], -1)
    rng = np.random.default_rng(1)
    for i in range(len(mats)):
        p = qaf.chain_problems(kern, mats, kind, i, kk, 3, 3)
        for _ in range(2):
            z = rng.standard_normal(mats[i].shape)
            trial = list(mats)
            trial[i] = z
            direct = float(np.linalg.norm(kern - qaf.compose(trial, kind, 9 if kind != "svd" else 1)) ** 2) \
                if kind != "svd" else float(np.linalg.norm(kern - trial[1] @ trial[0]) ** 2)
            assert p.error_sq(z) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_kron_structured_problem_equals_the_dense_one():
    """Tucker2's core problem keeps B = kron(W1·W1ᵀ, I_k) factored: the same errors, ρ, and ADMM iterates as the
    dense Kronecker matrix (which made ResNet-18's QAF pass take 316 s: eigh of a 2304² matrix per core)."""
    rng = np.random.default_rng(5)
    a, m, k = 6, 5, 9
    A = (lambda x: x @ x.T)(rng.standard_normal((a, a + 2)))
    Bs = (lambda x: x @ x.T)(rng.standard_normal((m, m + 3)))
    F = rng.standard_normal((a, m * k))
    kr = qaf.LinearProblem(F, 50.0, A, Bs, kron=k)
    dense = qaf.LinearProblem(F, 50.0, A, np.kron(Bs, np.eye(k)))
    z = rng.standard_normal((a, m * k))
    assert kr.error_sq(z) == pytest.approx(dense.error_sq(z), rel=1e-12)
    assert kr.rho() == pytest.approx(dense.rho(), rel=1e-12)
    rhs = rng.standard_normal((a, m * k))
    np.testing.assert_allclose(qaf._RidgeSolver(kr, 0.3)(rhs), qaf._RidgeSolver(dense, 0.3)(rhs), rtol=1e-9,
                               atol=1e-10)
    z1, f1 = qaf.admm_fit(kr, z, qaf.INT8, max_iter=20)
    z2, f2 = qaf.admm_fit(dense, z, qaf.INT8, max_iter=20)
    np.testing.assert_allclose(z1, z2, rtol=1e-9, atol=1e-12)
    assert f1.iterations == f2.iterations


def test_admm_never_worse_than_round_to_nearest_and_converges():
    rng = np.random.default_rng(2)
    # correlated regressors (as a Khatri-Rao product of trained factors): rounding errors can compensate
    phi = rng.standard_normal((200, 12)) @ (np.eye(12) + 0.9 * rng.standard_normal((12, 12)))
    z_true = rng.standard_normal((10, 12))
    y = z_true @ phi.T + 0.01 * rng.standard_normal((10, 200))
    p = qaf.LinearProblem(y @ phi, float(np.vdot(y, y)), None, phi.T @ phi)
    z_ls = np.linalg.solve(phi.T @ phi, (y @ phi).T).T
    grid = qaf.Grid(4, 7, scale="maxabs")
    z, fit = qaf.admm_fit(p, z_ls, grid, max_iter=200)
    e_rtn = np.sqrt(p.error_sq(qaf.fake_quant(z_ls, grid)) / p.y_sq)
    assert fit.rel_error_rtn == pytest.approx(e_rtn)
    assert fit.rel_error_admm <= e_rtn
    assert fit.rel_error_admm < 0.9 * e_rtn               # a real gain at 4 bits (measured 0.063 vs 0.077)
    assert np.allclose(z, qaf.fake_quant(z, grid))         # on the grid
    assert fit.iterations >= 1 and np.isfinite(fit.primal_residual)


# ------------------------------------------------------------------------------------------ chains


@pytest.mark.parametrize("kind", ["cp4", "cp3", "tucker2", "svd"])
@pytest.mark.parametrize("grid", [qaf.INT8, qaf.INT4], ids=["int8", "int4"])
def test_qaf_chain_on_grid_and_better_than_rtn(kind, grid):
    k = _kernel()
    ws = _svd(k) if kind == "svd" else CHAINS[kind](k)
    fit = qaf.qaf_chain(k, ws, kind, grid)
    assert len(fit.weights) == len(ws)
    for w, w0, q, s in zip(fit.weights, ws, fit.codes, fit.scales):
        assert w.shape == np.asarray(w0).shape
        assert q.min() >= grid.lo and q.max() <= grid.qmax
        assert np.allclose(w, q * s.reshape((-1,) + (1,) * (q.ndim - 1)))
    mats = qaf._mats(fit.weights, kind)
    direct = np.linalg.norm(k.reshape(k.shape[0], -1) - qaf.compose(mats, kind, 9 if kind != "svd" else 1))
    assert fit.rel_error_qaf == pytest.approx(direct / np.linalg.norm(k), rel=1e-9)
    assert fit.rel_error_qaf <= fit.rel_error_rtn
    if grid is qaf.INT4:
        # at 4 bits QAF removes a clear part of the quantization loss (errors add in quadrature; measured
        # ratios: cp4 0.41, cp3 0.36, tucker2 0.62, svd 0.91: near-orthogonal SVD factors leave RTN near optimal)
        q_rtn = fit.rel_error_rtn ** 2 - fit.rel_error_float ** 2
        q_qaf = fit.rel_error_qaf ** 2 - fit.rel_error_float ** 2
        assert q_qaf < (0.97 if kind == "svd" else 0.75) * q_rtn
    d = fit.to_dict()
    assert d["admm_iterations"] > 0 and len(d["factors"]) == len(ws)


def test_qaf_chain_keeps_float_weights_where_grid_is_none():
    k = _kernel()
    ws = _cp4(k)
    fit = qaf.qaf_chain(k, ws, "cp4", [qaf.INT8, None, None, qaf.INT8])
    assert fit.codes[1] is None and fit.codes[2] is None
    assert fit.codes[0] is not None and fit.codes[3] is not None


# ------------------------------------------------------------------------------------------ ORT end to end


def _Reader(s, n=3):
    return random_reader((1, s, 7, 7), n, seed=7)


def _cp4_chain_model(ws, s, t):
    r = ws[0].shape[0]
    names = ["w1", "wv", "wh", "w4"]
    attrs = [dict(kernel_shape=[1, 1]), dict(kernel_shape=[3, 1], pads=[1, 0, 1, 0], group=r),
             dict(kernel_shape=[1, 3], pads=[0, 1, 0, 1], group=r), dict(kernel_shape=[1, 1])]
    nodes, cur = [], "x"
    for i, (n, a) in enumerate(zip(names, attrs)):
        out = "y" if i == 3 else f"z{i}"
        nodes.append(helper.make_node("Conv", [cur, n], [out], name=f"conv_{n}", **a))
        cur = out
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, 7, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, 7, 7])],
                          [numpy_helper.from_array(np.asarray(w, np.float32), n) for w, n in zip(ws, names)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort_weight_ints(path):
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in (
                TensorProto.INT8, TensorProto.INT4):
            t = inits[n.input[0]]
            if t.data_type == TensorProto.INT4:
                from onnxcompress.ort.int4 import unpack_int4
                q = unpack_int4(t)
            else:
                q = numpy_helper.to_array(t)
            base = n.input[0].replace("_quantized", "")
            out[base] = (q.astype(np.int32), numpy_helper.to_array(inits[n.input[1]]))
    return out


def test_ort_int8_reproduces_the_fitted_integers(tmp_path):
    """Fit a CP4 chain on INT8, write it, quantize with ORT quantize_static (QDQ, per-channel, as the
    pipeline does): ORT's integers are the fitted ones, and its scales·ints the fitted values."""
    k = _kernel(t=12, s=10)
    ws = _cp4(k, rank=10)
    fit = qaf.qaf_chain(k, ws, "cp4", qaf.INT8)
    src, dst = tmp_path / "c.onnx", tmp_path / "q.onnx"
    onnx.save(_cp4_chain_model(fit.weights, 10, 12), src)
    quantize_static(str(src), str(dst), _Reader(10), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})
    got = _ort_weight_ints(dst)
    assert set(got) == {"w1", "wv", "wh", "w4"}
    for name, q, w in zip(["w1", "wv", "wh", "w4"], fit.codes, fit.weights):
        qi, sc = got[name]
        assert np.array_equal(qi, q), name
        deq = qi * sc.reshape((-1,) + (1,) * (qi.ndim - 1)).astype(np.float64)
        assert np.allclose(deq, w, rtol=1e-6, atol=0), name
    # and a plain (not fitted) chain is *not* a fixed point: RTN changes it
    assert not np.allclose(qaf.fake_quant(np.asarray(ws[3]), qaf.INT8), ws[3])


def test_ort_int8_rule_mirror_matches_quantize_static(tmp_path):
    """ort_int8_weight (numpy) gives exactly ORT's integers and scales for arbitrary weights."""
    k = _kernel(t=12, s=10).astype(np.float32)
    ws = _cp4(k.astype(np.float64), rank=10)
    src, dst = tmp_path / "c.onnx", tmp_path / "q.onnx"
    onnx.save(_cp4_chain_model(ws, 10, 12), src)
    quantize_static(str(src), str(dst), _Reader(10), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})
    got = _ort_weight_ints(dst)
    for name, w in zip(["w1", "wv", "wh", "w4"], ws):
        q, s = qaf.ort_int8_weight(w)
        assert np.array_equal(got[name][0], q.astype(np.int32)), name
        assert np.array_equal(got[name][1], s), name


def test_ort_default_int4_is_not_a_fixed_point_but_ours_is(tmp_path):
    """ORT's own QInt4 rule (scale = amax/7.5, clip [-8, 7]) changes an already-int4 weight when it
    re-quantizes it; with our scales handed over (int4.quantize_int4_static) the fitted integers survive."""
    from onnxcompress.ort import int4

    k = _kernel(t=12, s=10)
    ws = _cp4(k, rank=10)
    fit = qaf.qaf_chain(k, ws, "cp4", qaf.INT4)
    m = _cp4_chain_model(fit.weights, 10, 12)
    src, dst = tmp_path / "c.onnx", tmp_path / "q.onnx"
    onnx.save(m, src)
    quantize_static(str(src), str(dst), _Reader(10), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4,
                    extra_options={"WeightSymmetric": True})
    got = _ort_weight_ints(dst)
    changed = [name for name, w in zip(["w1", "wv", "wh", "w4"], fit.weights)
               if not np.allclose(got[name][0] * got[name][1].reshape((-1,) + (1,) * (w.ndim - 1)), w, rtol=1e-5)]
    assert changed                                        # ORT's default int4 moves the fitted values
    codes = {n: (q, s) for n, q, s in zip(["w1", "wv", "wh", "w4"], fit.codes, fit.scales)}
    q, _ = int4.quantize_int4_static(m, _Reader(10), codes=codes)
    onnx.save(q, dst)
    got = _ort_weight_ints(dst)
    for name, qc, w in zip(["w1", "wv", "wh", "w4"], fit.codes, fit.weights):
        assert np.array_equal(got[name][0], qc), name
        deq = got[name][0] * got[name][1].reshape((-1,) + (1,) * (w.ndim - 1)).astype(np.float64)
        assert np.allclose(deq, w, rtol=1e-6), name


# ------------------------------------------------------------------------------------------ the pass


def test_qaf_pass_on_the_default_model_survives_ort_int8(tmp_path):
    """Digits net (real weights): CP4 on two layers, QAFPass, the pipeline's INT8 pass: every chain weight is
    stored by ORT with exactly the fitted integers, and the weight error of the stored chain is below RTN's."""
    import os

    from onnxcompress.decompose.cp import cp4_rank_for_ratio
    from onnxcompress.ort.quantize import int8_format_for
    from onnxcompress.passes.cp import CPPass
    from onnxcompress.passes.fold_bn import FoldBatchNorm
    from onnxcompress.passes.int8 import QuantizeInt8
    from onnxcompress.passes.qaf import QAFPass, codes_from_handoff, find_chains
    from onnxcompress.passes.tucker2 import Tucker2Pass

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folded = FoldBatchNorm().run(onnx.load(os.path.join(root, "models", "digits_cnn.onnx"))).model
    calib = np.load(os.path.join(root, "models", "digits_calib.npz"))["x"][:32].astype(np.float32)
    layers = {"/stage1/conv2/Conv", "/stage2/conv2/Conv"}

    def policy(info):
        return cp4_rank_for_ratio(info.T, info.S, *info.kernel, 2.0) if info.name in layers else "not chosen"

    def t2policy(info):
        return (12, 12) if info.name in layers else "not chosen"

    class R(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= 2:
                return None
            self.i += 1
            return {"input": calib[(self.i - 1) * 16:self.i * 16]}

    shapes = {"input": (1, 1, 16, 16)}
    for dec in (CPPass(policy, shapes, variant="cp4", use_epc=True), Tucker2Pass(t2policy, shapes)):
        m = dec.run(folded).model
        assert {c[0] for c in find_chains(m)} == layers
        # reference: the model the decomposition pass started from (kernels read by layer name)
        res = QAFPass(qaf.INT8, folded, min_headroom=0).run(m)
        assert res.modified and len(res.layers) == 2
        for rec in res.layers:
            assert rec.extra["qaf_target"] == "kernel"
            assert rec.weight_rel_error <= rec.extra["weight_rel_error_before"]
            assert rec.extra["qaf"]["admm_iterations"] > 0
        q = QuantizeInt8(R, int8_format_for("cpu")).run(res.model).model
        inits = {t.name: t for t in q.graph.initializer}
        codes8 = codes_from_handoff(res.handoff, 8)
        assert len(codes8) == 8 if isinstance(dec, CPPass) else len(codes8) == 6
        for wname, (codes, _) in codes8.items():
            stored = numpy_helper.to_array(inits[f"{wname}_quantized"]).astype(np.int32)
            assert np.array_equal(stored, codes), wname


def _digits_cp4(layers=("/stage1/conv2/Conv", "/stage2/conv2/Conv"), variant="cp4"):
    import os

    from onnxcompress.decompose.cp import cp4_rank_for_ratio
    from onnxcompress.passes.cp import CPPass
    from onnxcompress.passes.fold_bn import FoldBatchNorm

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folded = FoldBatchNorm().run(onnx.load(os.path.join(root, "models", "digits_cnn.onnx"))).model

    def policy(info):
        return cp4_rank_for_ratio(info.T, info.S, *info.kernel, 2.0) if info.name in layers else "not chosen"

    return folded, CPPass(policy, {"input": (1, 1, 16, 16)}, variant=variant, use_epc=True).run(folded).model


def test_kernel_files_reference_gives_the_same_fit_as_the_model():
    """Large models hand QAF their kernels as memory-mapped files (KernelFiles) instead of the ModelProto: the
    same kernels, the same fitted weights; the folder goes with the object."""
    import gc
    import os

    from onnxcompress.passes.qaf import KernelFiles, QAFPass

    folded, m = _digits_cp4()
    kf = KernelFiles(folded)
    convs = {n.name for n in folded.graph.node if n.op_type == "Conv"}
    assert set(kf) == convs and len(kf) == len(convs)
    a = QAFPass(qaf.INT8, folded, min_headroom=0).run(m).model
    b = QAFPass(qaf.INT8, kf, min_headroom=0).run(m).model
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.name == y.name and np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
    folder = kf._dir
    del kf
    gc.collect()
    assert not os.path.exists(folder)


def test_qaf_pass_exclusions_layers_and_depthwise_grid():
    """Chains an earlier pass keeps in float (hand-off float_nodes) and excluded layers stay untouched; `layers`
    restricts the pass; depthwise=None keeps the depthwise factors' float values (weight-only INT4)."""
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.qaf import QAFPass, find_chains

    folded, m = _digits_cp4()
    before = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    chains = {c[0]: c for c in find_chains(m)}
    a, b = sorted(chains)
    ctx = PassContext(handoff={"float_nodes": chains[a][3]})
    res = QAFPass(qaf.INT8, folded, exclude_globs=[b], sweeps=1, max_iter=5).run(m, ctx)
    assert not res.modified and all(r.skipped for r in res.layers) and not res.handoff
    res = QAFPass(qaf.INT4, folded, layers=[b], depthwise=None, sweeps=1, max_iter=5).run(m)
    recs = {r.name: r for r in res.layers}
    assert recs[a].skipped and recs[b].skipped is None
    after = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    wn = chains[b][2]                                     # cp_in, cp_v, cp_h, cp_out weights
    assert np.array_equal(after[wn[1]], before[wn[1]]) and np.array_equal(after[wn[2]], before[wn[2]])
    assert not np.array_equal(after[wn[0]], before[wn[0]])
    assert {w for w, *_ in res.handoff["qaf_codes"]} == {wn[0], wn[3]}
    for w in chains[a][2]:
        assert np.array_equal(after[w], before[w])


def test_qaf_int4_codes_reach_the_int4_file():
    """QAF on the INT4 grid, then the INT4 pass with the hand-off: the file stores exactly the fitted codes."""
    from onnxcompress.ort.int4 import unpack_int4
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.qaf import QAFPass, codes_from_handoff
    from onnxcompress.passes.registry import quantizer

    folded, m = _digits_cp4(layers=("/stage2/conv2/Conv",))
    ctx = PassContext()
    res = QAFPass(qaf.INT4, folded, depthwise=None, sweeps=2, max_iter=20).run(m, ctx)
    ctx.absorb(res)
    rec = next(r for r in res.layers if r.skipped is None)
    assert rec.weight_rel_error < rec.extra["weight_rel_error_before"]      # better than round-to-nearest
    codes = codes_from_handoff(ctx.handoff, 4)
    assert len(codes) == 2
    out = quantizer("int4").run(res.model, ctx)
    assert out.info["int4"]["qaf_weights"] == 2
    inits = {t.name: t for t in out.model.graph.initializer}
    for w, (q, s) in codes.items():
        assert np.array_equal(unpack_int4(inits[f"{w}_int4"]), q), w
        assert np.allclose(numpy_helper.to_array(inits[f"{w}_int4_scale"]), s, rtol=1e-6)


def test_pipeline_runs_qaf_when_a_factorized_layer_is_quantized_and_reports_it():
    """optimize(method cp4, INT8): a QAF pass between the decomposition and INT8, its per-layer weight errors and
    ADMM iterations merged into the layer records; --no-qaf: no QAF pass, no record; FP32: no QAF."""
    import os

    from onnxcompress import optimize
    from onnxcompress.recipe import Recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kw = dict(method="cp4", ratio=2.0, include=["/stage2/conv2/Conv"], latency_guard=False,
              calibration=os.path.join(root, "models", "digits_calib.npz"), calibration_samples=16,
              eval_data=os.path.join(root, "models", "digits_test.npz"), eval_samples=64)
    model = os.path.join(root, "models", "digits_cnn.onnx")
    # default: at INT8 round-to-nearest is within 1% of this chain's float error: no ADMM, and the report says so
    auto = optimize(model, Recipe(quantize="int8", **kw))
    q = next(l for l in auto.report.layers if l["name"] == "/stage2/conv2/Conv")["extra"]["qaf"]
    assert "nothing for QAF to gain" in q["skipped"]
    assert q["weight_rel_error_float"] <= q["weight_rel_error_before"] < 1.01 * q["weight_rel_error_float"]
    res = optimize(model, Recipe(quantize="int8", qaf=True, **kw))    # --qaf: every chain
    names = [p.name for p in res.report.passes]
    assert names.index("CP4") < names.index("QAF") < names.index("QuantizeInt8")
    rec = next(l for l in res.report.layers if l["name"] == "/stage2/conv2/Conv")
    q = rec["extra"]["qaf"]
    assert rec["method"] == "cp4" and q["bits"] == 8 and q["target"] == "kernel"
    assert q["weight_rel_error_after"] <= q["weight_rel_error_before"] and q["admm_iterations"] > 0
    assert all(f["iterations"] > 0 for f in q["factors"])
    assert res.report.quantization["qaf"][0]["layers"] == 1
    off = optimize(model, Recipe(quantize="int8", qaf=False, **kw))
    assert "QAF" not in [p.name for p in off.report.passes]
    assert not any("qaf" in l["extra"] for l in off.report.layers)
    fp32 = optimize(model, Recipe(quantize="none", **kw))
    assert "QAF" not in [p.name for p in fp32.report.passes]
