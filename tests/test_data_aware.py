"""Data-aware mode through optimize(): statistics captured through ORT (streamed == one batch); on a conv net
with correlated inputs --data-aware beats plain SVD / Tucker2 (with and without --no-refit, --data-aware-method
kron and als), records per layer what it kept and why, and lists fallbacks in the table; --data-aware without
(enough) calibration data is a clear error. The algorithm itself: tests/test_data_aware_seq.py."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.decompose.stats import ConvInputStats, RowStats, rows_last
from onnxcompress.errors import UserError
from onnxcompress.ort.capture import capture
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


def test_data_aware_svd_beats_plain_and_records_each_layer(data):
    plain = _run("svd", data)
    orig_inputs = _run("svd", data, data_aware=True, data_aware_refit=False)
    seq = _run("svd", data, data_aware=True)
    ranks = lambda r: [l["ranks"] for l in r.layers if l["method"] == "svd"]
    assert ranks(plain) == ranks(orig_inputs) == ranks(seq) == [[5], [9], None]
    # measured: plain 0.2 dB, --no-refit 21.2 dB, sequential 22.5 dB
    assert orig_inputs.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"] + 6
    assert seq.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"] + 6
    da = seq.model["data_aware"]
    assert da["refit"] is True and da["inputs"] == "compressed" and orig_inputs.model["data_aware"]["inputs"] == "original"
    assert da["calibration"]["fit_samples"] == 48 and da["calibration"]["heldout_samples"] == 16
    assert [l["name"] for l in da["layers"]] == ["p1", "p3"] and da["net_db_final"] >= da["net_db_plain"]
    names = [p.name for p in seq.passes]   # DataAware revisits the chains right after the factorization
    assert names[names.index("SVD") + 1] == "DataAware" and names[-1] == "Fuse"
    la = {l["name"]: l for l in seq.layers}
    for name in ("p1", "p3"):
        ex = la[name]["extra"]
        assert set(ex) >= {"kept", "fell_back", "reason", "heldout_db_plain", "heldout_db_kept"}
        assert ex["heldout_db_kept"] >= ex["heldout_db_plain"]
        if not ex["fell_back"]:       # the record's weight error is the kept factors'; the plain one stays
            assert la[name]["weight_rel_error"] >= ex["weight_rel_error_plain"] - 1e-9
    assert "data-aware: " in seq.table() and "held-out network SQNR" in seq.table()


@pytest.mark.parametrize("method", ["kron", "als"])
def test_tucker2_svds_1x1_and_data_aware_tucker2(data, method):
    plain = _run("tucker2", data)
    by = {l["name"]: l for l in plain.layers}
    assert by["p1"]["method"] == "svd" and by["p1"]["skipped"] is None and by["p3"]["ranks"] == [9]
    assert by["c2"]["method"] == "tucker2" and by["c2"]["skipped"] is None
    assert len(plain.layers) == len(by)          # one record per layer
    da = _run("tucker2", data, data_aware=True, data_aware_method=method)
    c2 = {l["name"]: l for l in da.layers}["c2"]
    assert c2["extra"]["kept"] != "plain" and c2["extra"]["heldout_db_kept"] > c2["extra"]["heldout_db_plain"]
    assert da.model["data_aware"]["method"] == method
    assert da.fidelity["sqnr_db"] > plain.fidelity["sqnr_db"] + 6


def test_table_lists_fallbacks():
    from onnxcompress.report.report import Report

    layers = [{"name": "a", "kernel_shape": [8, 8, 1, 1], "method": "svd", "ranks": [2], "params_before": 64,
               "params_after": 32, "extra": {"fell_back": True, "kept": "plain"}},
              {"name": "b", "kernel_shape": [8, 8, 1, 1], "method": "svd", "ranks": [2], "params_before": 64,
               "params_after": 32, "extra": {"fell_back": False, "kept": "da(lam=0.01)"}}]
    da = {"layers": [{"name": "a", "fell_back": True}, {"name": "b", "fell_back": False}], "net_db_plain": 1.0,
          "net_db_final": 2.5}
    t = Report(layers=layers, model={"data_aware": da}).table()
    assert "data-aware: 1 of 2 layers keep data-aware factors, 1 fell back to plain (a)" in t
    row_a = next(line for line in t.splitlines() if line.startswith("a "))
    assert "fell back" in row_a


def test_data_aware_needs_calibration():
    with pytest.raises(UserError, match="calibration"):
        optimize(small_net(), Recipe(method="svd", data_aware=True, quantize="none",
                                     input_shape={"x": [1, 3, 12, 12]}))
    with pytest.raises(UserError, match="tucker2 or svd"):
        optimize(small_net(), Recipe(method="cp4", data_aware=True, quantize="none", calibration="random",
                                     input_shape={"x": [1, 3, 12, 12]}))
    with pytest.raises(UserError, match="at least 4 calibration samples"):   # every 4th sample is held out
        optimize(small_net(), Recipe(method="svd", data_aware=True, quantize="none", calibration="random",
                                     calibration_samples=3, input_shape={"x": [1, 3, 12, 12]}))


def test_random_calibration_warns():
    r = optimize(small_net(), Recipe(method="svd", data_aware=True, quantize="none", calibration="random",
                                     rank_multiple=1, input_shape={"x": [1, 3, 12, 12]}))
    assert any("random" in w for w in r.report.warnings)
