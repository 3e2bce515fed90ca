"""End to end: torchvision ResNet-18 (random weights) → Tucker2 2× + INT8 through the Python API and CLI."""
import json

import onnx
import pytest

from conftest import sha256
from onnxcompress import Recipe, optimize
from onnxcompress.cli import main


@pytest.fixture(scope="module")
def r18_result(resnet18_onnx):
    recipe = Recipe(method="tucker2", ratio=2, quantize="int8", calibration="random", calibration_samples=4,
                    eval_samples=4, latency_guard=False)  # structure, not timing: the guard is tested apart
    return optimize(resnet18_onnx, recipe)


def test_resnet18_tucker2_int8_valid_and_on_target(r18_result):
    res = r18_result
    onnx.checker.check_model(res.model, full_check=True)
    rep = res.report.to_dict()
    done = [l for l in rep["layers"] if l["skipped"] is None and l["method"] == "tucker2"]
    assert len(done) == 16  # every 3x3 conv but the stem
    # --method tucker2 factorizes the three 1x1 downsample convs by SVD
    assert len([l for l in rep["layers"] if l["skipped"] is None and l["method"] == "svd"]) == 3
    ratio = sum(l["params_before"] for l in done) / sum(l["params_after"] for l in done)
    assert abs(ratio - 2.0) / 2.0 <= 0.05
    # stem skipped with a reason; 1x1 convs recorded as not for Tucker2
    stem = rep["layers"][0]
    assert stem["skipped"]
    # passes verified
    names = [p["name"] for p in rep["passes"]]
    # QAF (on by default when factorized layers are quantized) refits the chains before Fuse and INT8
    assert names == ["FoldConstants", "FoldBatchNorm", "Tucker2", "SVD", "QAF", "Fuse", "QuantizeInt8"]
    assert all(p["verified"].get("ort_runs") for p in rep["passes"] if p["modified"])
    for k in ("params_before", "params_after", "macs_before", "macs_after", "bytes_before", "bytes_after"):
        assert rep["model"][k] > 0
    assert rep["model"]["macs_after"] < rep["model"]["macs_before"]
    for k in ("samples", "top1_agreement", "sqnr_db", "max_abs_diff"):
        assert rep["fidelity"][k] is not None
    assert rep["quantization"]["int8"]["activations"] == "uint8"


def test_resnet18_qdq_around_every_conv(r18_result):
    m = r18_result.model
    producers = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    fuse = next(p for p in r18_result.report.to_dict()["passes"] if p["name"] == "Fuse")
    merged = 3 if fuse["modified"] else 0    # each downsampling block's two last 1x1s + Add -> Concat + one 1x1
    assert len(convs) == 16 * 3 + 1 + 3 * 2 - merged  # chains + stem + downsample 1x1s (SVD: two 1x1 each)
    assert sum(n.op_type == "Concat" for n in m.graph.node) == merged
    for c in convs:
        for i in c.input[:2]:
            assert producers[i].op_type == "DequantizeLinear", (c.name, i)
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    # every conv output is re-quantized (directly or after a fused Relu/Add)
    for c in convs:
        nxt = consumers.get(c.output[0], [])
        assert "QuantizeLinear" in nxt or any(op in ("Relu", "Add") for op in nxt), (c.name, nxt)


def test_cli_end_to_end_writes_model_and_report(resnet18_onnx, tmp_path, capsys):
    before = sha256(resnet18_onnx)
    out, rep = tmp_path / "r18.opt.onnx", tmp_path / "report.json"
    rc = main(["optimize", str(resnet18_onnx), "-o", str(out), "--method", "tucker2", "--ratio", "3",
               "--quantize", "none", "--calibration", "random", "--report", str(rep), "--quiet",
               "--include", "/layer4*", "--no-latency-guard"])
    assert rc == 0
    assert sha256(resnet18_onnx) == before
    data = json.loads(rep.read_text())
    assert {"model", "layers", "passes", "fidelity"} <= set(data)
    done = [l for l in data["layers"] if l["skipped"] is None]
    assert done and all(l["name"].startswith("/layer4") for l in done)
    assert any(l["skipped"] == "not matched by --include" for l in data["layers"])
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert not list(tmp_path.glob(".*tmp"))
