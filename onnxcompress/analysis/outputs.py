"""What `analyze` writes: analyze.json, analyze.csv, the PNG curves, and the terminal summary."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import UserError


CSV_FIELDS = ("kind", "scope", "layer", "method", "ratio", "ranks", "r3", "r4", "layers_decomposed", "params_before", "params_after",
              "macs_before", "macs_after", "weight_rel_error", "samples", "top1_agreement", "top5_agreement",
              "sqnr_db", "noise", "cosine", "max_abs_diff", "accuracy_before", "accuracy_after", "accuracy_drop",
              "skipped", "seconds", "cpu_seconds", "cached")


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in result["measurements"]:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS}
        rr = r.get("ranks")
        row["ranks"] = "/".join(map(str, rr)) if isinstance(rr, list) else ""   # global rows: in the JSON
        w.writerow(row)
    return buf.getvalue()


def write_outputs(result: dict, out_dir) -> list[Path]:
    from ..ir.modelio import write_text_atomic

    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"--out {d} is a file")
    d.mkdir(parents=True, exist_ok=True)
    paths = [write_text_atomic(json.dumps(result, indent=1) + "\n", d / "analyze.json"),
             write_text_atomic(to_csv(result), d / "analyze.csv")]
    paths += analyze_plots(result, d)
    return paths


def analyze_plots(result: dict, out_dir) -> list[Path]:
    """sensitivity_<metric>.png: metric vs ratio, one curve per layer (TD; TD+INT8 in a second panel when
    measured) with the global curve in black; global_curve.png: the global measured drop and the sum of the
    per-layer drops vs ratio."""
    from ..report.plots import _plt, _save, _short

    plt = _plt()
    d = Path(out_dir)
    rows = result["measurements"]
    kinds = [k for k in ("td", "td+int8") if any(r["kind"] == k for r in rows)]
    metrics = [("top1_agreement", "top-1 agreement (%)", 100)]
    if result["settings"]["labels"]:
        metrics.append(("accuracy_after", "accuracy (%)", 100))
    metrics.append(("sqnr_db", "SQNR (dB)", 1))
    layers = [l["name"] for l in result["layers"] if l["decomposable"] and any(
        r["layer"] == l["name"] for r in rows)]
    paths = []
    for key, label, scale in metrics:
        if not any(r.get(key) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for name in layers:
                pts = sorted((r["ratio"], r[key]) for r in rows if r["kind"] == kind and r["scope"] == "layer"
                             and r["layer"] == name and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], "o-", ms=3, lw=1, label=_short(name))
            g = sorted((r["ratio"], r[key]) for r in rows if r["kind"] == kind and r["scope"] == "global"
                       and r["ratio"] is not None and r.get(key) is not None)
            if g:
                ax.plot([p[0] for p in g], [scale * p[1] for p in g], "k--", lw=2, label="all layers (global)")
            ax.set_xlabel("per-layer parameter ratio")
            ax.set_ylabel(label)
            ax.set_title(f"{kind.upper()}: one layer at a time")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6, loc="best")
        paths.append(_save(fig, d / f"sensitivity_{key.split('_')[0]}.png", plt))
    # global curve + additivity
    add = result.get("additivity", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for kind, style in (("td", "o-"), ("td+int8", "s--")):
        g = sorted((r["params_before"] / max(r["params_after"], 1), r) for r in rows
                   if r["kind"] == kind and r["scope"] == "global" and r["ratio"] is not None and not r.get("skipped"))
        for key, lab in (("top1_agreement", "top-1 agreement"), ("accuracy_after", "accuracy")):
            pts = [(x, r[key]) for x, r in g if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=f"{kind} {lab}")
    ax.set_xlabel("overall decomposed-params ratio (all layers, uniform)")
    ax.set_ylabel("%")
    ax.set_title("Global curve")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1]
    for m, style in (("top1", "o"), ("accuracy", "^"), ("noise", "s")):
        pts = [(e[m]["sum_of_layers"], e[m]["measured"]) for e in add.get("td", []) if m in e]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
    lim = ax.get_xlim()[1] if ax.lines else 1
    ax.plot([0, lim], [0, lim], "k:", lw=1, label="y = x")
    ax.set_xlabel("sum of one-layer drops (predicted)")
    ax.set_ylabel("measured drop, all layers")
    ax.set_title("Additivity (TD, per grid ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, d / "global_curve.png", plt))
    return paths


def render_summary(result: dict) -> str:
    """A short table for the terminal: per layer the metric at each ratio, then the additivity check."""
    rows = result["measurements"]
    grid = result["settings"]["grid"]
    key = "top1_agreement" if any(r.get("top1_agreement") is not None for r in rows) else "sqnr_db"
    fmtv = (lambda v: f"{100 * v:6.1f}") if key == "top1_agreement" else (lambda v: f"{v:6.1f}")
    lines = [f"{'layer (' + key + ', TD)':40s}" + "".join(f"{r:>7g}" for r in grid) + "   int8"]
    names = [l["name"] for l in result["layers"] if any(r["layer"] == l["name"] for r in rows)] + [None]
    for n in names:
        cells = []
        for r in grid:
            row = next((x for x in rows if x["kind"] == "td" and x["layer"] == n and x["ratio"] == r), None)
            cells.append(fmtv(row[key]) if row and row.get(key) is not None else "     -")
        q = next((x for x in rows if x["kind"] == "int8" and x["layer"] == n), None)
        lines.append(f"{(n or '(all layers)')[-40:]:40s}" + " ".join(cells) +
                     ("  " + fmtv(q[key]) if q and q.get(key) is not None else ""))
    summ = result["additivity"].get("summary", {})
    for sec, d in summ.items():
        parts = [f"{m}: r={s.get('pearson_r', float('nan')):.3f} measured/sum={s.get('median_measured_over_predicted', float('nan')):.2f}"
                 for m, s in d.items()]
        lines.append(f"additivity {sec}: " + "; ".join(parts))
    st = result["stats"]
    lines.append(f"{st['tasks']} tasks: {st['evaluated']} evaluated, {st['cached']} from the cache, "
                 f"{st['run_seconds']:.1f}s ({st['jobs']} job(s), {st['executor']})")
    return "\n".join(lines)
