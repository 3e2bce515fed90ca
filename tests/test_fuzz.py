"""Fuzz: broken and odd models through `inspect` and `optimize`. Every case must end in exit 0/1/2 with no
unhandled exception ("internal error"), within a time bound, and leave no output file when it fails."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, sha256
from onnxcompress.cli import main

CASE_SECONDS = 60


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_case(path: Path, tmp: Path, capsys, extra=()) -> tuple[int, int]:
    """Runs inspect and optimize on one file; asserts the invariants; returns both exit codes."""
    before = sha256(path) if path.exists() else None
    out = tmp / f"{path.stem}.out.onnx"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        rc_i = main(["inspect", str(path)])
        err_i = capsys.readouterr().err
        rc_o = main(["optimize", str(path), "-o", str(out), "--quiet", "--calibration", "random",
                     "--calibration-samples", "2", "--eval-samples", "2", "--no-latency-guard", *extra])
        err_o = capsys.readouterr().err
    except _Timeout:
        pytest.fail(f"{path.name}: no answer within {CASE_SECONDS}s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    for rc, err in ((rc_i, err_i), (rc_o, err_o)):
        assert rc in (0, 1, 2), (path.name, rc, err)
        assert "internal error" not in err and "Traceback" not in err, (path.name, err)
        if rc == 2:
            assert len(err.strip().splitlines()) == 1, (path.name, err)
    if rc_o == 2:
        assert not out.exists(), path.name
    if before is not None:
        assert sha256(path) == before
    assert not [f for f in os.listdir(tmp) if f.endswith(".tmp")]
    return rc_i, rc_o


def _save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def _with_weight(m: onnx.ModelProto, fn) -> onnx.ModelProto:
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for i, t in enumerate(m2.graph.initializer):
        if t.name == "W":
            m2.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), "W"))
    return m2


def corpus(tmp: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    base = conv_model(T=16, S=8, hw=(10, 10), batch=1)
    base_bytes = base.SerializeToString()
    files = []
    # truncated files
    for frac in (0.0, 0.1, 0.5, 0.9, 0.99):
        p = tmp / f"trunc_{frac}.onnx"
        p.write_bytes(base_bytes[: int(len(base_bytes) * frac)])
        files.append(p)
    # random bytes
    for i in range(4):
        p = tmp / f"random_{i}.onnx"
        p.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
        files.append(p)
    # flipped bytes in a valid model
    for i in range(12):
        b = bytearray(base_bytes)
        for j in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
            b[j] = int(rng.integers(0, 256))
        p = tmp / f"flip_{i}.onnx"
        p.write_bytes(bytes(b))
        files.append(p)
    # dangling input: Conv reads a tensor nobody produces
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.node[0].input[0] = "ghost"
    files.append(_save(m, tmp / "dangling.onnx"))
    # wrong dtypes: int32 weight, float64 model input
    files.append(_save(_with_weight(base, lambda w: w.astype(np.int32)), tmp / "int_weight.onnx"))
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    files.append(_save(m, tmp / "double_input.onnx"))
    # zero-sized kernel
    files.append(_save(_with_weight(base, lambda w: np.zeros((16, 8, 0, 3), np.float32)), tmp / "zero_kernel.onnx"))
    # NaN / Inf weights
    files.append(_save(_with_weight(base, lambda w: np.where(w > 1, np.nan, w).astype(np.float32)), tmp / "nan.onnx"))
    files.append(_save(_with_weight(base, lambda w: np.where(w > 1, np.inf, w).astype(np.float32)), tmp / "inf.onnx"))
    # a weight whose shape disagrees with the input channels
    files.append(_save(_with_weight(base, lambda w: w[:, :5]), tmp / "bad_channels.onnx"))
    # empty graph, graph without outputs
    files.append(_save(helper.make_model(helper.make_graph([], "g", [], [])), tmp / "empty.onnx"))
    # dynamic spatial dims without --input-shape
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    files.append(_save(m, tmp / "dynamic_hw.onnx"))
    # an unknown op domain
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.node.append(helper.make_node("Frob", ["y"], ["z"], domain="com.nowhere"))
    files.append(_save(m, tmp / "custom_op.onnx"))
    return files


def test_fuzz_corpus(tmp_path, capsys):
    files = corpus(tmp_path)
    results = {f.name: run_case(f, tmp_path, capsys) for f in files}
    assert len(results) >= 30
    # the valid-but-odd ones that must be refused
    for name in ("trunc_0.0.onnx", "trunc_0.5.onnx", "empty.onnx", "dynamic_hw.onnx"):
        assert results[name][1] == 2, name


@st.composite
def conv_graphs(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    S = draw(st.integers(1, 10))
    group = draw(st.sampled_from([1, 1, 1, 2]))
    S = S * group
    T = draw(st.integers(1, 12)) * group
    k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    hw = tuple(draw(st.integers(max(k), 12)) for _ in range(nd))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    auto = draw(st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * nd))
    bias = draw(st.booleans())
    opset = draw(st.sampled_from([11, 13, 17, 21]))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        dil = (1,) * nd  # ORT refuses dilation with SAME_* auto_pad
    hw = tuple(max(h, (kk - 1) * d + 1) for h, kk, d in zip(hw, k, dil))
    # the default (auto: a measured search, seconds per graph) in a third of the cases, each explicit method else
    method = draw(st.sampled_from(["auto", "auto", "tucker2", "cp4", "cp3", "svd"]))
    return dict(T=T, S=S, kernel=k, hw=hw, strides=strides, dilations=dil, auto_pad=auto,
                pads=None if auto else pads, bias=bias, group=group, batch=1, opset=opset), method


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(spec=conv_graphs())
def test_fuzz_random_conv_graphs(spec, tmp_path_factory, capsys):
    spec, method = spec
    tmp = tmp_path_factory.mktemp("hyp")
    try:
        m = conv_model(**spec)
    except Exception:
        return  # the generator made an invalid graph (checker refused); nothing to test
    p = _save(m, tmp / "m.onnx")
    rc_i, rc_o = run_case(p, tmp, capsys, extra=("--no-skip-first", "--ratio", "1.5", "--method", method))
    assert rc_i == 0 and rc_o == 0, (spec, method)
