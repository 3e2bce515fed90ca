"""Data-aware mode: statistics captured through ORT (streamed == one batch), whitened SVD beats plain SVD
on a conv net with correlated inputs, the refit lowers the output error, --method tucker2 SVDs 1×1 convs,
and --data-aware without calibration data is a clear error."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.passes.data_aware import RowStats, capture, rows_last
from onnxcompress.decompose.stats import ConvInputStats
from onnxcompress.errors import UserError
from onnxcompress.pipeline import optimize
from onnxcompress.recipe import Recipe


def small_net(seed=0, C=3, hw=12):
    """conv3x3 → 1×1 → conv3x3/2 → 1×1 → GAP → Gemm, random weights, ReLUs."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, T, S, k, stride=1):
        W = (rng.standard_normal((T, S, k, k)) / np.sqrt(S * k * k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(W, name + "_W"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(T)).astype(np.float32), name + "_B")])
        nodes.append(helper.make_node("Conv", [x, name + "_W", name + "_B"], [name + "_out"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [name + "_out"], [name + "_r"], name=name + "_relu"))
        return name + "_r"

    h = conv("c0", "x", 24, C, 3)
    h = conv("p1", h, 48, 24, 1)
    h = conv("c2", h, 48, 48, 3, stride=2)
    h = conv("p3", h, 64, 48, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array((rng.standard_normal((64, 10)) / 8).astype(np.float32), "fc_W"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_W"], ["y"], name="fc"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def correlated_inputs(n, seed, C=3, hw=12):
    """Smooth images whose channels share one low-resolution field (strongly correlated features)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1, hw // 3, hw // 3))
    base = np.repeat(np.repeat(base, 3, axis=2), 3, axis=3)
    mix = np.array([1.0, 0.8, 0.5])[:C].reshape(1, C, 1, 1)
    return (base * mix + 0.1 * rng.standard_normal((n, C, hw, hw))).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("da")
    np.save(d / "cal.npy", correlated_inputs(64, 1))
    np.save(d / "ev.npy", correlated_inputs(64, 2))
    return str(d / "cal.npy"), str(d / "ev.npy")


def _run(method, data, **kw):
    cal, ev = data
    base = dict(method=method, ratio=3, quantize="none", calibration=cal, calibration_samples=64, eval_data=ev,
                rank_multiple=1, latency_guard=False, input_shape={"x": [1, 3, 12, 12]})
    base.update(kw)
    return optimize(small_net(), Recipe(**base)).report


def test_streamed_statistics_equal_one_batch():
    m = small_net()
    x = correlated_inputs(40, 3)
    feeds = lambda bs: (lambda: ({"x": x[i:i + bs]} for i in range(0, len(x), bs)))
    res = {}
    for bs in (40, 7):
        conv = ConvInputStats(3, 3, (2, 2), (1, 1, 1, 1), max_positions=None)
        rows = RowStats(lambda a: a.reshape(-1, a.shape[1]) if a.ndim == 2 else np.moveaxis(a, 1, -1).reshape(
            -1, a.shape[1]), max_rows=None)
        facts = capture(m, {"p1_r": [conv], "gap": [rows]}, feeds(bs), {"x": (1, 3, 12, 12)})
        res[bs] = (conv.sigma, rows.sigma, facts)
    np.testing.assert_allclose(res[7][0], res[40][0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res[7][1], res[40][1], rtol=1e-9, atol=1e-12)
    assert res[7][2]["batches"] == 6 and res[40][2]["batches"] == 1
    # capture in groups (one tensor per group) gives the same numbers
    conv = ConvInputStats(3, 3, (2, 2), (1, 1, 1, 1), max_positions=None)
    facts = capture(m, {"p1_r": [conv], "x": [RowStats(rows_last, None)]}, feeds(7), {"x": (1, 3, 12, 12)},
                    max_outputs=1)
    assert facts["groups"] == 2
    np.testing.assert_allclose(conv.sigma, res[40][0], rtol=1e-9, atol=1e-12)


def test_whitened_svd_beats_plain_and_refit_helps(data):
    plain = _run("svd", data)
    white = _run("svd", data, data_aware=True, data_aware_refit=False)
    refit = _run("svd", data, data_aware=True)
    ranks = lambda r: [l["ranks"] for l in r.layers if l["method"] == "svd"]
    assert ranks(plain) == ranks(white) == ranks(refit) == [[5], [9], None]
    assert white.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"] + 6
    assert refit.fidelity["sqnr_db"] > white.fidelity["sqnr_db"]
    assert refit.model["data_aware"]["refit"]["chains"] == 2
    la = {l["name"]: l for l in white.layers}
    assert la["p1"]["extra"]["output_rel_error"] < la["p1"]["extra"]["output_rel_error_plain"]


def test_tucker2_svds_1x1_and_sigma_tucker2(data):
    plain = _run("tucker2", data)
    by = {l["name"]: l for l in plain.layers}
    assert by["p1"]["method"] == "svd" and by["p1"]["skipped"] is None and by["p3"]["ranks"] == [9]
    assert by["c2"]["method"] == "tucker2" and by["c2"]["skipped"] is None
    assert len(plain.layers) == len(by)          # one record per layer
    da = _run("tucker2", data, data_aware=True, data_aware_method="kron")
    c2 = {l["name"]: l for l in da.layers}["c2"]
    assert "sigma-tucker2" in c2["extra"]["data_aware"]
    assert da.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"] + 6


def test_data_aware_needs_calibration():
    with pytest.raises(UserError, match="calibration"):
        optimize(small_net(), Recipe(method="svd", data_aware=True, quantize="none",
                                     input_shape={"x": [1, 3, 12, 12]}))
    with pytest.raises(UserError, match="tucker2 or svd"):
        optimize(small_net(), Recipe(method="cp4", data_aware=True, quantize="none", calibration="random",
                                     input_shape={"x": [1, 3, 12, 12]}))


def test_random_calibration_warns():
    r = optimize(small_net(), Recipe(method="svd", data_aware=True, quantize="none", calibration="random",
                                     rank_multiple=1, input_shape={"x": [1, 3, 12, 12]}))
    assert any("random" in w for w in r.report.warnings)
