"""`onnxcompress analyze` on the shipped digits CNN (real trained weights and data): outputs, cache,
resume, jobs, additivity, and the sensitivity allocation built on its curves."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from onnxcompress.analysis.outputs import CSV_FIELDS
from onnxcompress.analysis.sweep import analyze
from onnxcompress.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = str(ROOT / "models" / "digits_calib.npz")
GRID = [2, 4]
SAMPLES = 16


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One full TD sweep (all 6 decomposable layers x GRID + the global curve), written to disk."""
    out = tmp_path_factory.mktemp("analyze")
    res = analyze(MODEL, CALIB, grid=GRID, samples=SAMPLES, out_dir=out, progress=False)
    return out, res


def test_outputs_have_the_promised_fields(swept):
    out, res = swept
    for f in ("analyze.json", "analyze.csv", "sensitivity_top1.png", "sensitivity_sqnr.png",
              "sensitivity_accuracy.png", "global_curve.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    data = json.loads((out / "analyze.json").read_text())
    assert data["settings"]["grid"] == [2.0, 4.0] and data["settings"]["samples"] == SAMPLES
    assert data["reference"]["accuracy"] is not None            # the npz has labels
    dec = [l["name"] for l in data["layers"] if l["decomposable"]]
    assert len(dec) == 6
    td = [r for r in data["measurements"] if r["kind"] == "td" and r["scope"] == "layer"]
    assert {(r["layer"], r["ratio"]) for r in td} == {(n, float(g)) for n in dec for g in GRID}
    for r in td:
        assert 0 <= r["top1_agreement"] <= 1 and r["sqnr_db"] > 0 and r["accuracy_after"] is not None
        assert r["params_after"] < r["params_before"] and r["r3"] >= 1 and r["r4"] >= 1
    glob = [r for r in data["measurements"] if r["scope"] == "global"]
    assert [r["ratio"] for r in glob] == [2.0, 4.0] and all(r["layers_decomposed"] == 6 for r in glob)
    # a harsher ratio never helps the whole network
    assert glob[1]["sqnr_db"] < glob[0]["sqnr_db"]
    with open(out / "analyze.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["measurements"]) == 6 * 2 + 2
    assert set(CSV_FIELDS) <= set(rows[0])


def test_additivity_fields(swept):
    _, res = swept
    add = res["additivity"]
    assert {"top1", "accuracy", "noise"} <= set(add["metrics"])
    assert [e["ratio"] for e in add["td"]] == [2.0, 4.0]
    for e in add["td"]:
        assert e["complete"] and e["layers"] == 6
        for m in ("top1", "accuracy", "noise"):
            assert set(e[m]) == {"sum_of_layers", "measured"}
        assert e["noise"]["sum_of_layers"] > 0 and e["sqnr_db"]["measured"] is not None
    s = add["summary"]["td"]["noise"]
    assert s["points"] == 2 and s["median_measured_over_predicted"] > 0


def test_rerun_is_served_from_the_cache_and_a_wider_grid_only_adds(swept):
    out, res = swept
    assert res["stats"]["evaluated"] == res["stats"]["tasks"] == 14
    again = analyze(MODEL, CALIB, grid=GRID, samples=SAMPLES, cache_dir=out / "cache", progress=False)
    assert again["stats"]["evaluated"] == 0 and again["stats"]["cached"] == 14
    assert [r["top1_agreement"] for r in again["measurements"]] == [r["top1_agreement"] for r in res["measurements"]]
    wider = analyze(MODEL, CALIB, grid=GRID + [6], samples=SAMPLES, cache_dir=out / "cache", progress=False)
    assert wider["stats"]["evaluated"] == 6 + 1          # the new ratio: 6 layers + the global point
    other = analyze(MODEL, CALIB, grid=GRID, samples=SAMPLES // 2, cache_dir=out / "cache", progress=False,
                    global_curve=False, layers=["/stage3/conv2/Conv"])
    assert other["stats"]["evaluated"] == 2               # other data: a different key


def test_interrupted_run_resumes(tmp_path):
    seen = []

    def stop_after_three(_m):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt

    kw = dict(grid=[3], samples=8, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(KeyboardInterrupt):
        analyze(MODEL, CALIB, on_result=stop_after_three, **kw)
    assert len(list((tmp_path / "c").glob("*.json"))) == 3
    res = analyze(MODEL, CALIB, **kw)
    assert res["stats"]["cached"] == 3 and res["stats"]["evaluated"] == res["stats"]["tasks"] - 3 == 4


def test_jobs2_gives_the_same_numbers_as_jobs1(tmp_path):
    kw = dict(grid=[3], samples=8, global_curve=False, progress=False,
              layers=["/stage1/conv1/Conv", "/stage2/conv2/Conv", "/stage3/conv1/Conv"])
    a = analyze(MODEL, CALIB, jobs=1, cache_dir=tmp_path / "a", **kw)
    b = analyze(MODEL, CALIB, jobs=2, cache_dir=tmp_path / "b", **kw)
    assert a["stats"]["evaluated"] == b["stats"]["evaluated"] == 3
    for x, y in zip(a["measurements"], b["measurements"]):
        assert (x["layer"], x["ratio"], x["r3"], x["r4"]) == (y["layer"], y["ratio"], y["r3"], y["r4"])
        assert x["top1_agreement"] == y["top1_agreement"]
        assert x["sqnr_db"] == pytest.approx(y["sqnr_db"], rel=1e-9)


def test_int8_rows_per_layer(tmp_path):
    res = analyze(MODEL, CALIB, grid=[3], samples=8, quantize="int8", layers=["/stage3/conv2/Conv"],
                  global_curve=False, cache_dir=tmp_path, progress=False)
    kinds = {(r["kind"], r["layer"]) for r in res["measurements"]}
    assert kinds == {(k, "/stage3/conv2/Conv") for k in ("td", "td+int8", "int8")}
    by = {r["kind"]: r for r in res["measurements"]}
    assert by["int8"]["sqnr_db"] > 20                    # one INT8 layer: small error
    # quantizing the chain changes the outputs, but the decomposition error dominates (§5: errors add in energy)
    assert by["td+int8"]["sqnr_db"] != by["td"]["sqnr_db"]
    assert by["td+int8"]["sqnr_db"] == pytest.approx(by["td"]["sqnr_db"], abs=3)
    pts = res["additivity"]["summary"]["td+int8_layer"]["noise"]
    assert pts["points"] == 1


def test_sensitivity_allocation_meets_target_and_beats_uniform(swept):
    """The planner's knapsack over the sweep's curves: at the cost of the uniform plan it predicts no more
    degradation than uniform, in parameters and in MACs; a 3x target is met."""
    from onnxcompress import Recipe
    from onnxcompress.ir.layers import collect_layers
    from onnxcompress.ir.modelio import load_model
    from onnxcompress.ir.shapes import input_shapes
    from onnxcompress.passes.fold_bn import FoldBatchNorm
    from onnxcompress.passes.registry import cost_models
    from onnxcompress.planning.planner import Planner
    from onnxcompress.planning.sensitivity import curves_from_analysis, options_for

    _, res = swept
    m = load_model(MODEL)
    layers = collect_layers(FoldBatchNorm().run(m).model, input_shapes(m))
    swept_names = [l["name"] for l in res["layers"] if l["decomposable"]]
    infos = [i for i in layers if i.name in swept_names]
    cm = cost_models()["tucker2"]
    curves, kind = curves_from_analysis(res)
    assert kind == "td" and set(curves) == {(n, "tucker2") for n in swept_names}
    kw = dict(method="tucker2", include=swept_names, rank_multiple=1, latency_guard=False)

    def total(plan, target):
        return sum(cm.cost(i, plan.layers[i.name].ranks, target) for i in infos)

    def pred(plan, target):
        opts = {i.name: options_for(cm, i, curves[(i.name, "tucker2")], target) for i in infos}
        return sum(next(o[1] for o in opts[i.name] if o[2] == plan.layers[i.name].ranks) for i in infos)

    for target in ("params", "macs"):
        uni = Planner(Recipe(ratio=2, **kw), cost_models()).plan(layers)
        u_cost = total(uni, target)
        ratio = sum(cm.cost(i, None, target) for i in infos) / u_cost       # uniform is exactly feasible
        r = Recipe(allocation="sensitivity", **kw, **({"ratio": ratio} if target == "params"
                                                       else {"target_macs": 1 / ratio}))
        sens = Planner(r, cost_models()).plan(layers, curves)
        assert total(sens, target) <= u_cost * (1 + 1e-9)
        assert pred(sens, target) <= pred(uni, target) + 1e-12
        assert any("sensitivity allocation" in n for n in sens.notes)
    sens3 = Planner(Recipe(allocation="sensitivity", ratio=3.0, **kw), cost_models()).plan(layers, curves)
    assert sum(cm.cost(i, None, "params") for i in infos) / total(sens3, "params") >= 3.0


def test_bad_usage_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    with pytest.raises(UserError, match="grid"):
        analyze(MODEL, CALIB, grid=[1.0], cache_dir=tmp_path)
    with pytest.raises(UserError, match="choose from tucker2"):
        analyze(MODEL, CALIB, method="bogus", cache_dir=tmp_path)
    with pytest.raises(UserError, match="no layer named"):
        analyze(MODEL, CALIB, layers=["nope"], cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)      # as if Ray were not installed
    with pytest.raises(UserError, match="pip install"):
        analyze(MODEL, CALIB, executor="ray", cache_dir=tmp_path)


def test_cli_analyze(tmp_path, capsys):
    from onnxcompress.cli import main

    rc = main(["analyze", str(MODEL), "--data", CALIB, "--grid", "4", "--samples", "8", "--out",
               str(tmp_path / "o"), "--layers", "/stage3/conv2/Conv", "--no-global"])
    assert rc == 0
    assert (tmp_path / "o" / "analyze.json").is_file() and (tmp_path / "o" / "sensitivity_top1.png").is_file()
    assert "1 tasks: 1 evaluated" in capsys.readouterr().out
    rc = main(["analyze", str(MODEL), "--data", CALIB, "--grid", "x", "--out", str(tmp_path / "p")])
    assert rc == 2


@pytest.mark.slow
def test_ray_executor_local_instance(tmp_path):
    pytest.importorskip("ray")
    kw = dict(grid=[3], samples=8, global_curve=False, progress=False,
              layers=["/stage2/conv2/Conv", "/stage3/conv1/Conv"])
    a = analyze(MODEL, CALIB, executor="ray", jobs=2, cache_dir=tmp_path / "r", **kw)
    b = analyze(MODEL, CALIB, jobs=1, cache_dir=tmp_path / "l", **kw)
    assert a["stats"]["evaluated"] == 2
    assert [r["sqnr_db"] for r in a["measurements"]] == pytest.approx([r["sqnr_db"] for r in b["measurements"]])


def test_code_fingerprint_covers_every_module(tmp_path, monkeypatch):
    """The cache key hashes every source file of the package with its path: editing, adding or moving a
    module changes it (a stale cached curve can never survive a code change)."""
    import shutil

    import onnxcompress
    from onnxcompress.analysis import cache as an

    src = Path(onnxcompress.__file__).resolve().parent
    pkg = tmp_path / "onnxcompress"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(an, "__file__", str(pkg / Path(an.__file__).name))
    base = an.code_fingerprint()
    assert base == an.code_fingerprint()
    victim = pkg / "decompose" / "svd.py"
    victim.write_text(victim.read_text() + "\n# edited\n")
    edited = an.code_fingerprint()
    assert edited != base
    (pkg / "decompose" / "moved").mkdir()
    victim.rename(pkg / "decompose" / "moved" / "svd.py")
    assert an.code_fingerprint() not in (base, edited)


def test_pool_workers_do_not_rerun_an_unguarded_script(tmp_path):
    """A user's script without `if __name__ == "__main__":` calling the sweep with worker processes: the
    workers must not execute the script again (spawn imports __main__ by default)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from onnxcompress.analysis.sweep import analyze\n"
        "print('SCRIPT BODY RUNS', flush=True)\n"
        f"res = analyze({str(MODEL)!r}, {CALIB!r}, jobs=2, cache_dir={str(tmp_path / 'c')!r}, grid=[3],\n"
        "              samples=4, global_curve=False, progress=False,\n"
        "              layers=['/stage1/conv1/Conv', '/stage2/conv2/Conv'])\n"
        "print('EVALUATED', res['stats']['evaluated'], flush=True)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("SCRIPT BODY RUNS") == 1
    assert "EVALUATED 2" in p.stdout
