"""Real-world ONNX files: weights behind Identity/Cast or shared, NHWC inputs, several inputs and outputs,
dynamic dims, already-quantized graphs, control-flow subgraphs, external data, memory cap, Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_err, run_ort, sha256
from onnxcompress import Recipe, optimize
from onnxcompress.cli import main
from onnxcompress.errors import UserError
from onnxcompress.recipe import LayerOverride

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _w(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _full_rank(names):
    return {n: LayerOverride(ranks=[s, t]) for n, (s, t) in names.items()}


def _check_lossless(m, recipe, feeds):
    res = optimize(m, recipe)
    for a, b in zip(run_ort(m, feeds), run_ort(res.model, feeds)):
        assert rel_err(a, b) < 1e-5
    return res


def test_weights_behind_identity_cast_and_shared():
    inits = [_w("W", (8, 8, 3, 3)), numpy_helper.from_array(RNG.standard_normal((8, 8, 3, 3)), "W64")]
    nodes = [helper.make_node("Identity", ["W"], ["Wi"]),
             helper.make_node("Cast", ["W64"], ["Wc"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "Wi"], ["a"], name="c_identity", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "Wc"], ["b"], name="c_cast", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "W"], ["y"], name="c_shared", pads=[1, 1, 1, 1])]
    m = _model(nodes, [_vi("x", [1, 8, 6, 6])], [_vi("y", [1, 8, 6, 6])], inits)
    r = Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False,
               layers=_full_rank({"c_identity": (8, 8), "c_cast": (8, 8), "c_shared": (8, 8)}))
    res = _check_lossless(m, r, {"x": RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)})
    assert all(l["skipped"] is None for l in res.report.layers)


def test_nhwc_input_with_transpose_and_two_inputs_outputs():
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "W1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["z", "W2"], ["y2"], name="c2", strides=[2, 2])]
    m = _model(nodes, [_vi("x", ["N", 7, 7, 6]), _vi("z", ["N", 5, 9, 9])],
               [_vi("y1", ["N", 8, 7, 7]), _vi("y2", ["N", 4, 4, 4])], [_w("W1", (8, 6, 3, 3)), _w("W2", (4, 5, 3, 3))])
    r = Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False,
               layers=_full_rank({"c1": (6, 8), "c2": (5, 4)}))
    feeds = {"x": RNG.standard_normal((2, 7, 7, 6)).astype(np.float32),
             "z": RNG.standard_normal((2, 5, 9, 9)).astype(np.float32)}
    _check_lossless(m, r, feeds)
    # and the full INT8 path on random calibration for a two-input model
    res = optimize(m, Recipe(method="tucker2", ratio=1.5, skip_first=False, latency_guard=False, calibration="random",
                             calibration_samples=4))
    assert {n.op_type for n in res.model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    run_ort(res.model, feeds)


def test_dynamic_spatial_dims_need_input_shape():
    m = conv_model(T=8, S=8)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    with pytest.raises(UserError, match="--input-shape"):
        optimize(m, Recipe(method="tucker2", quantize="none"))
    res = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False,
                             input_shape={"x": [2, 8, 12, 12]}))
    assert res.report.layers[0]["skipped"] is None


def test_already_quantized_refused_but_float_decomposition_allowed():
    m = conv_model(T=16, S=16, hw=(8, 8), batch=1)
    q = optimize(m, Recipe(method="none", calibration="random", calibration_samples=2, latency_guard=False)).model
    with pytest.raises(UserError, match="already quantized"):
        optimize(q, Recipe(method="tucker2", quantize="int8"))
    res = optimize(q, Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False))
    assert "quantized weight" in res.report.layers[0]["skipped"]


def test_conv_inside_if_subgraph_left_alone_with_reason():
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["t"], name="inner_conv", pads=[1, 1, 1, 1])],
                               "then", [], [_vi("t", [1, 8, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [], [_vi("e", [1, 8, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="outer_conv", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    m = _model(nodes, [_vi("x", [1, 8, 6, 6]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [1, 8, 6, 6])],
               [_w("W", (8, 8, 3, 3))])
    res = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, ratio=1.5, latency_guard=False))
    by = {l["name"]: l for l in res.report.layers}
    assert by["outer_conv"]["skipped"] is None
    assert "inside If" in by["inner_conv"]["skipped"]


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets(opset):
    m = conv_model(T=16, S=16, hw=(8, 8), batch=1, opset=opset)
    res = optimize(m, Recipe(method="tucker2", skip_first=False, ratio=2, calibration="random", calibration_samples=2,
                             latency_guard=False, rank_multiple=1))
    assert res.report.layers[0]["skipped"] is None
    run_ort(res.model, {"x": RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)})


def test_external_data_in_and_out(tmp_path, capsys):
    m = conv_model(T=32, S=32, hw=(8, 8), batch=1)
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, src, save_as_external_data=True, location="ext.weights", size_threshold=0)
    out = tmp_path / "o" / "out.onnx"
    out.parent.mkdir()
    rc = main(["optimize", str(src), "-o", str(out), "--quantize", "none", "--no-skip-first", "--quiet",
               "--no-latency-guard"])
    assert rc == 0
    assert (out.parent / "out.onnx.data").exists()
    loaded = onnx.load(str(out))
    x = RNG.standard_normal((1, 32, 8, 8)).astype(np.float32)
    run_ort(loaded, {"x": x})
    # a location escaping the model folder is refused
    bad = onnx.load(str(src), load_external_data=False)
    for t in bad.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    p = tmp_path / "bad.onnx"
    onnx.save_model(bad, p)
    rc = main(["inspect", str(p)])
    assert rc == 2 and "escapes" in capsys.readouterr().err


def test_memory_cap_refuses_clearly():
    m = conv_model(T=128, S=128, hw=(8, 8), batch=1)   # ~3.5 MB working set
    with pytest.raises(UserError, match="over the 1 MB cap"):
        optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, max_memory_mb=1, latency_guard=False))


def test_sigint_leaves_no_output(resnet18_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    before = sha256(resnet18_onnx)
    p = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", "optimize", str(resnet18_onnx), "-o", str(out),
                          "--calibration", "random", "--no-latency-guard"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         # a shell's background job inherits SIGINT ignored: give the child the default handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    time.sleep(4)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0, "finished before the signal (or ignored it)"
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert sha256(resnet18_onnx) == before
