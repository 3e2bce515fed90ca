"""`--method auto`: the budget, the knapsack, the search's never-worse rule, and whole runs on the shipped
digits CNN (real trained weights, labelled held-out data)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Recipe, optimize
from onnxcompress.auto.budget import Budget, budget_for, degenerate_outputs
from onnxcompress.auto.candidates import Option
from onnxcompress.auto.search import Search, solve
from onnxcompress.ort.fidelity import Fidelity

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = str(ROOT / "models" / "digits_test.npz")


# ------------------------------------------------------------------------------------------ budget
def test_budget_kind_follows_the_data_and_the_outputs():
    r = Recipe()
    assert budget_for(r, labelled=True, classifier=True) == Budget("accuracy", 1.0)
    assert budget_for(r, labelled=False, classifier=True) == Budget("agreement", 0.99)
    assert budget_for(r, labelled=False, classifier=False) == Budget("sqnr", 30.0)
    assert budget_for(Recipe(max_accuracy_drop=0.5), True, True) == Budget("accuracy", 0.5)
    assert budget_for(Recipe(min_sqnr=25), False, True) == Budget("sqnr", 25.0)        # what the user asked for
    b = Budget("accuracy", 1.0)
    assert b.met(Fidelity(accuracy_drop=0.009)) and not b.met(Fidelity(accuracy_drop=0.011))
    assert not b.met(Fidelity())                                       # unmeasured never passes
    assert Budget("sqnr", 30).met(Fidelity(sqnr_db=30.5)) and not Budget("sqnr", 30).met(Fidelity(sqnr_db=29))


def test_degenerate_outputs_are_named():
    assert degenerate_outputs(1.0, 1e-9, 1e-9) is not None
    assert "NaN" in degenerate_outputs(1.0, float("nan"), 1.0)
    assert degenerate_outputs(1.0, 0.9, 3.0) is None


# ------------------------------------------------------------------------------------------ knapsack
def _opts(name, rows):
    """rows: (method, precision, saved_ms, noise)."""
    return [Option(name, m, (8,) if m else None, p, seconds=1.0, saved_s=s / 1e3, noise=n) for m, p, s, n in rows]


def test_solve_takes_the_most_value_within_the_noise_budget():
    options = {"a": _opts("a", [(None, "float", 0, 0.0), (None, "int8", 2, 0.01), ("tucker2", "int8", 3, 0.05)]),
               "b": _opts("b", [(None, "float", 0, 0.0), (None, "int8", 2, 0.02), ("tucker2", "int8", 4, 0.04)])}
    pick = lambda tau: {n: (o.method, o.precision) for n, o in solve(options, tau, "latency", "float").items()}
    assert pick(0.0) == {"a": (None, "float"), "b": (None, "float")}
    assert pick(0.03) == {"a": (None, "int8"), "b": (None, "int8")}
    assert pick(0.06) == {"a": (None, "int8"), "b": ("tucker2", "int8")}
    assert pick(1.0) == {"a": ("tucker2", "int8"), "b": ("tucker2", "int8")}


# ------------------------------------------------------------------------------------------ never worse
class _Fake:
    """build/measure stand-ins: a selection's fidelity = 1 - (summed noise) x `harm`; latency from savings."""

    def __init__(self, harm=1.0, slower=False):
        self.harm, self.slower, self.built = harm, slower, 0

    def build(self, sel):
        self.built += 1
        return sel, None

    def measure(self, sel):
        noise = sum(o.noise or 0 for o in sel.values())
        saved = sum(o.saved_s for o in sel.values())
        fid = Fidelity(top1_agreement=max(0.0, 1 - self.harm * noise), sqnr_db=-10 * math.log10(max(noise, 1e-9)))
        lat = {"median_ms_after": 10 - 1e3 * saved, "median_ms_before": 10, "speedup": 10 / (10 - 1e3 * saved),
               "slower": self.slower}
        return fid, lat, 100


