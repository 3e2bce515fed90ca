"""--min-speedup gate (exit 1, model and report still written, marked failing), latency in the report,
plots as PNG files."""
import json

import onnx
import pytest

from conftest import conv_model
from onnxcompress import Recipe, optimize
from onnxcompress.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_model(T=16, S=16, hw=(12, 12), batch=1), p)
    return p


def test_min_speedup_gate_fails_exit_1_outputs_written(model_file, tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc = main(["optimize", str(model_file), "-o", str(out), "--method", "tucker2", "--quantize", "none", "--no-skip-first",
               "--no-latency-guard", "--rank-multiple", "1", "--min-speedup", "1000", "--report", str(rep),
               "--quiet"])
    assert rc == 1
    assert "min_speedup" in capsys.readouterr().err
    onnx.checker.check_model(onnx.load(out))
    d = json.loads(rep.read_text())
    assert d["passed"] is False
    gate = [g for g in d["gates"] if g["name"] == "min_speedup"][0]
    assert gate["passed"] is False and gate["threshold"] == 1000 and gate["value"] > 0
    lat = d["latency"]
    assert lat["provider"] == "cpu" and lat["speedup"] == gate["value"]
    assert [s["name"] for s in lat["stages"]] == ["input", "Tucker2"]
    assert all(s["median_ms"] > 0 for s in lat["stages"])


def test_min_speedup_gate_passes_low_threshold(model_file):
    res = optimize(str(model_file), Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False,
                                           min_speedup=0.01))
    assert res.passed and res.report.gates[-1].name == "min_speedup" and res.report.gates[-1].passed


def test_min_speedup_on_missing_provider_fails_with_warning(model_file):
    from onnxcompress.ort.session import provider_status
    if provider_status("cuda") is None:
        pytest.skip("CUDA available here")
    res = optimize(str(model_file), Recipe(method="none", quantize="none", providers=["cuda"], min_speedup=1.0,
                                           allow_unavailable_providers=True))
    assert not res.passed
    assert res.report.latency.get("skipped")
    assert any("min-speedup" in w for w in res.report.warnings)


def test_optimize_plots_written(model_file, tmp_path):
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "o.onnx", tmp_path / "plots"
    rc = main(["optimize", str(model_file), "-o", str(out), "--method", "tucker2", "--quantize", "none", "--no-skip-first",
               "--no-latency-guard", "--min-speedup", "0.01", "--plots", str(plots), "--quiet"])
    assert rc == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["latency_stages.png", "layers_macs.png", "layers_params.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == PNG


def test_validate_and_bench_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from onnxcompress.ort.timing import bench
    from onnxcompress.report.plots import agreement_vs_compression, bench_plot, validate_plots
    from onnxcompress.validate import validate

    m = conv_model(T=8, S=8, hw=(8, 8), batch=1)
    rep = bench([m, m], ["cpu"], warmup=1, runs=2)
    p = bench_plot(rep, tmp_path / "b" / "bench.png")
    assert p.read_bytes()[:8] == PNG
    v = validate(m, m, "random", ["cpu"], samples=4)
    [p] = validate_plots(v, tmp_path / "v", compression=2.0)
    assert p.name == "agreement_vs_compression.png" and p.read_bytes()[:8] == PNG
    p = agreement_vs_compression([{"compression": 1.5, "top1_agreement": 0.99, "label": "1.5x"},
                                  {"compression": 3.0, "top1_agreement": 0.9, "top5_agreement": 0.98}],
                                 tmp_path / "a.png")
    assert p.read_bytes()[:8] == PNG


def test_plots_without_matplotlib_is_one_line_error(model_file, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    out = tmp_path / "o.onnx"
    rc = main(["optimize", str(model_file), "-o", str(out), "--quantize", "none", "--plots", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "matplotlib" in err and len(err.splitlines()) == 1
    assert not out.exists()                   # checked before any work
