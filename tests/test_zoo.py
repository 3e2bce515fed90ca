"""onnxcompress.zoo: clean ONNX exports of torchvision CNNs (needs torch; skipped without it)."""

from __future__ import annotations

import time
import urllib.error

import numpy as np
import pytest

from onnxcompress import zoo

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_list_models_matches_torch():
    rows = zoo.list_models()
    assert [r["name"] for r in rows] == list(zoo.MODELS)
    for r in rows:
        assert r["datasets"] == ["imagenet", "cifar10"]
        for ds in r["datasets"]:
            with torch.device("meta"):
                m = zoo.build(r["name"], ds)
            assert sum(p.numel() for p in m.parameters()) == r["params"][ds], (r["name"], ds)


def test_cached_export_resnet18_cifar10(tmp_path, monkeypatch):
    path = zoo.cached_export("resnet18", "cifar10", weights="none")
    assert path.is_file() and path.parent == zoo.cache_dir() / "zoo"
    t = time.perf_counter()
    assert zoo.cached_export("resnet18", "cifar10", weights="none") == path
    assert time.perf_counter() - t < 0.5  # the second call reuses the file
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = _ops(path)
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert "Conv" in ops and "Gemm" in ops
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    assert n_conv == 20  # 3x3 stem (CIFAR), 16 block convs, 3 downsample 1x1 convs
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    k = next(a for a in stem.attribute if a.name == "kernel_shape")
    assert list(k.ints) == [3, 3]
    assert "MaxPool" not in ops
    # ONNX Runtime vs the (unfused) torch model with the same seeded random weights
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = zoo.load_model("resnet18", "cifar10", "none")(torch.from_numpy(x)).numpy()
    got = _run(path, x)
    assert got.shape == (1, 10) and _rel(got, ref) <= 1e-4


def test_path_weights_with_real_batchnorm_statistics(tmp_path):
    """A checkpoint dict with DataParallel prefixes and non-trivial BN statistics: folded exactly."""
    torch.manual_seed(1)
    src = zoo.build("resnet18", "cifar10")
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    out = tmp_path / "out" / "r18.onnx"
    assert zoo.fold_batchnorm(zoo.build("resnet18", "cifar10")) == 20
    zoo.export("resnet18", out, dataset="cifar10", weights=ckpt, dynamic_batch=True)  # verify=True inside
    assert sorted(p.name for p in out.parent.iterdir()) == ["r18.onnx"]  # no temp files left
    assert "BatchNormalization" not in _ops(out)
    x = np.random.default_rng(6).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = src.eval()(torch.from_numpy(x)).numpy()
    assert _rel(_run(out, x), ref) <= 1e-4  # a batch of 3 through the dynamic batch dim

    # weights for another architecture: a one-line error, and the existing output is left untouched
    before = out.read_bytes()
    with pytest.raises(zoo.ZooError, match=r"^weights .*ckpt.pth do not fit this model: .*missing key"):
        zoo.export("resnet34", out, dataset="cifar10", weights=ckpt)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["r18.onnx"]
    with pytest.raises(zoo.ZooError, match="weights file .*nope.pth not found"):
        zoo.export("resnet18", out, dataset="cifar10", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(zoo.ZooError, match="cannot load weights from"):
        zoo.export("resnet18", out, dataset="cifar10", weights=tmp_path / "junk.pth")


def test_default_weights_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # empty cache

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    msg = "cannot download ImageNet weights for resnet18 (no network?): pass --weights PATH or --weights none"
    t = time.perf_counter()
    with pytest.raises(zoo.ZooError) as e:
        zoo.export("resnet18", tmp_path / "r.onnx", weights="default")
    assert str(e.value) == msg
    assert time.perf_counter() - t < 10 and not (tmp_path / "r.onnx").exists()

    def must_not_be_called(*a, **k):  # pragma: no cover
        raise AssertionError("tried to download with ONNXCOMPRESS_OFFLINE=1")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", must_not_be_called)
    monkeypatch.setenv("ONNXCOMPRESS_OFFLINE", "1")
    with pytest.raises(zoo.ZooError, match=r"^cannot download ImageNet weights for googlenet \(no network\?\)"):
        zoo.export("googlenet", tmp_path / "g.onnx", weights="default")
    with pytest.raises(zoo.ZooError, match="torchvision has no cifar10 weights for alexnet"):
        zoo.export("alexnet", tmp_path / "a.onnx", dataset="cifar10", weights="default")


def test_default_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """Offline with the checkpoint already in torch's hub cache: it is used, nothing is downloaded."""
    tv = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("ONNXCOMPRESS_OFFLINE", "1")
    url = tv.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    sd = tv.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = zoo.load_model("resnet18", "imagenet", "default")
    assert torch.equal(model.state_dict()["fc.weight"], sd["fc.weight"])


def test_bad_names():
    with pytest.raises(zoo.ZooError, match="unknown model 'vgg16'"):
        zoo.export("vgg16", "x.onnx", weights="none")
    with pytest.raises(zoo.ZooError, match="unknown dataset 'mnist'"):
        zoo.export("resnet18", "x.onnx", dataset="mnist", weights="none")


@pytest.mark.parametrize("dataset", ["imagenet", "cifar10"])
def test_export_all_models(tmp_path, dataset):
    # ~35 s per dataset on a shared 2-core CPU: every reference architecture exports and matches torch
    timings = {}
    for name in zoo.MODELS:
        out = tmp_path / f"{name}.onnx"
        t = time.perf_counter()
        zoo.export(name, out, dataset=dataset, weights="none")  # verify=True: ORT vs torch
        timings[name] = time.perf_counter() - t
        ops = _ops(out)
        assert not ops & {"BatchNormalization", "Identity"}, (name, ops)
        onnx.checker.check_model(str(out))
        out.unlink()
    print(f"{dataset} export seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
