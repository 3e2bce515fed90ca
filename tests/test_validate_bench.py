"""validate and bench: JSON fields, a model against itself, labels, CUDA skipped with a reason, CLI."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model
from onnxcompress.ort.timing import bench, model_feeds, ort_kernels, time_interleaved
from onnxcompress.cli import main
from onnxcompress.ort.session import provider_status
from onnxcompress.validate import CUDA_INT8_NOTE, validate

CUDA_MISSING = provider_status("cuda") is not None


def classifier(C=3, HW=8, K=10, seed=0, noise=0.0, dynamic_batch=True) -> onnx.ModelProto:
    """Conv 3x3 → Relu → GlobalAveragePool → Flatten → Gemm: (N, K) logits. `noise` perturbs the weights."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((16, C, 3, 3)).astype(np.float32)
    F = rng.standard_normal((K, 16)).astype(np.float32)
    if noise:
        r2 = np.random.default_rng(seed + 1)
        W = W + noise * r2.standard_normal(W.shape).astype(np.float32)
        F = F + noise * r2.standard_normal(F.shape).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "F"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N" if dynamic_batch else 1, C, HW, HW])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N" if dynamic_batch else 1, K])
    g = helper.make_graph(nodes, "cls", [x], [y], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(F, "F")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _logits(m, x):
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.fixture()
def files(tmp_path):
    a, b = classifier(), classifier(noise=0.3)
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(a, pa)
    onnx.save(b, pb)
    x = np.random.default_rng(3).standard_normal((40, 3, 8, 8)).astype(np.float32)
    y = _logits(a, x).argmax(1)
    y[::4] = (y[::4] + 1) % 10            # the original gets 75% right
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x, y=y)
    return pa, pb, npz, x, y


# ------------------------------------------------------------------------------------------ validate
def test_validate_self_is_identical(files):
    pa, _, npz, _, _ = files
    rep = validate(pa, pa, npz, ["cpu"])
    p = rep.provider("cpu")
    assert p.samples == 40 and p.top1_agreement == 1.0 and p.top5_agreement == 1.0
    assert p.max_abs_diff == 0.0 and p.sqnr_db >= 100 and p.cosine == pytest.approx(1.0)


def test_validate_labels_accuracy_and_json_fields(files):
    pa, pb, npz, x, y = files
    rep = validate(pa, pb, npz, ["cpu"])
    p = rep.provider("cpu")
    la, lb = _logits(onnx.load(pa), x), _logits(onnx.load(pb), x)
    assert rep.labelled
    assert p.accuracy_before == pytest.approx(np.mean(la.argmax(1) == y)) == pytest.approx(0.75)
    assert p.accuracy_after == pytest.approx(np.mean(lb.argmax(1) == y))
    assert p.accuracy_drop == pytest.approx(p.accuracy_before - p.accuracy_after)
    assert p.top1_agreement == pytest.approx(np.mean(la.argmax(1) == lb.argmax(1)))
    d = rep.to_dict()
    json.dumps(d)
    for k in ("top1_agreement", "top5_agreement", "sqnr_db", "cosine", "max_abs_diff", "accuracy_before",
              "accuracy_after", "accuracy_drop", "samples", "skipped"):
        assert k in d["providers"][0]


@pytest.mark.skipif(not CUDA_MISSING, reason="a CUDA provider is available here")
def test_validate_cuda_skipped_with_reason(files):
    pa, pb, npz, _, _ = files
    rep = validate(pa, pb, npz, ["cpu", "cuda"])
    cuda = rep.provider("cuda")
    assert cuda is not None and cuda.skipped and "CUDAExecutionProvider" in cuda.skipped
    assert cuda.top1_agreement is None
    assert rep.provider("cpu").top1_agreement is not None
    assert "skipped" in rep.table()


