"""onnxcompress.data (streaming datasets) and onnxcompress.calibration (ORT calibration readers)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from onnxcompress.data.datasets import PRESETS, DataError, Dataset, Preprocess, open_dataset, preprocess_for_shape

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# --------------------------------------------------------------------------------------------- helpers


def _solid(path, size_wh, color, mode="RGB"):
    Image.new(mode, size_wh, color).save(path)


def _rand_image(path, size_wh, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size_wh[1], size_wh[0], 3) if mode == "RGB" else (size_wh[1], size_wh[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _all(ds, bs=4):
    xs, ys = [], []
    for x, y in ds.batches(bs):
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), (np.concatenate(ys) if ys and ys[0] is not None else None)


def _norm(v, c, preset):
    p = PRESETS[preset]
    return (v / 255.0 - p.mean[c]) / p.std[c]


# --------------------------------------------------------------------------------------------- image folders


def test_import_does_not_pull_pillow_or_torch():
    code = ("import sys, onnxcompress, onnxcompress.data, onnxcompress.data.readers, onnxcompress.zoo; "
            "bad = [m for m in ('PIL', 'torch', 'torchvision') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_flat_folder_with_labels_file_png_and_jpeg(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _solid(d / "b.png", (32, 32), (255, 0, 128))
    _solid(d / "a.jpg", (32, 32), (10, 200, 30))
    _rand_image(d / "c.png", (40, 36), 1)
    (d / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 3\nb.png 7\nc.png 1\n")
    ds = open_dataset(d, input_shape=(1, 3, 32, 32), labels=labels)
    assert isinstance(ds, Dataset)
    assert ds.kind == "images" and ds.has_labels and len(ds) == 3
    assert [f.name for f in ds.files] == ["a.jpg", "b.png", "c.png"]
    x, y = _all(ds, bs=2)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    assert y.tolist() == [3, 7, 1] and y.dtype == np.int64
    # 3x32x32 input -> the cifar10 preset; a solid PNG keeps its exact pixel values
    for c, v in enumerate((255, 0, 128)):
        np.testing.assert_allclose(x[1, c], _norm(v, c, "cifar10"), rtol=0, atol=1e-5)
    for c, v in enumerate((10, 200, 30)):  # JPEG is lossy: a few levels
        assert abs(float(x[0, c].mean()) - _norm(v, c, "cifar10")) < 4 / 255 / PRESETS["cifar10"].std[c]


@pytest.mark.parametrize("content", ["filename,label\na.png,2\nb.png,0\n", "a.png,2\nb.png,0\n", "2\n0\n"])
def test_labels_file_formats(tmp_path, content):
    d = tmp_path / "imgs"
    d.mkdir()
    _solid(d / "a.png", (8, 8), 0, "L")
    _solid(d / "b.png", (8, 8), 255, "L")
    lab = tmp_path / "labels.csv"
    lab.write_text(content)
    ds = open_dataset(d, preprocess="digits", labels=lab)
    assert _all(ds)[1].tolist() == [2, 0]


def test_class_subfolders_give_sorted_labels(tmp_path):
    root = tmp_path / "val"
    for cls, n in (("n02_dog", 2), ("n01_cat", 3), ("n03_eel", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _rand_image(root / cls / f"img{i}.JPEG", (50, 40), hash((cls, i)) % 1000)
    (root / "empty_dir").mkdir()
    ds = open_dataset(root, preprocess="imagenet")
    assert ds.classes == ["n01_cat", "n02_dog", "n03_eel"]
    assert len(ds) == 6 and ds.has_labels
    x, y = _all(ds, bs=4)
    assert x.shape == (6, 3, 224, 224)
    assert y.tolist() == [0, 0, 0, 1, 1, 2]
    assert "3 class folders" in ds.description


def test_resize_and_center_crop_match_torchvision(tmp_path):
    tv = pytest.importorskip("torchvision.transforms")
    d = tmp_path / "imgs"
    d.mkdir()
    _rand_image(d / "wide.png", (300, 200), 3)
    _rand_image(d / "tall.png", (90, 131), 4)
    ds = open_dataset(d, preprocess="imagenet")
    x, _ = _all(ds)
    p = PRESETS["imagenet"]
    ref_tf = tv.Compose([tv.Resize(256, interpolation=tv.InterpolationMode.BILINEAR), tv.CenterCrop(224),
                         tv.ToTensor(), tv.Normalize(p.mean, p.std)])
    for i, f in enumerate(ds.files):
        ref = ref_tf(Image.open(f).convert("RGB")).numpy()
        np.testing.assert_allclose(x[i], ref, atol=1e-5)


def test_known_pixel_and_size_from_input_shape(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    arr = np.zeros((16, 16), np.uint8)
    arr[3, 5] = 200
    Image.fromarray(arr, "L").save(d / "x.png")
    ds = open_dataset(d, input_shape=("batch", 1, 16, 16))  # 1x16x16 -> the digits preset, no resize
    x, y = _all(ds)
    assert y is None and not ds.has_labels
    assert x.shape == (1, 1, 16, 16)
    assert x[0, 0, 3, 5] == pytest.approx(_norm(200, 0, "digits"), abs=1e-6)
    assert x[0, 0, 0, 0] == pytest.approx(_norm(0, 0, "digits"), abs=1e-6)
    # an odd input size: the preprocessing follows it (3 channels, 40x48: CIFAR statistics, fit + crop)
    ds2 = open_dataset(d, input_shape=(1, 3, 40, 48))
    assert ds2.preprocess.size == (40, 48) and _all(ds2)[0].shape == (1, 3, 40, 48)
    assert preprocess_for_shape((3, 299, 299)).resize == 342


def test_preset_disagreeing_with_model_input(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _solid(d / "a.png", (8, 8), (1, 2, 3))
    with pytest.raises(DataError, match=r"preprocessing gives 3x224x224 images but the model input is 1x3x32x32"):
        open_dataset(d, input_shape=(1, 3, 32, 32), preprocess="imagenet")
    with pytest.raises(DataError, match="unknown preprocess preset 'imgnet'"):
        open_dataset(d, preprocess="imgnet")


def test_images_are_loaded_lazily(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        _rand_image(d / f"{i}.png", (8, 8), i)
    ds = open_dataset(d, preprocess="cifar10")
    (d / "2.png").write_bytes(b"garbage")  # opening did not decode anything
    it = ds.batches(2)
    assert next(it)[0].shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="cannot read image .*2.png"):
        next(it)


def test_limit_on_image_folder_is_a_seeded_subset(tmp_path):
    root = tmp_path / "val"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            _solid(root / cls / f"{i}.png", (4, 4), 0)
    ds = open_dataset(root, preprocess="cifar10", limit=5, seed=1)
    assert len(ds) == 5
    names = [f.relative_to(root).as_posix() for f in ds.files]
    assert names == sorted(names) and len({n.split("/")[0] for n in names}) > 1
    same = open_dataset(root, preprocess="cifar10", limit=5, seed=1)
    assert same.files == ds.files


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"^no images found in .*empty$"):
        open_dataset(empty)
    d = tmp_path / "imgs"
    d.mkdir()
    _solid(d / "a.png", (4, 4), 0)
    _solid(d / "b.png", (4, 4), 0)
    lab = tmp_path / "labels.txt"
    lab.write_text("a.png 1\n")
    with pytest.raises(DataError, match=r"labels file .*labels.txt has no entry for b.png"):
        open_dataset(d, preprocess="cifar10", labels=lab)
    lab.write_text("1\n2\n3\n")
    with pytest.raises(DataError, match="has 3 labels but .* has 2 images"):
        open_dataset(d, preprocess="cifar10", labels=lab)
    with pytest.raises(DataError, match="labels file .*nope.txt not found"):
        open_dataset(d, labels=tmp_path / "nope.txt")
    (d / "cls").mkdir()
    _solid(d / "cls" / "c.png", (4, 4), 0)
    with pytest.raises(DataError, match="mixes loose images and class sub-folders"):
        open_dataset(d)
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="single image"):
        open_dataset(d / "a.png")


def test_missing_pillow_is_a_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    d.mkdir()
    _solid(d / "a.png", (4, 4), 0)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="needs Pillow: pip install pillow"):
        open_dataset(d)


# --------------------------------------------------------------------------------------------- CIFAR-10


def _write_cifar_batch(path, n, seed, label_offset=0):
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"fake batch",
        b"labels": [(i + label_offset) % 10 for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    return d


@pytest.fixture()
def cifar_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    b1 = _write_cifar_batch(root / "data_batch_1", 12, 1)
    b2 = _write_cifar_batch(root / "data_batch_2", 9, 2, label_offset=3)
    t = _write_cifar_batch(root / "test_batch", 10, 3, label_offset=5)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane"] * 10}, fh, protocol=2)
    return root, b1, b2, t


def test_cifar_folder_uses_test_batch(cifar_dir):
    root, _, _, t = cifar_dir
    ds = open_dataset(root, input_shape=(1, 3, 32, 32))
    assert ds.kind == "cifar10" and ds.has_labels and len(ds) == 10
    assert "test set" in ds.description
    x, y = _all(ds, bs=3)
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    assert y.tolist() == t[b"labels"]
    raw = t[b"data"].reshape(-1, 3, 32, 32)  # row-major: 1024 R, 1024 G, 1024 B
    for c in range(3):
        assert x[4, c, 7, 9] == pytest.approx(_norm(float(raw[4, c, 7, 9]), c, "cifar10"), abs=1e-5)


def test_cifar_train_split_crosses_files(cifar_dir):
    root, b1, b2, _ = cifar_dir
    ds = open_dataset(root, split="train")
    assert len(ds) == 21
    x, y = _all(ds, bs=5)
    assert y.tolist() == b1[b"labels"] + b2[b"labels"]
    assert x.shape == (21, 3, 32, 32)
    lim = open_dataset(root, split="train", limit=7)
    assert len(lim) == 7 and len(lim.files) == 1  # the second file is never read
    assert _all(lim, bs=3)[1].tolist() == b1[b"labels"][:7]


def test_cifar_single_batch_file_resized_for_a_bigger_model(cifar_dir):
    root, b1, _, _ = cifar_dir
    ds = open_dataset(root / "data_batch_1", input_shape=(1, 3, 64, 64), limit=2)
    x, y = _all(ds)
    assert x.shape == (2, 3, 64, 64) and y.tolist() == b1[b"labels"][:2]


def test_cifar_bad_file(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch file"):
        open_dataset(root)


# --------------------------------------------------------------------------------------------- arrays


def test_npy_is_memory_mapped_and_streamed(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(10))
    ds = open_dataset(tmp_path / "x.npy", input_shape=("N", 3, 8, 8), labels=tmp_path / "y.npy", limit=7)
    assert ds.kind == "npy" and isinstance(ds.array, np.memmap) and len(ds) == 7
    batches = list(ds.batches(3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    assert all(not isinstance(b[0], np.memmap) for b in batches)
    got, y = _all(ds, bs=3)
    np.testing.assert_array_equal(got, x[:7])
    assert y.tolist() == list(range(7))


def test_npy_float64_becomes_float32_and_no_labels(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 1, 4, 4)))
    x, y = _all(open_dataset(tmp_path / "x.npy"))
    assert x.dtype == np.float32 and y is None


def test_npy_wrong_shape_messages(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(DataError, match=r"^x.npy has shape 4x3x32x32 but the model input is 1x3x224x224$"):
        open_dataset(tmp_path / "x.npy", input_shape=(1, 3, 224, 224))
    np.save(tmp_path / "h.npy", np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="looks like NHWC"):
        open_dataset(tmp_path / "h.npy", input_shape=(1, 3, 32, 32))
    np.save(tmp_path / "y.npy", np.arange(2))
    with pytest.raises(DataError, match="4 samples but labels y.npy has 2"):
        open_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy")


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_rows(tmp_path, compressed):
    x = np.random.default_rng(1).standard_normal((9, 1, 5, 5)).astype(np.float32)
    y = np.arange(9) % 4
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", x=x, y=y)
    ds = open_dataset(tmp_path / "d.npz", input_shape=(1, 1, 5, 5))
    assert ds.kind == "npz" and ds.has_labels and len(ds) == 9
    got, lab = _all(ds, bs=4)
    np.testing.assert_array_equal(got, x)
    assert lab.tolist() == y.tolist()
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:  # really compressed when asked to be
        assert (zf.getinfo("x.npy").compress_type == zipfile.ZIP_DEFLATED) == compressed


def test_npz_keys(tmp_path):
    a = np.zeros((3, 2, 4, 4), np.float32)
    np.savez(tmp_path / "by_name.npz", data_in=a + 1, other=a)
    ds = open_dataset(tmp_path / "by_name.npz", input_name="data_in")
    assert not ds.has_labels and _all(ds)[0].max() == 1
    np.savez(tmp_path / "inputs.npz", inputs=a, labels=np.array([1, 2, 3]))
    assert _all(open_dataset(tmp_path / "inputs.npz", limit=2))[1].tolist() == [1, 2]
    np.savez(tmp_path / "bad.npz", p=a, q=a)
    with pytest.raises(DataError, match="bad.npz has no inputs array"):
        open_dataset(tmp_path / "bad.npz")
    with pytest.raises(DataError, match=r"by_name.npz\[data_in\] has shape 3x2x4x4 but the model input is"):
        open_dataset(tmp_path / "by_name.npz", input_name="data_in", input_shape=(1, 3, 4, 4))


# --------------------------------------------------------------------------------------------- random


def test_random_source():
    ds = open_dataset("random", input_shape=(1, 3, 8, 8))
    assert ds.kind == "random" and len(ds) == 16 and not ds.has_labels
    assert "not real data" in ds.description
    a, _ = _all(ds, bs=5)
    b, _ = _all(open_dataset("random", input_shape=(3, 8, 8)), bs=16)
    np.testing.assert_array_equal(a, b)  # the same whatever the batch size
    assert a.dtype == np.float32 and a.shape == (16, 3, 8, 8)
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1
    c, _ = _all(open_dataset("random", input_shape=(3, 8, 8), seed=1, limit=4))
    assert c.shape == (4, 3, 8, 8) and not np.allclose(c, a[:4])
    with pytest.raises(DataError, match="random data needs a fixed input shape"):
        open_dataset("random")
    with pytest.raises(DataError, match="random data needs a fixed input shape"):
        open_dataset("random", input_shape=("N", 3, "H", 8))


def test_preprocess_validation():
    with pytest.raises(DataError):
        Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.5, 0.5), channels=1)
    assert PRESETS["imagenet"].shape == (3, 224, 224)
    assert PRESETS["digits"].shape == (1, 16, 16)


# --------------------------------------------------------------------------------------------- calibration


def _tiny_conv_model(batch="N"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 8, 8])],
        [w, b, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_model_inputs_from_proto_path_and_session(tmp_path):
    import onnx
    import onnxruntime as ort

    from onnxcompress.data.readers import model_inputs

    m = _tiny_conv_model()
    onnx.save(m, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for src in (m, tmp_path / "m.onnx", sess):
        (inp,) = model_inputs(src)
        assert inp.name == "x" and inp.shape == ("N", 3, 8, 8) and inp.dtype == np.float32
        assert inp.fixed_batch is None


def test_calibration_reader_with_quantize_static(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from onnxcompress.data.readers import CalibrationReader, inputs_for_model

    fp32 = tmp_path / "tiny.onnx"
    onnx.save(_tiny_conv_model(), fp32)
    data = np.random.default_rng(2).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    reader = CalibrationReader.from_model(fp32, tmp_path / "calib.npy")
    assert isinstance(reader, CalibrationDataReader)
    assert len(reader) == 6 and reader.batch_size == 1
    first = reader.get_next()
    assert list(first) == ["x"] and first["x"].shape == (1, 3, 8, 8)
    reader.rewind()
    assert sum(1 for _ in iter(reader.get_next, None)) == 6
    reader.rewind()

    out = tmp_path / "tiny_int8.onnx"
    quantize_static(str(fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    q = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    ref_sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    q_sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feeds, labels in inputs_for_model(ref_sess, tmp_path / "calib.npy", batch_size=4):
        assert labels is None
        ref, got = ref_sess.run(None, feeds)[0], q_sess.run(None, feeds)[0]
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()

    # ORT's strided calibration uses len() and set_range(); SmoothQuant deep-copies the reader
    reader.rewind()
    out2 = tmp_path / "tiny_int8_strided.onnx"
    quantize_static(str(fp32), str(out2), reader, extra_options={"CalibStridedMinMax": 2})
    assert out2.exists()
    clone = copy.deepcopy(reader)
    clone.set_range(0, 6)
    assert sum(1 for _ in iter(clone.get_next, None)) == 6


def test_calibration_reader_fixed_batch(tmp_path):
    from onnxcompress.data.readers import CalibrationReader, inputs_for_model

    model = _tiny_conv_model(batch=4)
    ds = open_dataset("random", input_shape=(4, 3, 8, 8), limit=10)
    reader = CalibrationReader.from_model(model, ds)
    assert reader.batch_size == 4 and len(reader) == 2
    shapes = [b["x"].shape for b in iter(reader.get_next, None)]
    assert shapes == [(4, 3, 8, 8), (4, 3, 8, 8)]  # the trailing 2 samples are dropped
    assert [f["x"].shape[0] for f, _ in inputs_for_model(model, ds)] == [4, 4]
    reader.set_range(1, 2)
    assert len(list(iter(reader.get_next, None))) == 1
    with pytest.raises(DataError, match="batch size is fixed at 4 but the data has only 3 samples"):
        CalibrationReader.from_model(model, open_dataset("random", input_shape=(3, 8, 8), limit=3))


def test_calibration_reader_casts_to_model_dtype_and_checks_inputs():
    from onnxcompress.data.readers import CalibrationReader

    ds = open_dataset("random", input_shape=(3, 8, 8), limit=2)
    r = CalibrationReader(ds, "x", input_dtypes={"x": np.float16})
    assert r.get_next()["x"].dtype == np.float16
    r2 = CalibrationReader(ds, ["a", "b"])
    with pytest.raises(DataError, match="the model has 2 inputs"):
        r2.get_next()
