"""INT4 weights on ONNX Runtime (ort/int4.py), the INT4 pass (passes/int4.py), `--quantize int4` in the pipeline and
INT4 in the auto search (size objective only): outputs, file size, packed int4 values, what the report says."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import random_reader
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from onnxcompress.decompose import qaf
from onnxcompress.ort import int4


def _conv_model(opset: int = 17, seed: int = 0):
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((12, 16, 1, 1)) * 0.3).astype(np.float32)
    b2 = rng.standard_normal(12).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2", kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12, 6, 6])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(b2, "b2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    return m, w1, w2, b2


def _run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _conv_ref(x, w, pad):
    n, c, h, wd = x.shape
    t, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, t, h, wd))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("ncxy,tc->ntxy", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out


@pytest.mark.parametrize("opset", [17, 21])
def test_conv_weights_int4_outputs_packing_size(opset):
    m, w1, w2, b2 = _conv_model(opset)
    q = int4.conv_weights_int4(m)
    onnx.checker.check_model(q)
    dq_domains = {n.domain for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_domains == ({""} if opset >= 21 else {"com.microsoft"})
    # the stored values are packed int4 and equal the grid codes
    packed = {t.name: t for t in int4.int4_initializers(q)}
    assert set(packed) >= {"w1_int4", "w2_int4"}
    for name, w in (("w1", w1), ("w2", w2)):
        t = packed[f"{name}_int4"]
        assert len(t.raw_data) == (w.size + 1) // 2          # two values a byte
        codes, scales = int4.int4_codes(w)
        assert np.array_equal(int4.unpack_int4(t), codes)
        assert codes.min() >= -8 and codes.max() <= 7
        assert np.allclose(numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == f"{name}_int4_scale")), scales)
    # ORT output = the float model run with the dequantized weights
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    y = _run(q, x)
    wd1 = qaf.fake_quant(w1, qaf.INT4)
    wd2 = qaf.fake_quant(w2, qaf.INT4)
    ref = _conv_ref(np.maximum(_conv_ref(x, wd1, 1), 0), wd2, 0) + b2[None, :, None, None]
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    # and it is close to the float model (int4: a few percent)
    y32 = _run(m, x)
    rel = np.linalg.norm(y - y32) / np.linalg.norm(y32)
    assert 1e-3 < rel < 0.2
    # file smaller: weights 4 bits instead of 32
    w_bytes_fp32 = (w1.size + w2.size) * 4
    assert m.ByteSize() - q.ByteSize() > 0.6 * w_bytes_fp32


def test_conv_weights_int4_takes_given_codes():
    m, w1, _, _ = _conv_model()
    q1, s1 = int4.int4_codes(w1)
    q1 = q1.copy()
    q1[0, 0, 0, 0] = -q1[0, 0, 0, 0] if q1[0, 0, 0, 0] else 3
    out = int4.conv_weights_int4(m, codes={"w1": (q1, s1)})
    t = next(t for t in out.graph.initializer if t.name == "w1_int4")
    assert np.array_equal(int4.unpack_int4(t), q1)


def _Reader(n=4, seed=2):
    return random_reader((2, 8, 6, 6), n, seed)


def test_quantize_int4_static_int8_activations():
    m, w1, w2, _ = _conv_model()
    q, facts = int4.quantize_int4_static(m, _Reader())
    assert sorted(facts["int4_weights"]) == ["w1", "w2"]
    ints = {t.name: t for t in int4.int4_initializers(q) if len(t.dims) == 4}
    assert len(ints) == 2
    for w in (w1, w2):
        t = next(t for t in ints.values() if tuple(t.dims) == w.shape)
        assert np.array_equal(int4.unpack_int4(t), int4.int4_codes(w)[0])   # our grid, not ORT's amax/7.5
    # activations quantized (uint8 Q/DQ on the conv inputs)
    acts = [t for t in q.graph.initializer if t.data_type == TensorProto.UINT8]
    assert acts
    x = _Reader(1, seed=5).d[0]["x"]
    y, y32 = _run(q, x), _run(m, x)
    assert np.linalg.norm(y - y32) / np.linalg.norm(y32) < 0.2


def _matmul_model(k=64, n=48, gemm=False):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    if gemm:
        node = helper.make_node("Gemm", ["x", "wt", "b"], ["y"], name="fc", transB=1, alpha=0.5)
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T * 2), "wt"), numpy_helper.from_array(b, "b")]
        nodes = [node]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, w, b


@pytest.mark.parametrize("gemm", [False, True])
def test_matmul_nbits(gemm):
    m, w, b = _matmul_model(gemm=gemm)
    q = int4.matmul_nbits(m, block_size=32)
    ops = [n.op_type for n in q.graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops and "Gemm" not in ops
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    y = _run(q, x)
    ref = x @ w + b
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.1
    assert q.ByteSize() < m.ByteSize() * 0.3


def test_gemm_to_matmul_is_exact():
    m, w, b = _matmul_model(gemm=True)
    mm = int4.gemm_to_matmul(m)
    assert [n.op_type for n in mm.graph.node] == ["MatMul", "Add"]
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    assert np.allclose(_run(mm, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_quantize_int4_static_mixed_int8_int4():
    """Only the chosen Conv gets int4 weights, the other one int8 (how the auto search builds mixed models)."""
    m, w1, w2, _ = _conv_model()
    q, facts = int4.quantize_int4_static(m, _Reader(), int4_nodes=["c2"])
    assert facts["int4_weights"] == ["w2"]
    assert list(int4.int4_conv_weights(q)) == ["c2"]
    int8_w = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8 and tuple(t.dims) == w1.shape]
    assert len(int8_w) == 1


def test_matmul_nbits_only_included_nodes():
    m, w, b = _matmul_model(gemm=True)
    assert int4.nbits_nodes(int4.matmul_nbits(m, nodes_to_include=["fc"])) == ["fc"]
    untouched = int4.matmul_nbits(m, nodes_to_include=["other"])
    assert [n.op_type for n in untouched.graph.node] == ["Gemm"]


def test_depthwise_convs_found():
    m, *_ = _conv_model()
    assert int4.depthwise_convs(m) == []
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", kernel_shape=[3, 3], group=8,
                                            pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])],
                          [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")])
    assert int4.depthwise_convs(helper.make_model(g)) == ["dw"]


# ------------------------------------------------------------------------------------------ the pass


def _conv_gemm_model():
    """Conv → ReLU → depthwise Conv → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    wd = (rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32)
    wf = (rng.standard_normal((10, 16)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wd"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              group=16),
             helper.make_node("GlobalAveragePool", ["d"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                          [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (wd, "wd"), (wf, "wf"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_int4_pass_weight_only_keeps_depthwise_and_float_nodes_and_stores_qaf_codes():
    from onnxcompress.passes.base import PassContext
    from onnxcompress.passes.registry import quantizer

    m = _conv_gemm_model()
    w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
    codes, scales = int4.int4_codes(w1)
    codes = codes.copy()
    codes[0, 0, 0, 0] = 7 if codes[0, 0, 0, 0] != 7 else -8      # not what RTN would store: must come from QAF
    ctx = PassContext(handoff={"qaf_codes": [("w1", 4, codes, scales)]})
    res = quantizer("int4").run(m, ctx)
    onnx.checker.check_model(res.model)
    assert res.info["int4_nodes"] == ["c1", "fc"]          # depthwise stays float, Gemm -> MatMulNBits
    assert [r.name for r in res.layers] == ["c1", "fc"] and {r.method for r in res.layers} == {"int4"}
    assert res.info["int4"]["qaf_weights"] == 1 and res.info["int4"]["depthwise"] == "float"
    t = next(t for t in res.model.graph.initializer if t.name == "w1_int4")
    assert np.array_equal(int4.unpack_int4(t), codes)
    assert any(t.name == "wd" and t.data_type == TensorProto.FLOAT for t in res.model.graph.initializer)
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    y, y32 = _run(res.model, x), _run(m, x)
    assert np.linalg.norm(y - y32) / np.linalg.norm(y32) < 0.3
    # a node an earlier pass keeps in float (hand-off) stays float
    res2 = quantizer("int4").run(m, PassContext(handoff={"float_nodes": ["c1"]}))
    assert res2.info["int4_nodes"] == ["fc"]


def test_int4_pass_refuses_a_quantized_model():
    from onnxcompress.errors import UserError
    from onnxcompress.passes.registry import quantizer

    q = quantizer("int4").run(_conv_gemm_model()).model
    with pytest.raises(UserError):
        quantizer("int4").run(q)


# ------------------------------------------------------------------------------------------ pipeline, recipe, CLI


MODELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "models"


def test_quantize_int4_in_the_pipeline_weight_only_needs_no_calibration():
    """`--quantize int4` on the default model: int4 Conv weights, the classifier as MatMulNBits, per-layer
    precision int4, and the report's quantization section says what INT4 bought and cost, measured."""
    from onnxcompress import optimize
    from onnxcompress.recipe import Recipe

    r = Recipe(method="none", quantize="int4", eval_data=str(MODELS / "digits_test.npz"), eval_samples=120)
    res = optimize(str(MODELS / "digits_cnn.onnx"), r)
    m = res.model
    assert int4.int4_initializers(m) and int4.nbits_nodes(m) == ["/fc/Gemm"]
    rep = res.report
    assert {l["precision"] for l in rep.layers} == {"int4"}
    meas = rep.quantization["int4"]["measured"]
    assert meas["size_ratio"] > 5 and meas["bytes_after_int4"] < meas["bytes_before_int4"]
    assert meas["latency_ratio"] is not None and meas["latency_ratio"] > 0
    assert rep.fidelity["top1_agreement"] > 0.95
    assert "INT4" in rep.table() and "size format" in rep.table()


def test_int4_with_int8_activations_needs_calibration():
    from onnxcompress import optimize
    from onnxcompress.errors import UserError
    from onnxcompress.recipe import Recipe

    r = Recipe(method="none", quantize="int4", int4_activations="int8", eval_data=str(MODELS / "digits_test.npz"))
    with pytest.raises(UserError, match="calibration"):
        optimize(str(MODELS / "digits_cnn.onnx"), r)


def test_recipe_and_cli_int4_fields():
    from onnxcompress.errors import UserError
    from onnxcompress.recipe import Recipe

    assert Recipe(quantize="int4", int4_block_size=64, int4_accuracy_level=4).validate().quantize == "int4"
    for bad in ({"int4_block_size": 24}, {"int4_block_size": 8}, {"int4_accuracy_level": 5},
                {"int4_activations": "uint4"}):
        with pytest.raises(UserError):
            Recipe(**bad).validate()
    import argparse

    from onnxcompress.cli.optimize import add_parser, recipe_flags

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    a = p.parse_args(["optimize", "m.onnx", "--quantize", "int4", "--int4-block-size", "64",
                      "--int4-accuracy-level", "4", "--int4-activations", "int8"])
    f = recipe_flags(a)
    assert f["quantize"] == "int4" and f["int4_block_size"] == 64 and f["int4_accuracy_level"] == 4
    assert f["int4_activations"] == "int8"


def test_auto_offers_int4_only_under_the_size_objective():
    from onnxcompress.auto.driver import precisions_for

    assert "int4" not in precisions_for("auto", "latency")
    assert precisions_for("auto", "size") == ["float", "int8", "int4"]
    assert "int4" not in precisions_for("int8", "size")
    assert precisions_for("int4", "latency") == ["float", "int4"]     # asked for explicitly


def test_int4_noise_prediction_adds_int8_activation_noise():
    from onnxcompress.auto.candidates import Option, predicted_noise

    opts = {"a": [Option("a", None, None, p) for p in ("float", "int8", "int4")] +
                 [Option("a", "tucker2", (2, 2), "int4")]}
    predicted_noise(opts, {("a", "tucker2", (2, 2)): 0.01}, {"a": 0.001}, {"a": 0.004})
    n = {(o.method, o.precision): o.noise for o in opts["a"]}
    assert n[(None, "float")] == 0 and n[(None, "int8")] == 0.001
    assert n[(None, "int4")] == pytest.approx(0.005)
    assert n[("tucker2", "int4")] == pytest.approx(0.01 + 2.5 * 0.005)


def test_int4_pass_mixed_with_int8_activations():
    """int4 for the chosen layers only, every other weight int8 with int8 activations (the auto search's mixed
    models): the depthwise conv stays int8, the Gemm too (it is not chosen)."""
    from onnxcompress.ort.quantize import int8_format_for
    from onnxcompress.passes.registry import quantizer

    class R(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(3)
            self.d = [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(3)]

        def get_next(self):
            return self.d.pop() if self.d else None

    m = _conv_gemm_model()
    p = quantizer("int4", activations="uint8", reader_factory=R, fmt=int8_format_for("cpu"), int4_layers=["c1"])
    res = p.run(m)
    assert list(int4.int4_conv_weights(res.model)) == ["c1"] and res.info["int4_nodes"] == ["c1"]
    assert {"dw", "fc"} <= set(res.info["quantized_nodes"])
    assert "c1" not in res.info["quantized_nodes"]
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    y, y32 = _run(res.model, x), _run(m, x)
    assert np.linalg.norm(y - y32) / np.linalg.norm(y32) < 0.3


def test_auto_size_objective_tries_int4_and_writes_a_smaller_model_within_budget():
    """`--method auto --objective size` on the digits model: INT4 options are measured (one-layer ORT int4 models)
    and offered; the result meets the budget on held-out data and is smaller than the INT8-only candidate. The
    latency objective (the default, test_auto.py) never offers INT4."""
    from onnxcompress import optimize
    from onnxcompress.recipe import Recipe

    res = optimize(str(MODELS / "digits_cnn.onnx"),
                   Recipe(objective="size", calibration=str(MODELS / "digits_calib.npz"),
                          eval_data=str(MODELS / "digits_test.npz"), eval_samples=180))
    rep = res.report
    assert rep.auto["precisions"] == ["float", "int8", "int4"]
    assert rep.auto["int4_sensitivity"]["layers"] >= 5
    assert any(o["precision"] == "int4" and o["predicted_noise"] is not None
               for opts in rep.auto["options"].values() for o in opts)
    assert rep.fidelity["accuracy_drop"] * 100 <= 1.0
    int8_only = next(p for p in rep.frontier if p["label"] == "int8-only")
    assert rep.model["bytes_after"] < int8_only["bytes"]
    assert any(l["precision"] == "int4" for l in rep.layers)
