"""The Fuse pass (issue 16): per-channel Mul/Add folds, serial 1x1·1x1 merges, parallel 1x1 + Add merges —
exact on ORT, refused where they would not be, verified by the PassManager's lossless check, run by the pipeline
between the decomposition passes and INT8."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_err, run_ort
from onnxcompress.passes.fuse import Fuse, fold_channel_affine, merge_linear_1x1, merge_parallel_1x1_add

OPSET = 17


def _chain_model(shapes, relu_after=(), pads0=False, stride0=1, extra=None, seed=0):
    """x (1, C0, 6, 7) -> 1x1 convs through channel widths `shapes` = [C0, C1, C2, ...]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(len(shapes) - 1):
        inits += [numpy_helper.from_array(rng.standard_normal((shapes[i + 1], shapes[i], 1, 1)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(shapes[i + 1]).astype(np.float32), f"b{i}")]
        attrs = {"kernel_shape": [1, 1]}
        if i == 0 and pads0:
            attrs["pads"] = [1, 0, 1, 2]
        if i == 0 and stride0 != 1:
            attrs["strides"] = [stride0, stride0]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}", **attrs))
        x = f"y{i}"
        if i in relu_after:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    if extra:
        n, inits2, x = extra(x)
        nodes += n
        inits += inits2
    nodes[-1].output[0] = "out"
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shapes[0], 6, 7])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def _x(c):
    return {"x": np.random.default_rng(1).standard_normal((1, c, 6, 7)).astype(np.float32)}


def test_merge_svd_out_with_next_svd_in_exact():
    # r1=4 -> C=32 -> r2=5: the 32-wide middle collapses (4*5 MACs per pixel instead of 32*(4+5))
    m = _chain_model([4, 32, 5], pads0=True, stride0=2)
    out, rec = merge_linear_1x1(m)
    assert len(rec) == 1 and rec[0]["shape"] == (5, 32, 4) and rec[0]["first"] == "conv0"
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].name == "conv0"
    assert rel_err(run_ort(m, _x(4))[0], run_ort(out, _x(4))[0]) < 1e-5


def test_merge_respects_nonlinearity_mac_growth_and_kept_nodes():
    assert merge_linear_1x1(_chain_model([4, 32, 5], relu_after=(0,)))[1] == []      # a ReLU between them
    m = _chain_model([32, 4, 32])                 # 32->4->32 would become a 32x32 conv: more MACs
    assert merge_linear_1x1(_chain_model([6, 4, 12]))[1] == []     # as many MACs: no gain, the factors stay
    assert merge_linear_1x1(m)[1] == []
    assert len(merge_linear_1x1(m, allow_more_macs=True)[1]) == 1
    assert merge_linear_1x1(_chain_model([4, 32, 5]), keep=["conv1"])[1] == []       # a node kept in float


def test_merge_runs_of_three():
    m = _chain_model([3, 16, 4, 16, 2])
    out, rec = merge_linear_1x1(m)
    assert len(rec) >= 2
    assert rel_err(run_ort(m, _x(3))[0], run_ort(out, _x(3))[0]) < 1e-5