def _search(fake, objective="latency"):
    options = {"a": _opts("a", [(None, "float", 0, 0.0), (None, "int8", 2, 0.002), ("tucker2", "int8", 3, 0.02)]),
               "b": _opts("b", [(None, "float", 0, 0.0), (None, "int8", 2, 0.003), ("tucker2", "int8", 4, 0.2)])}
    return Search(options, Budget("agreement", 0.99), objective, "float", fake.build, fake.measure,
                  input_bytes=1000, int8_allowed=True)


def test_search_returns_the_fastest_candidate_that_meets_the_budget():
    s = _search(_Fake())
    best = s.run()
    assert best is not None and best.ok and best.fidelity.top1_agreement >= 0.99
    assert {n: o.method for n, o in best.selection.items()} == {"a": None, "b": None}   # tucker2 costs too much
    assert best.latency["median_ms_after"] <= min(v.latency["median_ms_after"] for v in s.verified if v.ok) * 1.03
    assert s.frontier()[0]["label"] == "int8-only" and len(s.frontier()) >= 2


def test_search_never_returns_a_slower_or_failing_model():
    assert _search(_Fake(slower=True)).run() is None           # everything slower than the input
    best = _search(_Fake(harm=100.0)).run()                     # only the untouched layers keep the budget
    assert best is not None and all(o.method is None and o.precision == "float" for o in best.selection.values())


# ------------------------------------------------------------------------------------------ whole runs
def test_auto_on_the_digits_model_meets_its_budget_on_held_out_data():
    res = optimize(MODEL, Recipe(calibration=CALIB, eval_data=TEST))
    rep = res.report
    assert rep.budget["kind"] == "accuracy" and rep.budget["limit"] == 1.0
    assert rep.fidelity["accuracy_drop"] * 100 <= 1.0
    assert rep.budget["measured"] <= 1.0 and rep.frontier and rep.frontier[0]["label"] == "int8-only"
    assert not rep.latency["slower"] and rep.model["bytes_after"] < rep.model["bytes_before"]
    assert all(l["precision"] in ("int8", "float") for l in rep.layers)
    assert not [w for w in rep.warnings if w.startswith("WARNING")]


def test_auto_without_data_quantizes_nothing_and_says_what_data_would_unlock():
    res = optimize(MODEL, Recipe())
    rep = res.report
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in res.model.graph.node)
    assert any("--calibration" in w and "INT8" in w for w in rep.warnings)
    assert rep.budget["synthetic"] and rep.budget["kind"] == "sqnr" and rep.fidelity["sqnr_db"] >= 40 - 1e-9


def test_explicit_int8_without_data_is_refused():
    from onnxcompress.errors import UserError

    with pytest.raises(UserError, match="needs calibration data"):
        optimize(MODEL, Recipe(method="none", quantize="int8"))


def _outlier_model():
    """Two 3x3 convs; channel 0 between them is 1e4 times larger than the rest and scaled back by the second
    conv: the float model is fine, per-tensor INT8 of that activation wipes the other channels out."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    w1[0] *= 1e4
    w2 = rng.standard_normal((10, 16, 3, 3)).astype(np.float32) * 0.2
    w2[:, 0] *= 1e-4
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["z"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["z"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    g = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_never_writes_a_model_int8_destroys(tmp_path):
    m = _outlier_model()
    x = np.random.default_rng(1).standard_normal((96, 8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    res = optimize(m, Recipe(calibration=str(tmp_path / "calib.npy"), calibration_samples=96, skip_first=False))
    rep = res.report
    assert rep.fidelity["top1_agreement"] >= 0.99, rep.frontier
    int8_only = rep.frontier[0]
    assert int8_only["label"] == "int8-only" and not int8_only["ok"]    # INT8 everywhere: destroyed
    assert not [w for w in rep.warnings if w.startswith("WARNING")]


def test_cli_one_line_use_writes_beside_the_input(tmp_path, capsys):
    from onnxcompress.cli import main

    src = tmp_path / "digits.onnx"
    shutil.copy(MODEL, src)
    before = src.read_bytes()
    assert main(["optimize", str(src), "--quiet"]) == 0
    out = tmp_path / "digits.opt.onnx"
    assert out.is_file() and src.read_bytes() == before
    onnx.checker.check_model(onnx.load(out))
    assert main(["optimize", str(src), "-o", str(src)]) == 2
    assert "input model" in capsys.readouterr().err
