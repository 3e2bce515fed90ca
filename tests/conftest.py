"""Shared test helpers: tiny ONNX models built with onnx.helper, ORT runs, file hashing."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings as _hyp_settings

# CI runs with CI=true: property tests use a fixed example sequence there, so a landing is reproducible
# (locally they keep exploring new examples).
_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

OPSET = 17


@pytest.fixture(autouse=True, scope="session")
def _single_thread_blas():
    """The numerics run with one BLAS thread, as `optimize` runs them (OpenBLAS threads thrash on busy cores)."""
    from onnxcompress.decompose._blas import one_blas_thread

    with one_blas_thread():
        yield


@pytest.fixture(autouse=True)
def _own_latency_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty latency-guard timing cache: no test reads timings another stored (or the
    user's ~/.cache), none writes fake timings where a real run would find them."""
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path_factory.mktemp("latency")))


def conv_model(T=8, S=6, kernel=(3, 3), strides=None, pads=None, dilations=None, auto_pad=None, bias=True,
               group=1, hw=(9, 11), batch=2, seed=0, weight_as_constant_node=False, bn=False,
               dynamic_batch=False, opset=OPSET) -> onnx.ModelProto:
    """One Conv (optionally followed by BatchNormalization, optionally ReLU-free) in a valid model."""
    rng = np.random.default_rng(seed)
    nd = len(kernel)
    W = rng.standard_normal((T, S // group) + tuple(kernel)).astype(np.float32)
    attrs = {"kernel_shape": list(kernel), "group": group}
    if strides:
        attrs["strides"] = list(strides)
    if dilations:
        attrs["dilations"] = list(dilations)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    elif pads:
        attrs["pads"] = list(pads)
    inits, nodes = [], []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W, "Wc")))
    else:
        inits.append(numpy_helper.from_array(W, "W"))
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(T).astype(np.float32), "B"))
        ins.append("B")
    conv_out = "y" if not bn else "c"
    nodes.append(helper.make_node("Conv", ins, [conv_out], name="conv", **attrs))
    if bn:
        for name, val in (("gamma", rng.uniform(0.5, 2, T)), ("beta", rng.standard_normal(T)),
                          ("mean", rng.standard_normal(T)), ("var", rng.uniform(0.2, 3, T))):
            inits.append(numpy_helper.from_array(val.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                                      name="bn", epsilon=1e-3))
    in_shape = ["N" if dynamic_batch else batch, S] + list(hw[:nd])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (nd + 2))
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


class ListReader(CalibrationDataReader):
    """An ORT CalibrationDataReader over a list of feed dicts (`.d`), read once in order."""

    def __init__(self, feeds):
        self.d = list(feeds)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.d):
            return None
        self.i += 1
        return self.d[self.i - 1]


def random_reader(shape, n: int, seed: int) -> ListReader:
    """`n` batches of N(0, 1) float32 of `shape` as input "x"."""
    rng = np.random.default_rng(seed)
    return ListReader({"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory) -> Path:
    """torchvision ResNet-18, random weights, exported once per session (BN kept as nodes would be
    folded by the exporter's constant folding; we export in eval mode)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    p = tmp_path_factory.mktemp("zoo") / "resnet18.onnx"
    torch.onnx.export(m, torch.randn(1, 3, 224, 224), str(p), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return p
