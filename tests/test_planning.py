"""Rank planning through optimize on the shipped digits model (real trained weights)."""
from pathlib import Path

import pytest

from onnxcompress import Recipe, optimize
from onnxcompress.errors import UserError

MODEL = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _run(**kw):
    kw.setdefault("quantize", "none")
    kw.setdefault("latency_guard", False)
    return optimize(MODEL, Recipe(**kw)).report.to_dict()


def _done(rep):
    return [l for l in rep["layers"] if l["skipped"] is None]


def test_later_first_meets_global_target_from_the_end():
    rep = _run(ratio=2, allocation="later-first")
    done = _done(rep)
    layers = [l for l in rep["layers"] if "1x1" not in (l["skipped"] or "") and "first conv" not in (l["skipped"] or "")
              and "too few" not in (l["skipped"] or "")]
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
        if l["name"] in by:
            assert by[l["name"]]["ranks"][0] <= l["ranks"][0] and by[l["name"]]["ranks"][1] <= l["ranks"][1]


def test_sensitivity_without_curves_is_a_clear_error():
    with pytest.raises(UserError, match="sensitivity"):
        _run(allocation="sensitivity")
