"""Issue 16, measuring: per-node ORT profiles and MACs (ort.timing), executed-node -> layer mapping; the pipeline's
memory-lean explicit path keeps its report (facts of the input from a weightless copy, the input's sessions from a
file) and gives the same model as with every session built from a serialised copy."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.ort.timing import executed_layer, factor_of, node_macs, profile_nodes


def _cnn():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w0"),
             numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 32, 1, 1)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32) * 0.1, "fc")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="/c0/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/c2/Conv", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="/fc/Gemm", transB=1)]
    g = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_node_macs_and_layer_mapping():
    m = _cnn()
    macs = node_macs(m, {"x": (1, 3, 16, 16)})
    assert macs == {"/c0/Conv": 16 * 3 * 9 * 256, "/c1/Conv": 32 * 16 * 9 * 256, "/c2/Conv": 32 * 32 * 256,
                    "/fc/Gemm": 320}
    layers = {"/c1/Conv", "/c2/Conv"}
    assert executed_layer("/c1/Conv/t2_core_token_17", layers) == "/c1/Conv"
    assert executed_layer("/c2/Conv_token_3", layers) == "/c2/Conv"
    assert executed_layer("/c3/Conv/svd_in", layers) is None
    assert factor_of("/c1/Conv/t2_core_token_17") == "t2_core"


def test_profile_nodes_per_op(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_cnn(), p)
    prof = profile_nodes(p, threads=1, runs=3, warmup=1)
    by = prof.by_op()
    assert sum(n for _, n in by.values()) == len(prof.node_min_us) > 0
    assert any("Conv" in op for op in by) and prof.kernel_us() > 0
    assert all(prof.node_min_us[n] <= prof.node_us[n] for n in prof.node_us)


def test_explicit_pipeline_same_model_with_file_sessions(monkeypatch):
    from onnxcompress import Recipe, optimize
    from onnxcompress.ir.counts import model_bytes, model_macs, model_params
    from onnxcompress.ort import session as S

    m = _cnn()
    before = m.SerializeToString()
    r = Recipe(method="tucker2", ratio=2, quantize="int8", calibration="random", calibration_samples=8,
               skip_first=False, latency_guard=False)
    a = optimize(m, r)
    assert m.SerializeToString() == before                       # the caller's model untouched
    rep = a.report.to_dict()["model"]
    assert (rep["params_before"], rep["macs_before"], rep["bytes_before"]) == \
           (model_params(m), model_macs(m, {"x": (1, 3, 16, 16)}), model_bytes(m))
    monkeypatch.setattr(S, "FILE_SESSION_BYTES", 0)             # every session from an external-data file
    b = optimize(m, r)
    assert {t.name: t.raw_data for t in a.model.graph.initializer} == {t.name: t.raw_data for t in b.model.graph.initializer}
    assert a.report.fidelity == b.report.fidelity
