"""PNG plots for reports (matplotlib is optional: imported only here, only when a plot is asked for).

* :func:`optimize_plots` — per-layer params and MACs before/after (bar charts), latency per stage when the
  report measured it (``--min-speedup``).
* :func:`agreement_vs_compression` — top-1 (and top-5) agreement / accuracy against the compression ratio,
  one point per model or per provider (``validate``, and ``analyze`` grids).
* :func:`bench_plot` — median latency with p90 whiskers per model and provider.

Every function takes plain dicts (the reports' JSON form) or the report objects, writes into a folder
(created if missing) with the Agg backend, and returns the paths written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib, which is not installed: pip install 'onnxcompress[plots]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def require() -> None:
    """Raise the one-line UserError now (before any work) when matplotlib is missing."""
    _plt()


def _as_dict(r) -> dict[str, Any]:
    return r if isinstance(r, dict) else r.to_dict()


def _folder(out_dir) -> Path:
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"plots folder {d} is a file")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _layer_bars(plt, layers: list[dict], key: str, title: str, path: Path) -> Path:
    names = [_short(l["name"]) for l in layers]
    before = [l.get(f"{key}_before") or 0 for l in layers]
    after = [(l.get(f"{key}_after") if l.get(f"{key}_after") is not None else l.get(f"{key}_before")) or 0
             for l in layers]
    x = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4.5))
    w = 0.4
    ax.bar([i - w / 2 for i in x], before, w, label="before", color="#999999")
    ax.bar([i + w / 2 for i in x], after, w, label="after",
           color=["#2b7bba" if l.get("skipped") is None else "#d9a441" for l in layers])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(key)
    ax.set_title(title + " (blue: rewritten, amber: kept)")
    ax.legend()
    return _save(fig, path, plt)


def optimize_plots(report, out_dir) -> list[Path]:
    """layers_params.png, layers_macs.png, and latency_stages.png when latency was measured."""
    plt = _plt()
    r = _as_dict(report)
    d = _folder(out_dir)
    written = []
    layers = [l for l in r.get("layers") or [] if l.get("params_before")]
    if layers:
        written.append(_layer_bars(plt, layers, "params", "Parameters per layer", d / "layers_params.png"))
        if any(l.get("macs_before") for l in layers):
            written.append(_layer_bars(plt, layers, "macs", "MACs per layer", d / "layers_macs.png"))
    lat = (r.get("latency") or {}).get("stages")
    if lat:
        stages = [s for s in lat if s.get("median_ms") is not None]
        if stages:
            fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(stages) + 2), 4))
            med = [s["median_ms"] for s in stages]
            p90 = [max((s.get("p90_ms") or s["median_ms"]) - s["median_ms"], 0) for s in stages]
            ax.bar([s["name"] for s in stages], med, yerr=[[0] * len(stages), p90], color="#2b7bba", capsize=4)
            for i, s in enumerate(stages):
                ax.text(i, med[i], f"{s.get('speedup') or 0:.2f}x", ha="center", va="bottom", fontsize=8)
            lt = r["latency"]
            ax.set_ylabel("median latency (ms), whisker p90")
            ax.set_title(f"Latency per stage on {lt.get('provider')} ({lt.get('threads')} thread(s))")
            written.append(_save(fig, d / "latency_stages.png", plt))
    if r.get("frontier"):
        written.append(frontier_plot(plt, r, d / "auto_frontier.png"))
    return written


def frontier_plot(plt, r: dict, path: Path) -> Path:
    """The accuracy–latency frontier the auto search explored: every verified candidate's measured budget
    metric against its whole-model speedup, the chosen one ringed, the budget as a line."""
    pts = [p for p in r["frontier"] if p.get("latency_ratio") is not None and p.get("measured") is not None]
    b = r.get("budget") or {}
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for ok, color, lab in ((True, "#2b7bba", "meets budget, not slower/larger"), (False, "#d9534f", "rejected")):
        sel = [p for p in pts if bool(p.get("ok")) == ok]
        if sel:
            ax.scatter([p["latency_ratio"] for p in sel], [p["measured"] for p in sel], c=color, label=lab, s=30)
    for p in pts:
        ax.annotate(p["label"].split(" (")[0], (p["latency_ratio"], p["measured"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    chosen = (r.get("auto") or {}).get("chosen")
    for p in pts:
        if p["label"] == chosen:
            ax.scatter([p["latency_ratio"]], [p["measured"]], s=160, facecolors="none", edgecolors="k",
                       label="written")
    if b.get("limit") is not None:
        ax.axhline(b["limit"], color="k", ls=":", lw=1, label=f"budget ({b.get('description', '')})")
    ax.set_xlabel("whole-model speedup vs the input (interleaved, same run)")
    ax.set_ylabel({"accuracy": "accuracy drop (points)", "agreement": "top-1 agreement",
                   "sqnr": "SQNR (dB)"}.get(b.get("kind"), "measured"))
    ax.set_title("Auto search: candidates verified on held-apart data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


def agreement_vs_compression(points: Sequence[dict], path, title: str = "Agreement vs compression") -> Path:
    """`points`: dicts with `compression` (x, e.g. params before/after) and any of `top1_agreement`,
    `top5_agreement`, `accuracy_after` (y, fractions), and an optional `label`."""
    plt = _plt()
    path = Path(path)
    _folder(path.parent)
    pts = sorted((p for p in points if p.get("compression") is not None), key=lambda p: p["compression"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, style in (("top1_agreement", "o-"), ("top5_agreement", "s--"), ("accuracy_after", "^:")):
        xs = [p["compression"] for p in pts if p.get(key) is not None]
        ys = [100 * p[key] for p in pts if p.get(key) is not None]
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "))
    for p in pts:
        if p.get("label") and p.get("top1_agreement") is not None:
            ax.annotate(p["label"], (p["compression"], 100 * p["top1_agreement"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("compression (params before / after)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path, plt)


def validate_plots(report, out_dir, compression: float | None = None) -> list[Path]:
    """agreement_vs_compression.png: one point per provider that ran."""
    r = _as_dict(report)
    pts = [{**{k: p.get(k) for k in ("top1_agreement", "top5_agreement", "accuracy_after")},
            "compression": compression if compression is not None else 1.0, "label": p["provider"]}
           for p in r.get("providers", []) if not p.get("skipped")]
    if not pts:
        return []
    return [agreement_vs_compression(pts, _folder(out_dir) / "agreement_vs_compression.png",
                                     "Agreement vs compression (per provider)")]


def bench_plot(report, path) -> Path:
    """Median latency (bars) with p90 whiskers, grouped by provider."""
    plt = _plt()
    r = _as_dict(report)
    path = Path(path)
    _folder(path.parent)
    rows = [(p["provider"], m) for p in r.get("providers", []) if not p.get("skipped")
            for m in p.get("models", []) if m.get("median_ms") is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4))
    labels = [f"{m['name']}\n[{prov}]" for prov, m in rows]
    med = [m["median_ms"] for _, m in rows]
    err = [max((m.get("p90_ms") or m["median_ms"]) - m["median_ms"], 0) for _, m in rows]
    ax.bar(range(len(rows)), med, yerr=[[0] * len(rows), err], capsize=4, color="#2b7bba")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("median latency (ms), whisker p90")
    ax.set_title("Latency")
    return _save(fig, path, plt)
