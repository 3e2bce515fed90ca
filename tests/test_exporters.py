"""Models as today's torch exporters write them: dynamo (optimize on/off, external data) and the legacy
TorchScript exporter. Every conv must be seen (constant folding first), and file sizes count the external
data on both sides."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_ort
from onnxcompress import Recipe, optimize
from onnxcompress.cli import main
from onnxcompress.passes.fold_constants import fold_constants, foldable_nodes
from onnxcompress.ir.modelio import load_model, stored_bytes


def _disk(path: Path) -> int:
    return path.stat().st_size + (Path(str(path) + ".data").stat().st_size
                                  if Path(str(path) + ".data").exists() else 0)


# ------------------------------------------------------------------------------------------ no torch needed
def _dynamo_style_bias_model() -> onnx.ModelProto:
    """Conv whose bias is built the way the dynamo exporter (optimize=False) builds it:
    Expand(CastLike(Constant 0, x), Expand(Shape(W), [1])), followed by BatchNormalization."""
    rng = np.random.default_rng(0)
    T, S = 16, 8
    inits = [numpy_helper.from_array(rng.standard_normal((T, S, 3, 3)).astype(np.float32), "W")]
    for name, val in (("g", rng.uniform(0.5, 2, T)), ("b", rng.standard_normal(T)),
                      ("m", rng.standard_normal(T)), ("v", rng.uniform(0.2, 3, T))):
        inits.append(numpy_helper.from_array(val.astype(np.float32), name))
    nodes = [
        helper.make_node("Shape", ["W"], ["w_shape"], start=0, end=1),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Expand", ["w_shape", "one"], ["b_shape"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "b_shape"], ["bias"]),
        helper.make_node("Conv", ["x", "W", "bias"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_fold_constants_turns_the_exporters_bias_arithmetic_into_an_initializer():
    pytest.importorskip("onnxscript")
    m = _dynamo_style_bias_model()
    assert len(foldable_nodes(m)) == 4                      # Shape, Expand, CastLike, Expand
    out, s = fold_constants(m)
    assert s.modified and s.removed.get("Expand") == 2 and s.removed.get("CastLike") == 1
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Conv", "BatchNormalization"]
    conv = out.graph.node[0]
    assert conv.name == "conv" and conv.input[2] in {t.name for t in out.graph.initializer}
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)
    # equal up to float rounding: with a constant bias ORT fuses Conv+BN at session creation
    np.testing.assert_allclose(run_ort(m, {"x": x})[0], run_ort(out, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert len(m.graph.node) == 8                           # the input model is left as it was
    again, s2 = fold_constants(out)
    assert again is out and not s2.modified and s2.line() == "constant folding: nothing to fold"


def test_optimize_decomposes_a_conv_with_an_exported_bias_and_folds_its_bn():
    pytest.importorskip("onnxscript")
    res = optimize(_dynamo_style_bias_model(), Recipe(method="tucker2", ratio=2, quantize="none",
                                                      latency_guard=False, skip_first=False))
    passes = {p.name: p.modified for p in res.report.passes}
    assert passes["FoldConstants"] and passes["FoldBatchNorm"] and passes["Tucker2"]
    assert [l["skipped"] for l in res.report.layers] == [None]
    assert "BatchNormalization" not in {n.op_type for n in res.model.graph.node}
    assert res.report.model["fold_constants"]["removed"]["Expand"] == 2
    assert not any(w.startswith("nothing changed") for w in res.report.warnings)


def test_without_onnxscript_the_model_is_left_unfolded_and_a_warning_says_so(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_onnxscript(name, *a, **k):
        if name == "onnxscript" or name.startswith("onnxscript."):
            raise ImportError("No module named 'onnxscript'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    m = _dynamo_style_bias_model()
    out, s = fold_constants(m)
    assert out is m and not s.modified and "onnxscript is not installed" in s.note
    res = optimize(m, Recipe(method="tucker2", ratio=2, quantize="none", latency_guard=False, skip_first=False))
    w = res.report.warnings
    assert any("onnxscript is not installed" in x for x in w)
    assert any(x.startswith("nothing changed: no pass rewrote the model (1 layer(s) considered, skipped as "
                            "dynamic bias: 1)") for x in w), w


def test_stored_bytes_counts_external_data(tmp_path):
    m = _dynamo_style_bias_model()
    p = tmp_path / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size > 4000
    assert stored_bytes(p) == _disk(p)
    assert stored_bytes(p) > p.stat().st_size


# ------------------------------------------------------------------------------------------ real exports
class Tiny:
    """A small CNN with the layer kinds torchvision nets have: stem, BN, 3x3 and 1x1 convs, a classifier."""

    @staticmethod
    def make():
        import torch.nn as nn

        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        for mod in net.modules():   # non-trivial BN statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.5, 0.5)
        return net.eval()


EXPORTS = {
    "dynamo_optimize": dict(dynamo=True, optimize=True, external_data=True),
    "dynamo_no_optimize": dict(dynamo=True, optimize=False, external_data=True),
    "legacy": dict(dynamo=False, opset_version=17),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    net = Tiny.make()
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for tag, kw in EXPORTS.items():
        if kw.get("dynamo"):
            pytest.importorskip("onnxscript")
        p = d / f"tiny_{tag}.onnx"
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(p), input_names=["input"],
                              output_names=["logits"], **kw)
        out[tag] = p
    return out


@pytest.mark.parametrize("tag", list(EXPORTS))
def test_every_export_gets_its_convs_decomposed_and_its_sizes_right(exported, tag, tmp_path, capsys):
    src = exported[tag]
    if tag.startswith("dynamo"):
        assert Path(str(src) + ".data").exists()            # the weights are in the side file
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc = main(["optimize", str(src), "-o", str(out), "--method", "tucker2", "--ratio", "2", "--quantize", "none",
               "--no-latency-guard", "--svd-gemm", "--no-svd-skip-last", "--report", str(rep), "-q"])
    assert rc == 0, capsys.readouterr().err
    import json

    r = json.loads(rep.read_text())
    layers = {l["name"]: l for l in r["layers"]}
    done = [l for l in r["layers"] if l["skipped"] is None]
    # the two 3x3 convs after the stem (Tucker2), the 1x1 conv and the Linear (SVD): 4 of 5
    assert len(done) == 4, {k: v["skipped"] for k, v in layers.items()}
    assert not any("dynamic" in (l["skipped"] or "") for l in r["layers"])
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    m = r["model"]
    assert m["bytes_before"] == _disk(src)                   # .onnx plus its .onnx.data
    assert abs(m["bytes_after"] - _disk(out)) <= 0.02 * _disk(out) + 2048
    assert m["bytes_after"] < m["bytes_before"]
    assert m["params_after"] < m["params_before"]
    # the output runs and stays close to the input model (ratio 2 on random weights is not exact)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    a = run_ort(load_model(src), {"input": x})[0]
    b = run_ort(load_model(out), {"input": x})[0]
    assert a.shape == b.shape == (1, 10)


def test_exports_agree_with_each_other_after_folding(exported):
    """The three exports of one net are the same function: folded, each gives the legacy export's outputs."""
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = run_ort(load_model(exported["legacy"]), {"input": x})[0]
    for tag in EXPORTS:
        folded, _ = fold_constants(load_model(exported[tag]))
        np.testing.assert_allclose(run_ort(folded, {"input": x})[0], ref, rtol=1e-4, atol=1e-5)
