"""Additivity of the per-layer drops (ALGORITHMS §5): how well the sum of one-layer degradations predicts the
measured degradation of all layers together, for TD, INT8 and TD+INT8."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..planning.sensitivity import degradation


def _drop(row: dict, metric: str) -> float | None:
    return degradation(row, metric, tiebreak=False)


def _summary(pairs: list[tuple[float, float]]) -> dict:
    """pairs of (predicted = sum of parts, measured)."""
    if not pairs:
        return {"points": 0}
    p = np.array([a for a, _ in pairs], float)
    m = np.array([b for _, b in pairs], float)
    out = {"points": len(pairs), "mean_abs_error": float(np.mean(np.abs(m - p))),
           "max_abs_error": float(np.max(np.abs(m - p)))}
    nz = p > 0
    if nz.any():
        out["median_measured_over_predicted"] = float(np.median(m[nz] / p[nz]))
    if len(pairs) >= 3 and np.std(p) > 0 and np.std(m) > 0:
        out["pearson_r"] = float(np.corrcoef(p, m)[0, 1])
    return out


def additivity(rows: list[dict]) -> dict:
    """How well the sum of individual drops predicts the measured combined drop (ALGORITHMS §5).

    * ``td``: Σ over layers of the one-layer drop at ratio r vs the global (all layers at r) drop;
    * ``int8``: Σ of one-layer INT8 drops vs all-layers INT8;
    * ``td+int8_layer``: per layer and ratio, drop(TD) + drop(INT8) vs the measured drop(TD+INT8);
    * ``td+int8_global``: global drop(TD at r) + global drop(INT8) vs global drop(TD+INT8 at r).
    Metrics: ``top1`` (1 − top-1 agreement), ``accuracy`` (accuracy drop, with labels), ``noise``
    (relative output error energy 10^(−SQNR/10): the quantity §5 predicts to add)."""
    idx = {(r["kind"], r["scope"], r["layer"], r["ratio"]): r for r in rows}
    layers = sorted({r["layer"] for r in rows if r["scope"] == "layer"})
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    metrics = [m for m in ("top1", "accuracy", "noise") if any(_drop(r, m) is not None for r in rows)]
    out: dict[str, Any] = {"metrics": metrics, "td": [], "summary": {}}
    pairs: dict[str, dict[str, list]] = {}

    def note(section, metric, pred, meas):
        if pred is not None and meas is not None:
            pairs.setdefault(section, {}).setdefault(metric, []).append((pred, meas))

    for r in ratios:
        g = idx.get(("td", "global", None, r))
        if g is None or g.get("skipped"):
            continue
        parts = [idx.get(("td", "layer", l, r)) for l in (g.get("ranks") or {})]
        entry = {"ratio": r, "layers": len(parts), "complete": all(p is not None for p in parts)}
        if not entry["complete"]:
            out["td"].append(entry)
            continue
        for m in metrics:
            ds = [_drop(p, m) for p in parts]
            if any(d is None for d in ds):
                continue
            pred, meas = float(sum(ds)), _drop(g, m)
            entry[m] = {"sum_of_layers": pred, "measured": meas}
            note("td", m, pred, meas)
        if "noise" in entry:
            s = entry["noise"]["sum_of_layers"]
            entry["sqnr_db"] = {"predicted": -10 * math.log10(s) if s > 0 else None, "measured": g.get("sqnr_db")}
        out["td"].append(entry)
    gi = idx.get(("int8", "global", None, None))
    if gi is not None:
        parts = [idx.get(("int8", "layer", l, None)) for l in layers]
        if all(p is not None for p in parts):
            e = {}
            for m in metrics:
                ds = [_drop(p, m) for p in parts]
                if all(d is not None for d in ds) and _drop(gi, m) is not None:
                    e[m] = {"sum_of_layers": float(sum(ds)), "measured": _drop(gi, m)}
            out["int8"] = e
    for l in layers:
        q = idx.get(("int8", "layer", l, None))
        for r in ratios:
            t, tq = idx.get(("td", "layer", l, r)), idx.get(("td+int8", "layer", l, r))
            if q is None or t is None or tq is None:
                continue
            for m in metrics:
                a, b, c = _drop(t, m), _drop(q, m), _drop(tq, m)
                if None not in (a, b, c):
                    note("td+int8_layer", m, a + b, c)
    if gi is not None:
        tg = []
        for r in ratios:
            t, tq = idx.get(("td", "global", None, r)), idx.get(("td+int8", "global", None, r))
            if t is None or tq is None:
                continue
            e = {"ratio": r}
            for m in metrics:
                a, b, c = _drop(t, m), _drop(gi, m), _drop(tq, m)
                if None not in (a, b, c):
                    e[m] = {"td_plus_int8": a + b, "measured": c}
                    note("td+int8_global", m, a + b, c)
            tg.append(e)
        out["td+int8_global"] = tg
    out["summary"] = {sec: {m: _summary(v) for m, v in d.items()} for sec, d in pairs.items()}
    return out
