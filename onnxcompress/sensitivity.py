"""`--allocation sensitivity`: Tucker2 ranks per layer from measured sensitivity curves (`onnxcompress analyze`).

Per decomposable layer the options are "keep the original" plus one option per measured grid ratio:
(cost in the target metric, predicted degradation, (r3, r4)). A multiple-choice knapsack
(:func:`onnxcompress.decompose.allocate.allocate_sensitivity`) picks one option per layer so that the cost
of all the free decomposable layers together is at most their original cost / ratio (params, or MACs with
``--target-macs``) with the least total predicted degradation (the drops add, ALGORITHMS §5).

Curves come from an analyze JSON (``--sensitivity FILE``) or are measured on the fly on the calibration
(else evaluation, else random) data with the analyze machinery at a small sample count, cached on disk.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import UserError

METRICS = ("auto", "top1", "noise", "accuracy")
ON_THE_FLY_SAMPLES = 64
#: weight of the output-noise energy added to the top-1 drop: breaks the many ties of a coarse top-1
#: agreement measured on few samples (single layers often keep 100 % agreement) without overriding it
_TIEBREAK = 0.1


def load_analysis(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--sensitivity {p}: no such file (write one with `onnxcompress analyze ... --out DIR`: "
                        f"DIR/analyze.json)")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--sensitivity {p} is not JSON: {e}") from None
    if not isinstance(data, dict) or "measurements" not in data or "layers" not in data:
        raise UserError(f"--sensitivity {p} is not an `onnxcompress analyze` result (no measurements)")
    return data


def degradation(row: dict, metric: str = "auto") -> float | None:
    """Predicted degradation of one measurement (0 = none). ``top1``: 1 − top-1 agreement plus a small
    multiple of the relative output-noise energy (tie-break); ``noise``: 10^(−SQNR/10) (relative output error
    energy; for models without classes); ``accuracy``: accuracy drop (labels); ``auto``: top1 when the
    model has classes, else noise."""
    if row is None or row.get("skipped"):
        return None
    sq = row.get("sqnr_db")
    noise = None if sq is None else 10 ** (-float(sq) / 10)
    if metric == "auto":
        metric = "top1" if row.get("top1_agreement") is not None else "noise"
    if metric == "noise":
        return noise
    if metric == "top1":
        a = row.get("top1_agreement")
        return None if a is None else (1.0 - a) + _TIEBREAK * (noise or 0.0)
    if metric == "accuracy":
        d = row.get("accuracy_drop")
        return None if d is None else d + _TIEBREAK * (noise or 0.0)
    raise UserError(f"invalid sensitivity metric {metric!r}: choose from {', '.join(METRICS)}")


def layer_options(analysis: dict, infos, specs, target: str, quantize: str = "none",
                  metric: str = "auto") -> tuple[dict[str, list[tuple]], str]:
    """{layer: [(cost_after, degradation, (r3, r4) | None)]} for the free layers, and which curves were used
    ("td" or "td+int8": with --quantize int8 and TD+INT8 curves measured, the keep option costs the layer's
    INT8-only drop and each TD option its TD+INT8 drop)."""
    from .decompose import allocate as al

    rows = [r for r in analysis["measurements"] if r.get("scope") == "layer"]
    layers = {l["name"]: l for l in analysis["layers"]}
    names = [i.name for i in infos]
    missing = [n for n in names if n not in layers or not any(r["layer"] == n and r["kind"] == "td" for r in rows)]
    if missing:
        raise UserError(f"the sensitivity curves have no measurement for layer(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}: were they measured on this model? "
                        f"(rerun `onnxcompress analyze` on it)")
    for i in infos:
        l = layers[i.name]
        if (l["T"], l["S"], tuple(l["kernel"])) != (i.T, i.S, tuple(i.kernel)):
            raise UserError(f"layer {i.name}: the sensitivity curves were measured on a {l['T']}x{l['S']}x"
                            f"{'x'.join(map(str, l['kernel']))} conv, this model's is {i.T}x{i.S}x"
                            f"{'x'.join(map(str, i.kernel))}: rerun `onnxcompress analyze` on this model")
    use_q = quantize == "int8" and all(
        any(r["layer"] == n and r["kind"] == "td+int8" for r in rows) and
        any(r["layer"] == n and r["kind"] == "int8" for r in rows) for n in names)
    kind = "td+int8" if use_q else "td"
    curves: dict[str, list[tuple]] = {}
    for info, sp in zip(infos, specs):
        keep_deg = 0.0
        if use_q:
            q = next(r for r in rows if r["layer"] == info.name and r["kind"] == "int8")
            keep_deg = degradation(q, metric) or 0.0
        pts = []
        for r in rows:
            if r["layer"] != info.name or r["kind"] != kind or r.get("r3") is None:
                continue
            d = degradation(r, metric)
            if d is None:
                continue
            r3, r4 = int(r["r3"]), int(r["r4"])
            if r3 > info.S or r4 > info.T:
                continue
            cost = al.tucker2_cost(sp, r3, r4, target)
            if cost >= al.conv_cost(sp, target):
                continue
            pts.append((cost, d, (r3, r4)))
        # a cheaper chain is never predicted to hurt less than a dearer one (measurement noise on few samples
        # would otherwise be exploited): running max of the degradation from the keep option downwards
        pts.sort(key=lambda p: -p[0])
        opts, run = [(al.conv_cost(sp, target), keep_deg, None)], keep_deg
        for cost, d, rr in pts:
            run = max(run, d)
            opts.append((cost, run, rr))
        curves[info.name] = opts
    return curves, kind


def allocate_by_sensitivity(analysis: dict, infos, specs, ratio: float, target: str, quantize: str = "none",
                            metric: str = "auto") -> tuple[dict[str, tuple[int, int] | None], list[str]]:
    """Ranks per free layer meeting cost(all free layers) <= cost0 / ratio with the least predicted
    degradation; (allocation, notes)."""
    from .decompose import allocate as al

    if metric not in METRICS:
        raise UserError(f"invalid --sensitivity-metric {metric!r}: choose from {', '.join(METRICS)}")
    curves, kind = layer_options(analysis, infos, specs, target, quantize, metric)
    baseline = float(sum(al.conv_cost(sp, target) for sp in specs))
    budget = baseline / ratio
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alloc = al.allocate_sensitivity(curves, budget, baseline, target=target)
    notes += [str(c.message) for c in caught]
    got = al.total_cost(specs, alloc, target)
    pred = sum(next(o[1] for o in curves[n] if o[2] == alloc[n]) for n in curves)
    notes.append(f"sensitivity allocation ({kind} curves, metric {metric}): {target} ratio "
                 f"{baseline / max(got, 1):.3f} over {len(specs)} layers (target {ratio:g}), "
                 f"predicted degradation {pred:.4g}")
    return alloc, notes


def measure_curves(model, recipe, shapes, data=None, progress=None) -> tuple[dict, str]:
    """Sensitivity curves measured now (TD only, the default grid) on `data` (a Dataset or source), else on
    the recipe's calibration, evaluation or random data; cached under ~/.cache/onnxcompress/analyze.
    Returns (analysis, note)."""
    from .analyze import DEFAULT_GRID, analyze

    src = data if data is not None else (recipe.calibration or recipe.eval_data or "random")
    samples = min(ON_THE_FLY_SAMPLES, recipe.calibration_samples or ON_THE_FLY_SAMPLES) \
        if not hasattr(src, "batches") else None
    if progress:
        progress("sensitivity curves: one layer at a time on ORT CPU")
    res = analyze(model, src, grid=DEFAULT_GRID, samples=samples, preprocess=recipe.preprocess,
                  labels=recipe.labels, input_shape=recipe.input_shape or None, quantize=None,
                  global_curve=False, progress=False, seed=recipe.seed)
    st = res["stats"]
    note = (f"sensitivity curves measured on the fly on {res['settings']['data']} ({res['settings']['samples']} "
            f"samples; {st['evaluated']} variants evaluated, {st['cached']} cached): pass --sensitivity FILE "
            f"from `onnxcompress analyze` to choose the data")
    return res, note


def attach(planner, model, recipe, shapes, data=None, progress=None) -> list[str]:
    """Give a Tucker2Planner its curves (file or measured now); returns notes for the report."""
    if recipe.sensitivity:
        planner.sensitivity = load_analysis(recipe.sensitivity)
        return []
    planner.sensitivity, note = measure_curves(model, recipe, shapes, data, progress)
    return [note]


__all__ = ["allocate_by_sensitivity", "attach", "degradation", "layer_options", "load_analysis",
           "measure_curves", "METRICS"]
