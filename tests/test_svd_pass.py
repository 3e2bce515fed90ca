"""SVD pass: full-rank exactness on ORT for 1×1 Conv (strides, pads), Gemm (every transA/transB/alpha/beta),
MatMul (2-D, 3-D, weight on either side); planner decisions; --method svd / tucker2 wiring."""
import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_err, run_ort
from onnxcompress.passes.svd import SVDPass


def _full(info):
    return min(info.S, info.T)


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _check(m, feeds, expect_ops, shapes=None):
    res = SVDPass(_full, shapes or {k: v.shape for k, v in feeds.items()}).run(m)
    assert res.modified and res.lossless, [l.skipped for l in res.layers]
    assert [n.op_type for n in res.model.graph.node] == expect_ops
    onnx.checker.check_model(res.model, full_check=True)
    e = rel_err(run_ort(m, feeds)[0], run_ort(res.model, feeds)[0])
    assert e <= 1e-5, e
    return res


@pytest.mark.parametrize("strides,pads,bias", [((1, 1), None, True), ((2, 2), None, True),
                                               ((2, 1), (1, 0, 1, 2), True), ((3, 2), (2, 1, 0, 1), False)])
def test_conv1x1_full_rank_exact(strides, pads, bias):
    m = conv_model(T=12, S=10, kernel=(1, 1), strides=strides, pads=pads, bias=bias, hw=(9, 11))
    x = np.random.default_rng(0).standard_normal((2, 10, 9, 11)).astype(np.float32)
    res = _check(m, {"x": x}, ["Conv", "Conv"])
    first = res.model.graph.node[0]
    assert [a.ints for a in first.attribute if a.name == "strides"][0] == list(strides)


def test_conv1x1_auto_pad_and_conv1d():
    m = conv_model(T=8, S=6, kernel=(1, 1), strides=(2, 2), auto_pad="SAME_UPPER", hw=(7, 8))
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 8)).astype(np.float32)
    _check(m, {"x": x}, ["Conv", "Conv"])
    m = conv_model(T=8, S=6, kernel=(1,), strides=(2,), hw=(9,))
    x = np.random.default_rng(0).standard_normal((2, 6, 9)).astype(np.float32)
    _check(m, {"x": x}, ["Conv", "Conv"])


@pytest.mark.parametrize("ta,tb,alpha,beta,cshape", list(itertools.product(
    (0, 1), (0, 1), (1.0, 0.7), (1.0, 0.3), ("vec", "row", "full", None))))
def test_gemm_full_rank_exact(ta, tb, alpha, beta, cshape):
    rng = np.random.default_rng(0)
    M, K, N = 5, 12, 9
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    inits = [numpy_helper.from_array(B, "B")]
    ins = ["a", "B"]
    if cshape is not None:
        shp = {"vec": (N,), "row": (1, N), "full": (M, N)}[cshape]
        inits.append(numpy_helper.from_array(rng.standard_normal(shp).astype(np.float32), "C"))
        ins.append("C")
    node = helper.make_node("Gemm", ins, ["y"], name="fc", transA=ta, transB=tb, alpha=alpha, beta=beta)
    m = _model([node], [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(A.shape))],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    _check(m, {"a": A}, ["Gemm", "Gemm"])


@pytest.mark.parametrize("xshape,side", [((5, 12), "right"), ((2, 7, 12), "right"), ((3, 2, 4, 12), "right"),
                                         ((12,), "right"), ((12, 6), "left"), ((2, 12, 6), "left")])
def test_matmul_full_rank_exact(xshape, side):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 9) if side == "right" else (9, 12)).astype(np.float32)
    X = rng.standard_normal(xshape).astype(np.float32)
    ins = ["x", "W"] if side == "right" else ["W", "x"]
    node = helper.make_node("MatMul", ins, ["y"], name="mm")
    yshape = list(np.matmul(X, W).shape if side == "right" else np.matmul(W, X).shape)
    m = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xshape))],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)], [numpy_helper.from_array(W, "W")])
    _check(m, {"x": X}, ["MatMul", "MatMul"])


def test_truncated_rank_records_and_skips():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 48)).astype(np.float32)
    n1 = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")
    n2 = helper.make_node("MatMul", ["h", "x2"], ["y"], name="dyn")   # activation × activation: skipped
    m = _model([n1, n2], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
                          helper.make_tensor_value_info("x2", TensorProto.FLOAT, [48, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], [numpy_helper.from_array(W, "W")])
    res = SVDPass(lambda info: 8, {"x": (4, 64), "x2": (48, 3)}).run(m)
    by = {l.name: l for l in res.layers}
    assert by["mm"].ranks == [8] and by["mm"].params_after == 8 * (64 + 48)
    assert 0 < by["mm"].weight_rel_error < 1 and not res.lossless
    assert "activation" in by["dyn"].skipped


def test_planner_ratio_and_skip_last():
    from onnxcompress.ir.layers import LinearInfo
    from onnxcompress.passes.registry import cost_models
    from onnxcompress.planning.planner import Planner
    from onnxcompress.recipe import Recipe

    def plan(rec, info):
        return Planner(rec, cost_models()).plan([info]).layers[info.name]

    rec = Recipe(method="svd", ratio=2, rank_multiple=1)
    info = LinearInfo("fc", "Gemm", "gemm", 0, W=np.zeros((128, 256)))
    assert plan(rec, info).ranks == (128 * 256 // (2 * 384),)
    last = LinearInfo("head", "Gemm", "gemm", 1, W=np.zeros((10, 64)), last=True)
    assert "classifier" in plan(rec, last).reason
    tiny = LinearInfo("t", "Gemm", "gemm", 2, W=np.zeros((2, 3)))
    assert "not shrink" in plan(rec, tiny).reason
    rec = Recipe(method="svd", ratio=2, svd_skip_last=False, rank_multiple=1)
    assert plan(rec, last).ranks is not None
