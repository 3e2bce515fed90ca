"""Rank planning through optimize on the shipped digits model (real trained weights)."""
from pathlib import Path

import pytest

from onnxcompress import Recipe, optimize
from onnxcompress.errors import UserError

MODEL = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _run(**kw):
    kw.setdefault("method", "tucker2")
    kw.setdefault("quantize", "none")
    kw.setdefault("latency_guard", False)
    kw.setdefault("rank_multiple", 1)   # planner semantics, not the CPU-friendly rank rounding
    return optimize(MODEL, Recipe(**kw)).report.to_dict()


def _done(rep):
    return [l for l in rep["layers"] if l["skipped"] is None]


def test_later_first_meets_global_target_from_the_end():
    rep = _run(ratio=2, allocation="later-first")
    done = _done(rep)
    layers = [l for l in rep["layers"] if l["method"] in ("tucker2", "svd") and
              (l["skipped"] is None or "later-first" in l["skipped"])]
    before = sum(l["params_before"] for l in layers)
    after = sum(l["params_after"] for l in layers)
    assert before / after >= 2.0
    # the last decomposable layer is rewritten, the earliest is not
    assert layers[-1]["skipped"] is None
    assert layers[0]["skipped"] == "left for the global target (later-first)"
    assert len(done) < len(layers)


def test_target_macs_uniform_keeps_fraction():
    rep = _run(target_macs=0.5)
    for l in _done(rep):
        assert l["macs_after"] <= 0.55 * l["macs_before"]
        assert l["macs_after"] >= 0.40 * l["macs_before"]


def test_vbmf_ranks_and_budget_cap():
    rep = _run(rank="vbmf:0.5")
    done = _done(rep)
    assert done, rep["layers"]
    capped = _run(rank="vbmf:0.5", ratio=4)
    by = {l["name"]: l for l in _done(capped)}
    for l in done:
        if l["name"] in by and l["method"] == "tucker2":
            assert by[l["name"]]["ranks"][0] <= l["ranks"][0] and by[l["name"]]["ranks"][1] <= l["ranks"][1]


def test_sensitivity_without_curves_is_a_clear_error(tmp_path):
    from onnxcompress.passes.registry import cost_models
    from onnxcompress.planning.planner import Planner

    # the planner alone (no pipeline to measure curves, no --sensitivity file)
    planner = Planner(Recipe(method="tucker2", allocation="sensitivity"), cost_models())
    with pytest.raises(UserError, match="--sensitivity FILE"):
        planner.plan(_free_infos())
    with pytest.raises(UserError, match="no such file"):
        _run(allocation="sensitivity", sensitivity=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"measurements": [], "layers": []}')
    with pytest.raises(UserError, match="no measurement for layer"):
        _run(allocation="sensitivity", sensitivity=str(bad))


def test_sensitivity_measured_on_the_fly_meets_the_global_target(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMPRESS_CACHE", str(tmp_path))
    rep = _run(ratio=2, allocation="sensitivity", calibration=str(MODEL.parent / "digits_calib.npz"),
               calibration_samples=16, rank_multiple=1)
    assert any("measured on the fly" in w for w in rep["warnings"])
    layers = [l for l in rep["layers"] if l["method"] == "tucker2" and
              (l["skipped"] is None or "sensitivity" in l["skipped"])]
    assert len(layers) == 6
    before = sum(l["params_before"] for l in layers)
    after = sum(l["params_after"] for l in layers)
    assert before / after >= 1.99     # the target holds on weights; biases (identical) make it 1.99x
    assert any(l["skipped"] == "kept by the sensitivity allocation" for l in layers)


def _free_infos():
    from onnxcompress.ir.layers import collect_layers
    from onnxcompress.ir.modelio import load_model
    from onnxcompress.ir.shapes import input_shapes
    from onnxcompress.passes.fold_bn import FoldBatchNorm

    m = FoldBatchNorm().run(load_model(MODEL)).model
    return collect_layers(m, input_shapes(m))