def test_validate_image_class_folders(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    m = classifier(HW=8)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    rng = np.random.default_rng(0)
    for cls in ("a_class", "b_class"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    rep = validate(p, p, tmp_path / "imgs", ["cpu"])
    pv = rep.provider("cpu")
    assert rep.labelled and pv.samples == 6 and pv.accuracy_before is not None and pv.accuracy_drop == 0


def test_validate_cli_json_and_cuda_note(files, tmp_path, capsys):
    pa, pb, npz, _, _ = files
    out = tmp_path / "v.json"
    rc = main(["validate", str(pa), str(pb), "--data", str(npz), "--providers", "cpu,cuda", "--json", str(out),
               "--samples", "16", "--allow-unavailable-providers"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert [p["provider"] for p in d["providers"]] == ["cpu", "cuda"]
    assert d["providers"][0]["samples"] == 16
    if CUDA_MISSING:
        assert d["providers"][1]["skipped"]
    assert "top-1" in capsys.readouterr().out


def test_cuda_int8_note_mentions_simulated_quantization():
    assert "simulated quantization" in CUDA_INT8_NOTE and "not a speed claim" in CUDA_INT8_NOTE


def test_validate_cli_bad_provider_is_usage_error(files, capsys):
    pa, pb, npz, _, _ = files
    rc = main(["validate", str(pa), str(pb), "--data", str(npz), "--providers", "tpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown provider" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ bench
def test_time_interleaved_rotates_and_counts():
    calls = []
    ticks = iter(range(1000))
    runners = [lambda i=i: calls.append(i) for i in range(3)]
    t = time_interleaved(runners, warmup=1, runs=3, clock=lambda: next(ticks))
    assert calls[:3] == [0, 1, 2]                       # warm-up
    assert calls[3:] == [0, 1, 2, 1, 2, 0, 2, 0, 1]     # round-robin, start rotates
    assert [len(x) for x in t] == [3, 3, 3] and all(v == 1 for x in t for v in x)


def test_bench_model_vs_itself_ratio_near_one(tmp_path):
    m = conv_model(T=16, S=16, hw=(16, 16), batch=1)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    rep = bench([p, p], ["cpu"], threads=1, warmup=3, runs=15)
    ms = rep.provider("cpu").models
    assert [x.name for x in ms] == ["m.onnx", "m.onnx#2"]
    assert ms[0].speedup == 1.0
    assert 0.3 < ms[1].speedup < 3.0                     # loose: a shared, noisy machine
    for x in ms:
        assert x.runs == 15 and 0 < x.min_ms <= x.median_ms <= x.p90_ms
    d = rep.to_dict()
    json.dumps(d)
    assert {"threads", "warmup", "runs", "providers", "input_shapes", "method"} <= set(d)


def test_bench_dynamic_batch_uses_batch_1_and_input_shape_override():
    m = conv_model(T=8, S=8, hw=(8, 8), dynamic_batch=True)
    feeds, shp = model_feeds(m)
    assert feeds["x"].shape == (1, 8, 8, 8)
    rep = bench([m], ["cpu"], warmup=1, runs=2, input_shape={"x": [2, 8, 8, 8]})
    assert rep.input_shapes == {"x": [2, 8, 8, 8]}
    assert rep.providers[0].models[0].median_ms > 0


@pytest.mark.skipif(not CUDA_MISSING, reason="a CUDA provider is available here")
def test_bench_cuda_skipped_with_reason_not_error(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(conv_model(T=8, S=8, hw=(8, 8), batch=1), p)
    out = tmp_path / "b.json"
    rc = main(["bench", str(p), "--providers", "cpu,cuda", "--threads", "1", "--warmup", "1", "--runs", "3",
               "--json", str(out), "--allow-unavailable-providers"])
    assert rc == 0
    d = json.loads(out.read_text())
    cuda = [x for x in d["providers"] if x["provider"] == "cuda"][0]
    assert cuda["skipped"] and not cuda["models"]
    assert "[cuda] skipped" in capsys.readouterr().out


def test_bench_cli_missing_model_is_usage_error(tmp_path, capsys):
    rc = main(["bench", str(tmp_path / "nope.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file" in err


def test_ort_kernels_counts_integer_convs():
    from onnxcompress.planning.latency_guard import ConvSpec, layer_model

    one = (1, 1)
    spec = ConvSpec(16, 16, (3, 3), one, (1, 1, 1, 1), one, 1, True)
    k8 = ort_kernels(layer_model((1, 16, 8, 8), [spec], "int8"))
    k32 = ort_kernels(layer_model((1, 16, 8, 8), [spec], "fp32"))
    assert k8["conv_int"] == 1 and k8["conv_float"] == 0
    assert k32["conv_int"] == 0 and k32["conv_float"] == 1