def _two_branch(stride_b=1):
    """The downsampling block of a factorized ResNet: two SVD chains (in: 6->4 / 6->5, out: ->12) added."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 6, 1, 1)).astype(np.float32), "wa_in"),
             numpy_helper.from_array(rng.standard_normal((2, 6, 1, 1)).astype(np.float32), "wb_in"),
             numpy_helper.from_array(rng.standard_normal((12, 3, 1, 1)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "ba"),
             numpy_helper.from_array(rng.standard_normal((12, 2, 1, 1)).astype(np.float32), "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa_in"], ["za"], name="/a/Conv/svd_in", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "wb_in"], ["zb"], name="/b/Conv/svd_in", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["za", "wa", "ba"], ["ya"], name="/a/Conv/svd_out", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["zb", "wb"], ["yb"], name="/b/Conv/svd_out", kernel_shape=[1, 1],
                              strides=[stride_b, stride_b]),
             helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["out"], name="relu")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 6, 7])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 12, 6, 7])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def test_merge_parallel_1x1_add_exact():
    m = _two_branch()
    out, rec = merge_parallel_1x1_add(m, {"x": (1, 6, 6, 7)})
    assert len(rec) == 1 and rec[0]["inputs"] == [3, 2]
    assert sorted(n.op_type for n in out.graph.node) == ["Concat", "Conv", "Conv", "Conv", "Relu"]
    merged = [n for n in out.graph.node if n.op_type == "Conv" and n.name == "/a/Conv/svd_out"]
    assert len(merged) == 1                       # keeps the first conv's name: still maps to its layer
    assert rel_err(run_ort(m, _x(6))[0], run_ort(out, _x(6))[0]) < 1e-5
    assert merge_parallel_1x1_add(_two_branch(stride_b=2), {"x": (1, 6, 6, 7)})[1] == []   # strided: left alone
    assert merge_parallel_1x1_add(m, {"x": (1, 6, 6, 7)}, keep=["/b/Conv"])[1] == []     # a layer kept in float


def test_fold_channel_affine_mul_add_exact_and_refusals():
    def extra(x):
        c = np.random.default_rng(3).standard_normal((1, 6, 1, 1)).astype(np.float32)
        d = np.random.default_rng(4).standard_normal((6, 1, 1)).astype(np.float32)
        return ([helper.make_node("Mul", ["s", x], ["m"], name="mul"),
                 helper.make_node("Add", ["m", "d"], ["a"], name="add"),
                 helper.make_node("Relu", ["a"], ["o"], name="relu")],
                [numpy_helper.from_array(c, "s"), numpy_helper.from_array(d, "d")], "o")
    m = _chain_model([5, 6], extra=extra)
    out, rec = fold_channel_affine(m)
    assert [r["op"] for r in rec] == ["Mul", "Add"]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert rel_err(run_ort(m, _x(5))[0], run_ort(out, _x(5))[0]) < 1e-5

    def per_pixel(x):
        c = np.random.default_rng(3).standard_normal((1, 6, 6, 7)).astype(np.float32)
        return ([helper.make_node("Mul", [x, "s"], ["o"], name="mul")], [numpy_helper.from_array(c, "s")], "o")
    assert fold_channel_affine(_chain_model([5, 6], extra=per_pixel))[1] == []


def test_fuse_pass_verified_lossless_by_the_manager():
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.manager import PassManager

    m = _two_branch()
    pm = PassManager({"x": (1, 6, 6, 7)})
    out = pm.run(m, [Fuse({"x": (1, 6, 6, 7)})])
    rec = pm.records[0]
    assert rec.modified and rec.lossless and rec.verified["checker"]
    assert rec.verified["noise_floor"]["equivalent"] is True
    assert pm.results[0][1].info["fuse"]["parallel_1x1_add"] == 1
    ctx = PassContext(handoff={"float_nodes": ["/a/Conv/svd_out"]})       # a node INT8 must leave in float
    assert Fuse({"x": (1, 6, 6, 7)}).run(m, ctx).modified is False
    assert len(out.graph.node) == 5


def _parallel_1x1_model():
    """Two 1x1 convs of one input feeding an Add (a parallel merge site once SVD'd)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32, 1, 1)).astype(np.float32) * 0.2, "wa"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "ba"),
             numpy_helper.from_array(rng.standard_normal((64, 32, 1, 1)).astype(np.float32) * 0.2, "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ya"], name="/a/Conv", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["yb"], name="/b/Conv", kernel_shape=[1, 1]),
             helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["out"], name="relu")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    return m


def test_pipeline_runs_fuse_between_decomposition_and_int8():
    from onnxcompress import Recipe, optimize

    m = _parallel_1x1_model()
    res = optimize(m, Recipe(method="svd", ratio=2, quantize="int8", calibration="random", calibration_samples=8,
                             skip_first=False, latency_guard=False, qaf=False))
    passes = res.report.to_dict()["passes"]
    names = [p["name"] for p in passes]
    assert names.index("SVD") < names.index("Fuse") < names.index("QuantizeInt8")
    fused = passes[names.index("Fuse")]
    assert fused["modified"] and fused["lossless"] and fused["verified"]["noise_floor"]["equivalent"]
    assert any(n.op_type == "Concat" for n in res.model.graph.node)
    assert not any(n.op_type == "Add" for n in res.model.graph.node)
    assert {r["name"]: r["precision"] for r in res.report.to_dict()["layers"]} == {"/a/Conv": "int8", "/b/Conv": "int8"}


def test_fuse_leaves_qaf_fitted_chains_on_their_grid():
    """QAF fits a chain's weights on the INT8 grid they are stored on; a merge would move them off it: with QAF
    on, QAF runs before Fuse and Fuse leaves the fitted chains alone."""
    from onnxcompress import Recipe, optimize

    res = optimize(_parallel_1x1_model(), Recipe(method="svd", ratio=2, quantize="int8", calibration="random",
                                                 calibration_samples=8, skip_first=False, latency_guard=False,
                                                 qaf=True))
    passes = res.report.to_dict()["passes"]
    names = [p["name"] for p in passes]
    assert names.index("SVD") < names.index("QAF") < names.index("Fuse") < names.index("QuantizeInt8")
    assert not passes[names.index("Fuse")]["modified"]
    assert not any(n.op_type == "Concat" for n in res.model.graph.node)
    assert {r["name"] for r in res.report.to_dict()["layers"] if r.get("extra", {}).get("qaf")} == {"/a/Conv",
                                                                                                     "/b/Conv"}
