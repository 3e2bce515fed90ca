"""The command-line contract (the flags other tools rely on), --help, the README, and the rough edges of
issue 15 (inspect agreeing with optimize, error wording, tables, Result.save)."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Recipe, optimize
from onnxcompress.cli import build_parser, main
from onnxcompress.cli.optimize import OPTIONS

ROOT = Path(__file__).resolve().parent.parent

# the flags of the project's CLI contract (shared/CLI.md), with a value where they take one
CONTRACT = {
    "optimize": ["-o x.onnx", "--method auto", "--quantize auto", "--objective latency", "--ratio 2",
                 "--target-macs 0.5", "--rank vbmf:0.5", "--rank-multiple 8", "--allocation sensitivity",
                 "--data-aware", "--data-aware-method kron", "--no-refit", "--calibration random",
                 "--calibration-samples 8", "--eval-data random", "--eval-samples 8", "--labels l.txt",
                 "--input-shape x:1x3x8x8", "--max-accuracy-drop 1", "--min-top1-agreement 0.99", "--min-sqnr 30",
                 "--min-speedup 1", "--allow-worse", "--strict", "--latency-guard", "--no-latency-guard",
                 "--providers cpu", "--include a*", "--exclude b*", "--skip-first", "--no-skip-first", "--cp-epc",
                 "--no-cp-epc", "--cp-kappa-max 3", "--cp-fallback keep-float", "--int8-activations uint8",
                 "--int8-weights int8", "--recipe r.toml", "--report r.json", "--plots p", "--max-memory-mb 100",
                 "--no-verify", "--seed 1", "--jobs 2", "--executor local", "--quiet", "--debug"],
    "analyze": ["--data random", "--labels l", "--method cp4", "--grid 1.5,2", "--out o", "--jobs 2",
                "--executor ray", "--cache-dir c", "--layers a*"],
    "validate": ["--data random", "--labels l", "--providers cpu,cuda", "--json j", "--samples 4", "--plots p"],
    "bench": ["--providers cpu", "--threads 1", "--json j", "--plots p"],
}
POSITIONAL = {"optimize": ["m.onnx"], "analyze": ["m.onnx", "--data", "d", "--out", "o"],
              "validate": ["a.onnx", "b.onnx", "--data", "d"], "bench": ["a.onnx", "b.onnx"]}


@pytest.mark.parametrize("command", sorted(CONTRACT))
def test_every_contract_flag_parses(command):
    p = build_parser()
    for flag in CONTRACT[command]:
        p.parse_args([command, *POSITIONAL[command], *shlex.split(flag)])
    p.parse_args(["zoo", "export", "resnet18", "-o", "r.onnx", "--dataset", "cifar10", "--weights", "none",
                  "--opset", "17", "--dynamic-batch"])


def _optimize_help() -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser().parse_args(["optimize", "--help"])
    return buf.getvalue()


def test_every_optimize_flag_has_help_a_recipe_field_and_its_default_stated():
    import dataclasses

    fields = {f.name: f.default for f in dataclasses.fields(Recipe)}
    for group, flags, field, kind, hlp in OPTIONS:
        assert hlp.strip(), flags
        assert field is None or field in fields, (flags, field)
    text = re.sub(r"\s+", " ", _optimize_help())
    for default in ("(default: auto)", "(default: latency)", "(default: uniform)", "(default: 32)",
                    "(default: cpu)", "(default: 1000)"):
        assert default in text, default
    assert "positional arguments: model the ONNX model to compress" in text


def test_the_readme_documents_every_optimize_flag():
    readme = (ROOT / "README.md").read_text()
    missing = [f for _, flags, _, _, _ in OPTIONS for f in flags if f not in readme]
    assert not missing, missing


def test_usage_errors_carry_one_prefix(capsys):
    assert main(["optimize"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("onnxcompress") == 1 and err.startswith("onnxcompress: error: optimize:"), err


def test_python_api_errors_name_the_field_not_the_flag():
    from onnxcompress.errors import UserError

    with pytest.raises(UserError) as e:
        Recipe(ratio=0.5).validate()
    assert "ratio must be > 1" in str(e.value) and "--" not in str(e.value)


def test_tables_wrap_long_layer_names_instead_of_cutting_them():
    from onnxcompress.report.report import Report

    name = "/encoder/very/deep/module/path/with/many/parts/block_17/attention/output/dense/MatMul"
    r = Report(layers=[{"name": name, "method": "svd", "ranks": [8], "params_before": 10, "params_after": 5,
                        "skipped": None, "precision": "int8"}])
    table = r.table()
    assert "".join(line.split()[0] for line in table.splitlines()[2:4] if line.strip()).startswith(name[:60])
    assert name in "".join(line.split()[0] for line in table.splitlines()[2:6] if line.strip())


def _pointwise_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="pw1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "dw"], ["c"], name="dw", group=32, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w2"], ["d"], name="pw2"),
             helper.make_node("GlobalAveragePool", ["d"], ["e"]), helper.make_node("Flatten", ["e"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n) for n, s in
             (("w1", (32, 16, 1, 1)), ("dw", (32, 1, 3, 3)), ("w2", (64, 32, 1, 1)), ("fc", (10, 64)))]
    g = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_and_optimize_agree_on_what_each_method_can_take():
    """A MobileNet-like graph: 1x1 convs are SVD's, the depthwise conv nobody's; optimize rewrites exactly
    layers inspect calls decomposable (the old inspect said '1x1 kernel: SVD (not available yet)')."""
    from onnxcompress.inspect import inspect_model

    m = _pointwise_model()
    facts = {l["name"]: l for l in inspect_model(m)["layers"]}
    assert facts["pw1"]["decomposable"] == "svd" and facts["pw2"]["decomposable"] == "svd"
    assert facts["fc"]["decomposable"] == "svd"
    assert facts["dw"]["decomposable"] is None and "depthwise" in facts["dw"]["why_not"]
    rep = optimize(m, Recipe(method="svd", ratio=1.5, quantize="none", skip_first=False, rank_multiple=1,
                             latency_guard=False, svd_skip_last=False)).report
    done = {l["name"] for l in rep.layers if l["skipped"] is None}
    assert done and all(facts[n]["decomposable"] for n in done)


def test_result_save_writes_the_model_and_report_with_the_users_mode(tmp_path):
    res = optimize(_pointwise_model(), Recipe(method="svd", ratio=1.5, quantize="none", skip_first=False,
                                              latency_guard=False, rank_multiple=1))
    out = res.save(tmp_path / "m.onnx", report=tmp_path / "r.json")
    onnx.checker.check_model(onnx.load(out))
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask
    assert (tmp_path / "r.json").stat().st_size > 0


def test_a_gate_message_names_only_what_was_written(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_pointwise_model(), src)
    rc = main(["optimize", str(src), "--method", "svd", "--quantize", "none", "--no-skip-first",
               "--min-speedup", "1000", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "model written" in err and "report" not in err
