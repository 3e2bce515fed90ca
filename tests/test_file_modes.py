"""Every file onnxcompress writes gets the mode any file the user writes gets: 0666 less the umask (the temp
file's mode survives the rename, so it must not be mkstemp's 0600)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
import pytest

from conftest import conv_model
from onnxcompress.cli import main
from onnxcompress.ir.modelio import create_temp, save_model_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    m = conv_model()
    assert _mode(save_model_atomic(m, tmp_path / "a.onnx")) == want
    save_model_atomic(m, tmp_path / "b.onnx", external=True)
    assert _mode(tmp_path / "b.onnx") == want and _mode(tmp_path / "b.onnx.data") == want
    assert _mode(write_text_atomic("{}\n", tmp_path / "r.json")) == want
    fd, p = create_temp(tmp_path, "x")
    os.close(fd)
    assert _mode(p) == want and Path(p).name.startswith(".x.") and p.endswith(".tmp")


def test_optimize_outputs_follow_the_umask(tmp_path, umask, capsys):
    """Model, its external data, the report and the plots of one `optimize` run."""
    want = 0o666 & ~umask
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(conv_model(T=16, S=16, batch=1), src, save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    args = ["optimize", str(src), "-o", str(out / "m.opt.onnx"), "--method", "tucker2", "--ratio", "2",
            "--quantize", "none", "--no-latency-guard", "--no-skip-first", "--report", str(out / "report.json"), "-q"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plots", str(out / "plots")]
    except ImportError:
        pass
    assert main(args) == 0, capsys.readouterr().err
    files = _files(out)
    names = {p.name for p in files}
    assert {"m.opt.onnx", "m.opt.onnx.data", "report.json"} <= names
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(want) for p in files}


def test_validate_bench_and_analyze_outputs_follow_the_umask(tmp_path, umask, capsys):
    want = 0o666 & ~umask
    m = tmp_path / "m.onnx"
    onnx.save_model(conv_model(T=8, S=6, batch=1), m)
    assert main(["validate", str(m), str(m), "--data", "random", "--samples", "2",
                 "--json", str(tmp_path / "v.json"), "-q"]) == 0, capsys.readouterr().err
    assert main(["bench", str(m), "--runs", "2", "--warmup", "0", "--json", str(tmp_path / "b.json"), "-q"]) == 0
    assert _mode(tmp_path / "v.json") == want and _mode(tmp_path / "b.json") == want
    if umask != 0o022:      # analyze is slower: one umask is enough to show its outputs follow it too
        return
    assert main(["analyze", str(DIGITS), "--data", str(CALIB), "--grid", "4", "--samples", "8", "--out",
                 str(tmp_path / "an"), "--layers", "/stage3/conv2/Conv", "--no-global", "-q"]) == 0
    outs = [p for p in _files(tmp_path / "an") if "cache" not in p.parts]
    assert any(p.name == "analyze.json" for p in outs)
    assert {p.name: oct(_mode(p)) for p in outs} == {p.name: oct(want) for p in outs}


def test_zoo_export_follows_the_umask(tmp_path, umask):
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from onnxcompress import zoo

    p = zoo.export("resnet18", tmp_path / "r18.onnx", dataset="cifar10", weights="none", verify=False)
    assert _mode(p) == 0o666 & ~umask
