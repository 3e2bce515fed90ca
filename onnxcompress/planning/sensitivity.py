"""`--allocation sensitivity`: per-layer options from measured sensitivity curves (`onnxcompress analyze`, or
measured by the pipeline on the calibration data), for the planner's multiple-choice knapsack.

A curve is, for one layer and one method, the measured degradation of the whole model's output when only that
layer is factorized at each grid ratio (and, with INT8 curves, when the layer's chain is also quantized).
Per layer the options are "keep the original" plus one per measured rank tuple: (cost in the target metric,
predicted degradation, ranks). The degradations add (ALGORITHMS §5): the knapsack picks one option per layer so
that the free layers together cost at most their original cost / ratio with the least summed degradation.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

METRICS = ("auto", "top1", "noise", "accuracy")
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


def degradation(row: dict, metric: str = "auto", tiebreak: bool = True) -> float | None:
    """Degradation of one measurement (0 = none). ``top1``: 1 − top-1 agreement plus (with `tiebreak`) a small
    multiple of the relative output-noise energy; ``noise``: 10^(−SQNR/10) (relative output error energy; for
    models without classes); ``accuracy``: accuracy drop (labels), plus the same tie-break; ``auto``: top1
    when the model has classes, else noise. None when the row was skipped or lacks the metric."""
    if row is None or row.get("skipped"):
        return None
    sq = row.get("sqnr_db")
    noise = None if sq is None else 10 ** (-float(sq) / 10)
    tb = _TIEBREAK * (noise or 0.0) if tiebreak else 0.0
    if metric == "auto":
        metric = "top1" if row.get("top1_agreement") is not None else "noise"
    if metric == "noise":
        return noise
    if metric == "top1":
        a = row.get("top1_agreement")
        return None if a is None else (1.0 - a) + tb
    if metric == "accuracy":
        d = row.get("accuracy_drop")
        return None if d is None else d + tb
    raise UserError(f"invalid sensitivity metric {metric!r}: choose from {', '.join(METRICS)}")


def row_ranks(row: dict) -> tuple[int, ...] | None:
    if row.get("ranks") is not None and not isinstance(row["ranks"], dict):
        return tuple(int(x) for x in row["ranks"])
    if row.get("r3") is not None:
        return (int(row["r3"]), int(row["r4"]))
    return None


def curves_from_analysis(analysis: dict, quantize: str = "none", metric: str = "auto",
                         layers: dict | None = None) -> tuple[dict, str]:
    """{(layer, method): {"keep": degradation, "points": [(ranks, degradation)]}} from an analyze result, and
    which curves were used ("td", or "td+int8" when quantizing to INT8 and the INT8 curves exist: then keeping
    a layer costs its INT8-only drop and each option its TD+INT8 drop). `layers`: {name: (T, S, kernel)} of
    the model being planned, checked against the analysed model's."""
    if metric not in METRICS:
        raise UserError(f"invalid --sensitivity-metric {metric!r}: choose from {', '.join(METRICS)}")
    rows = [r for r in analysis["measurements"] if r.get("scope") == "layer"]
    facts = {l["name"]: l for l in analysis["layers"]}
    for name, (T, S, kernel) in (layers or {}).items():
        l = facts.get(name)
        if l is not None and (l["T"], l["S"], tuple(l["kernel"])) != (T, S, tuple(kernel)):
            raise UserError(f"layer {name}: the sensitivity curves were measured on a {l['T']}x{l['S']}x"
                            f"{'x'.join(map(str, l['kernel']))} layer, this model's is {T}x{S}x"
                            f"{'x'.join(map(str, kernel))}: rerun `onnxcompress analyze` on this model")
    default_method = analysis.get("settings", {}).get("method", "tucker2")
    keys = {(r["layer"], r.get("method") or default_method) for r in rows if r["kind"] == "td"}
    use_q = quantize == "int8" and keys and all(
        any(r["layer"] == n and r["kind"] == "td+int8" and (r.get("method") or default_method) == m for r in rows)
        and any(r["layer"] == n and r["kind"] == "int8" for r in rows) for n, m in keys)
    kind = "td+int8" if use_q else "td"
    out = {}
    for name, method in keys:
        keep = 0.0
        if use_q:
            q = next(r for r in rows if r["layer"] == name and r["kind"] == "int8")
            keep = degradation(q, metric) or 0.0
        pts = []
        for r in rows:
            if r["layer"] != name or r["kind"] != kind or (r.get("method") or default_method) != method:
                continue
            d, rr = degradation(r, metric), row_ranks(r)
            if d is not None and rr is not None:
                pts.append((rr, d))
        out[(name, method)] = {"keep": keep, "points": pts}
    return out, kind


def options_for(cost, info, curve: dict, target: str) -> list[tuple]:
    """Knapsack options of one layer: [(cost, degradation, ranks | None)], keep first. A cheaper chain is never
    predicted to hurt less than a dearer one (measurement noise on few samples would otherwise be exploited):
    running max of the degradation from the keep option downwards."""
    c0 = cost.cost(info, None, target)
    pts = []
    limits = cost.rank_limits(info)
    for rr, d in curve["points"]:
        if len(rr) != len(limits) or any(a > b for a, b in zip(rr, limits)):
            continue
        c = cost.cost(info, rr, target)
        if c < c0:
            pts.append((c, d, tuple(rr)))
    pts.sort(key=lambda p: -p[0])
    keep = curve["keep"]
    opts, run = [(c0, keep, None)], keep
    for c, d, rr in pts:
        run = max(run, d)
        opts.append((c, run, rr))
    return opts


__all__ = ["METRICS", "curves_from_analysis", "degradation", "load_analysis", "options_for", "row_ranks"]
