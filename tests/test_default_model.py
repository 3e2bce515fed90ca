"""The shipped default model (models/digits_cnn.onnx) and its data files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from onnxcompress.data.readers import inputs_for_model, model_inputs
from onnxcompress.data.datasets import PRESETS, open_dataset

MODELS = Path(__file__).resolve().parent.parent / "models"
ONNX = MODELS / "digits_cnn.onnx"
TEST = MODELS / "digits_test.npz"
CALIB = MODELS / "digits_calib.npz"


def _stated_accuracy() -> float:
    text = (MODELS / "README.md").read_text()
    m = re.search(r"test accuracy \(ONNX Runtime\)[^0-9]*([0-9]+(?:\.[0-9]+)?)\s*%", text, re.IGNORECASE)
    assert m, "models/README.md must state 'Test accuracy (ONNX Runtime): NN.NN %'"
    return float(m.group(1))


def _session():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(ONNX), so, providers=["CPUExecutionProvider"])


def test_files_exist_and_are_small():
    assert ONNX.stat().st_size <= 2 * 1024 * 1024
    assert TEST.stat().st_size + CALIB.stat().st_size < 512 * 1024


def test_graph_contract():
    import onnx

    m = onnx.load(str(ONNX))
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == 17
    (inp,) = model_inputs(m)
    assert inp.name == "input" and inp.shape[1:] == (1, 16, 16) and inp.fixed_batch is None
    assert [o.name for o in m.graph.output] == ["logits"]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") >= 5  # kept on purpose: FoldBatchNorm folds them
    assert "Identity" not in ops
    inits = {t.name: t for t in m.graph.initializer}
    big3x3 = [n for n in m.graph.node if n.op_type == "Conv"
              and list(inits[n.input[1]].dims[2:]) == [3, 3] and min(inits[n.input[1]].dims[:2]) >= 32]
    assert len(big3x3) >= 5  # enough 3x3 convs with >= 32 channels for Tucker2/CP to matter
    for n in m.graph.node:  # every BatchNormalization reads plain initializers
        if n.op_type == "BatchNormalization":
            assert all(i in inits for i in n.input[1:])


def test_accuracy_matches_readme():
    sess = _session()
    ds = open_dataset(TEST, input_shape=("batch", 1, 16, 16), input_name="input")
    assert ds.has_labels and len(ds) == 360
    correct = total = 0
    for feeds, y in inputs_for_model(sess, ds, batch_size=128):
        pred = sess.run(["logits"], feeds)[0].argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    acc = 100.0 * correct / total
    stated = _stated_accuracy()
    assert acc >= stated - 0.5, f"measured {acc:.2f}% < README's {stated:.2f}% - 0.5"
    assert acc >= 97.0


def test_calibration_file():
    ds = open_dataset(CALIB, input_shape=(None, 1, 16, 16))
    assert len(ds) == 64 and ds.has_labels
    x, y = next(ds.batches(64))
    assert x.dtype == np.float32 and x.shape == (64, 1, 16, 16)
    assert set(y.tolist()) == set(range(10))


def test_digits_preset_reproduces_the_training_inputs(tmp_path):
    """8-bit PNGs of the test digits through the "digits" preset give the stored test inputs: the preset
    documents the model's real preprocessing (x/16, bilinear 8x8 -> 16x16, normalize)."""
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, te = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    with np.load(TEST) as z:
        x_test, y_test = z["x"], z["y"]
    assert (d.target[te] == y_test).all()
    n = 24
    for i, idx in enumerate(te[:n]):
        img = np.round(d.images[idx] * 255.0 / 16.0).astype(np.uint8)
        Image.fromarray(img, "L").save(tmp_path / f"{i:03d}.png")
    ds = open_dataset(tmp_path, input_shape=("batch", 1, 16, 16))
    assert ds.preprocess == PRESETS["digits"]
    x, _ = next(ds.batches(n))
    # 8-bit rounding of the PNG and of Pillow's resized image: at most 2 x 0.5/255 on the [0, 1] scale
    np.testing.assert_allclose(x, x_test[:n], atol=1.01 / 255 / PRESETS["digits"].std[0])
    sess = _session()
    assert (sess.run(["logits"], {"input": x})[0].argmax(1) == y_test[:n]).mean() >= 0.95


def test_int8_with_the_shipped_calibration_file(tmp_path):
    """The calibration file drives ORT static quantization; the INT8 model stays accurate."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from onnxcompress.data.readers import CalibrationReader

    pre = ONNX  # BatchNorms left in (they stay float); onnxcompress's own pipeline folds them first
    reader = CalibrationReader.from_model(pre, CALIB)
    assert len(reader) == 64 and reader.batch_size == 1
    out = tmp_path / "int8.onnx"
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with np.load(TEST) as z:
        x, y = z["x"], z["y"]
    acc = float((sess.run(["logits"], {"input": x})[0].argmax(1) == y).mean()) * 100
    print(f"INT8 accuracy {acc:.2f}%")
    assert acc >= _stated_accuracy() - 1.0, acc
