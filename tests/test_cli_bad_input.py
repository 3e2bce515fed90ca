"""Bad input: one line on stderr, exit 2, no traceback, no partial output, input byte-for-byte unchanged."""
import os
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_model, sha256
from onnxcompress.cli import main


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_model(T=8, S=8, dynamic_batch=True), p)
    return p


def _no_conv_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "relu.onnx"
    onnx.save(m, p)
    return p


def _check(capsys, argv, out, inputs, expect="error"):
    hashes = {p: sha256(p) for p in inputs if os.path.isfile(p)}
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and expect in err, err
    assert "Traceback" not in err
    for p, h in hashes.items():
        assert sha256(p) == h
    if out is not None:
        assert not os.path.exists(out)
        assert not [f for f in os.listdir(os.path.dirname(out) or ".") if f.endswith(".tmp")]
    return err


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    err = _check(capsys, ["optimize", str(tmp_path / "nope.onnx"), "-o", str(out)], out, [])
    assert "no such file" in err


def test_not_onnx(tmp_path, capsys):
    p = tmp_path / "x.onnx"
    p.write_text("this is not a model\n" * 20)
    out = tmp_path / "o.onnx"
    _check(capsys, ["optimize", str(p), "-o", str(out)], out, [p], "not")


def test_truncated(model_file, tmp_path, capsys):
    data = model_file.read_bytes()
    t = tmp_path / "t.onnx"
    t.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    _check(capsys, ["optimize", str(t), "-o", str(out)], out, [t])
    _check(capsys, ["inspect", str(t)], None, [t])


def test_no_conv(tmp_path, capsys):
    p = _no_conv_model(tmp_path)
    out = tmp_path / "o.onnx"
    _check(capsys, ["optimize", str(p), "-o", str(out)], out, [p], "no Conv")


def test_output_equals_input(model_file, capsys):
    _check(capsys, ["optimize", str(model_file), "-o", str(model_file)], None, [model_file], "input model")


def test_unwritable_or_missing_output_folder(model_file, tmp_path, capsys):
    out = tmp_path / "missing" / "o.onnx"
    _check(capsys, ["optimize", str(model_file), "-o", str(out)], None, [model_file], "does not exist")
    ro = "/proc/o.onnx"  # not writable even for root
    _check(capsys, ["optimize", str(model_file), "-o", ro], None, [model_file], "not writable")


@pytest.mark.parametrize("flags,msg", [
    (["--ratio", "1"], "ratio must be > 1"),
    (["--ratio", "0.5"], "ratio must be > 1"),
    (["--ratio", "abc"], "not a number"),
    (["--method", "magic"], "invalid method"),
    (["--quantize", "int3"], "invalid quantize"),
    (["--providers", "tpu"], "invalid providers"),
    (["--calibration", "/nonexistent/dir"], ""),
    (["--input-shape", "x:1xax3"], "input-shape"),
    (["--input-shape", "nope:1x8x9x11"], "unknown input"),
    (["--frobnicate"], "unrecognized"),
])
def test_bad_flag_values(model_file, tmp_path, capsys, flags, msg):
    out = tmp_path / "o.onnx"
    _check(capsys, ["optimize", str(model_file), "-o", str(out)] + flags, out, [model_file], msg)


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "optimize", str(tmp_path / "nope.onnx"),
                        "-o", str(tmp_path / "o.onnx"), "--debug"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_console_script_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "optimize", str(tmp_path / "nope.onnx"),
                        "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_gate_failure_exits_1_but_writes(model_file, tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc = main(["optimize", str(model_file), "-o", str(out), "--method", "tucker2", "--no-skip-first", "--ratio", "8",
               "--quantize", "none", "--calibration", "random", "--min-top1-agreement", "1.01",
               "--report", str(rep), "--quiet"])
    assert rc == 2  # 1.01 is not a valid agreement: usage error
    rc = main(["optimize", str(model_file), "-o", str(out), "--method", "tucker2", "--no-skip-first", "--ratio", "8",
               "--quantize", "none", "--calibration", "random", "--eval-data", "random",
               "--min-top1-agreement", "1.0", "--report", str(rep), "--quiet"])
    import json
    data = json.loads(rep.read_text())
    assert out.exists()
    assert data["passed"] is False and rc == 1
    assert data["gates"][0]["name"] == "min_top1_agreement" and not data["gates"][0]["passed"]
