"""Comparisons and requests that must be refused with one line and exit 2: `validate` of two models whose
outputs differ (unless --force), and a provider asked for by name that cannot run here (unless
--allow-unavailable-providers)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model
from onnxcompress import Recipe, optimize
from onnxcompress.cli import main
from onnxcompress.errors import UserError
from onnxcompress.ort.session import provider_status
from onnxcompress.ir.signature import io_mismatch

CUDA_MISSING = provider_status("cuda") is not None


def _classifier(out_name="logits", classes=10, S=3, seed=0, batch="N") -> onnx.ModelProto:
    """Conv → GlobalAveragePool → Flatten → Gemm: a tiny classifier taking `input`."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, S, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((classes, 8)).astype(np.float32), "G")]
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], [out_name], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, S, 8, 8])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def pair(tmp_path):
    paths = {}
    for key, m in {"a": _classifier(), "same": _classifier(seed=1, batch=1),
                   "renamed": _classifier(out_name="output"), "classes": _classifier(classes=12)}.items():
        paths[key] = tmp_path / f"{key}.onnx"
        onnx.save(m, paths[key])
    return paths


# ------------------------------------------------------------------------------------------ validate
def test_io_mismatch_names_types_and_static_dims():
    a = _classifier()
    assert io_mismatch(a, _classifier(seed=3)) is None
    assert io_mismatch(a, _classifier(batch=1)) is None            # dynamic vs fixed batch: the same model
    assert io_mismatch(a, _classifier(out_name="output")) == \
        "the models' outputs differ: logits float32[Nx10] vs output float32[Nx10]"
    assert io_mismatch(a, _classifier(classes=12)) == \
        "the models' outputs differ: logits float32[Nx10] vs logits float32[Nx12]"
    assert "inputs differ" in io_mismatch(a, _classifier(S=4))


@pytest.mark.parametrize("other, what", [("renamed", "logits float32[Nx10] vs output float32[Nx10]"),
                                         ("classes", "logits float32[Nx10] vs logits float32[Nx12]")])
def test_validate_refuses_models_whose_outputs_differ(pair, other, what, capsys):
    rc = main(["validate", str(pair["a"]), str(pair[other]), "--data", "random", "--samples", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err == (f"onnxcompress: error: the models' outputs differ: {what}: not an optimized copy of the "
                   f"original? (--force compares them anyway)\n")


def test_validate_force_compares_renamed_outputs_and_says_so(pair, tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = main(["validate", str(pair["a"]), str(pair["renamed"]), "--data", "random", "--samples", "4",
               "--force", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["providers"][0]["samples"] == 4
    assert any(n.startswith("forced: the models' outputs differ") for n in d["notes"])
    # shapes that cannot be compared stay an error even when forced
    rc = main(["validate", str(pair["a"]), str(pair["classes"]), "--data", "random", "--samples", "4", "--force"])
    assert rc == 2 and "cannot compare them" in capsys.readouterr().err


def test_validate_accepts_a_fixed_batch_copy(pair, capsys):
    assert main(["validate", str(pair["a"]), str(pair["same"]), "--data", "random", "--samples", "2", "-q"]) == 0


# ------------------------------------------------------------------------------------------ providers
pytestmark_cuda = pytest.mark.skipif(not CUDA_MISSING, reason="a CUDA provider is available here")


@pytestmark_cuda
@pytest.mark.parametrize("command", ["bench", "validate", "optimize"])
def test_an_unavailable_provider_is_a_one_line_error(pair, tmp_path, command, capsys):
    a = str(pair["a"])
    argv = {"bench": ["bench", a, "--providers", "cpu,cuda", "--runs", "2", "--warmup", "0"],
            "validate": ["validate", a, a, "--data", "random", "--samples", "2", "--providers", "cpu,cuda"],
            "optimize": ["optimize", a, "-o", str(tmp_path / "o.onnx"), "--providers", "cuda", "--quantize",
                         "none", "--no-skip-first", "--method", "tucker2"]}[command]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("onnxcompress: error: --providers cuda: CUDAExecutionProvider is not available")
    assert err.rstrip().endswith("--allow-unavailable-providers to go on without it")
    assert not (tmp_path / "o.onnx").exists()


@pytestmark_cuda
def test_allow_unavailable_providers_goes_on_and_says_so(pair, tmp_path, capsys):
    a = str(pair["a"])
    assert main(["bench", a, "--providers", "cpu,cuda", "--runs", "2", "--warmup", "0",
                 "--allow-unavailable-providers"]) == 0
    assert "[cuda] skipped" in capsys.readouterr().out
    rep = tmp_path / "r.json"
    assert main(["optimize", a, "-o", str(tmp_path / "o.onnx"), "--providers", "cuda", "--quantize", "none",
                 "--method", "tucker2", "--no-skip-first", "--allow-unavailable-providers", "--report", str(rep),
                 "-q"]) == 0
    w = json.loads(rep.read_text())["warnings"]
    assert any(x.startswith("provider cuda is not available here") and "nothing ran on it" in x for x in w)


@pytestmark_cuda
def test_python_api_refuses_too_and_the_recipe_field_allows():
    m = conv_model(T=8, S=8)
    with pytest.raises(UserError, match="--providers cuda: CUDAExecutionProvider"):
        optimize(m, Recipe(method="tucker2", providers=["cuda"], quantize="none", skip_first=False))
    res = optimize(m, Recipe(method="tucker2", providers=["cuda"], quantize="none", skip_first=False, ratio=2,
                             allow_unavailable_providers=True))
    assert any("provider cuda is not available here" in w for w in res.report.warnings)


def test_a_provider_that_fell_back_at_run_time_is_an_error_unless_allowed():
    from onnxcompress.ort.providers import require_ran

    require_ran([])
    require_ran([("cuda", "fell back to CPUExecutionProvider")], allow=True)
    with pytest.raises(UserError, match=r"^--providers cuda: fell back to CPUExecutionProvider; "
                                        r"--allow-unavailable-providers to go on without it$"):
        require_ran([("cuda", "fell back to CPUExecutionProvider")])
