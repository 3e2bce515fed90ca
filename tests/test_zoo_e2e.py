"""All five reference architectures (random weights, CIFAR-10 heads, exports cached) through Tucker2 2x + INT8:
valid, runs in ORT, ratios and fidelity reported."""
import numpy as np
import onnx
import pytest

from onnxcompress import Recipe, optimize

pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "googlenet", "alexnet"])
def test_architecture_tucker2_int8(name):
    from onnxcompress.zoo import cached_export

    path = cached_export(name, dataset="cifar10", weights="none")
    res = optimize(path, Recipe(method="tucker2", ratio=2, quantize="int8", calibration="random",
                                calibration_samples=2, eval_samples=2, latency_guard=False, rank_multiple=1))
    onnx.checker.check_model(res.model, full_check=True)
    rep = res.report.to_dict()
    done = [l for l in rep["layers"] if l["skipped"] is None]
    assert done, f"{name}: nothing decomposed"
    ratio = sum(l["params_before"] for l in done) / sum(l["params_after"] for l in done)
    assert abs(ratio - 2) / 2 < 0.05, ratio
    assert rep["fidelity"]["samples"] == 2 and rep["fidelity"]["top1_agreement"] is not None
    assert rep["model"]["bytes_after"] < rep["model"]["bytes_before"] / 3   # INT8 + Tucker2
    import onnxruntime as ort
    s = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert out.shape == (1, 10)
