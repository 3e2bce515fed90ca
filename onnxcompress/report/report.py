"""The optimize report: one dataclass that serialises to JSON and renders as a table for people."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .._json import json_clean
from ..passes.base import PassRecord


@dataclass
class Gate:
    name: str
    threshold: float
    value: float | None
    passed: bool


@dataclass
class Report:
    model: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None    # whole-model latency vs the input, stage timings, the guard's summary
    budget: dict[str, Any] | None = None     # auto: kind, limit, predicted, measured, rounds
    frontier: list[dict[str, Any]] = field(default_factory=list)   # auto: every verified candidate
    auto: dict[str, Any] | None = None       # auto: what was measured and decided
    recipe: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    passed: bool = True
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_clean(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        return render_table(self)


def nothing_changed(passes: list[PassRecord], layers: list[dict[str, Any]]) -> str | None:
    """One line when no pass but constant folding changed the model, with the commonest reasons layers were
    skipped; None when something was compressed."""
    if any(p.modified for p in passes if p.name != "FoldConstants"):
        return None
    why: dict[str, int] = {}
    for l in layers:
        if l.get("skipped"):
            why[l["skipped"]] = why.get(l["skipped"], 0) + 1
    top = sorted(why.items(), key=lambda kv: -kv[1])[:3]
    reasons = "; ".join(f"{k}: {v}" for k, v in top)
    return (f"nothing changed: no pass rewrote the model ({len(layers)} layer(s) considered"
            + (f", skipped as {reasons}" if reasons else "") + ")")


def data_aware_line(da: dict) -> str:
    """`data-aware: 30 of 34 layers keep data-aware factors, 4 fell back to plain (a, b, …); held-out network SQNR
    -2.25 -> 11.37 dB`"""
    layers = da.get("layers", [])
    fell = [o["name"] for o in layers if o["fell_back"]]
    s = f"data-aware: {len(layers) - len(fell)} of {len(layers)} layers keep data-aware factors"
    if fell:
        s += f", {len(fell)} fell back to plain ({', '.join(fell[:5])}{', …' if len(fell) > 5 else ''})"
    if da.get("net_db_plain") is not None:
        s += f"; held-out network SQNR {da['net_db_plain']:.2f} -> {da['net_db_final']:.2f} dB"
    return s


def _n(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _ratio(a, b) -> str:
    if not a or not b or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def wrap_table(rows: list[tuple], max_width: int = 60) -> list[str]:
    """A plain-text table; cells longer than `max_width` wrap onto continuation lines, never cut (layer names
    are what --include globs match)."""
    import textwrap

    widths = [min(max(len(str(row[i])) for row in rows), max_width) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [textwrap.wrap(str(c), w, break_long_words=True, break_on_hyphens=False) or [""]
                 for c, w in zip(row, widths)]
        for k in range(max(len(c) for c in cells)):
            lines.append("  ".join((c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _layer_rows(r: Report, max_layers: int) -> list[tuple]:
    rows = [("layer", "kernel", "method", "ranks", "precision", "params", "rel.err", "note")]
    for l in r.layers[:max_layers]:
        kernel = "x".join(str(k) for k in (l.get("kernel_shape") or [])) or "-"
        ranks = ",".join(str(k) for k in (l.get("ranks") or [])) or "-"
        pb, pa = l.get("params_before"), l.get("params_after")
        params = f"{_n(pb)} -> {_n(pa)}" if l.get("skipped") is None else _n(pb)
        err = l.get("weight_rel_error")
        method = l.get("method", "") if l.get("skipped") is None else "-"
        note = l.get("skipped") or ("data-aware fell back to the plain factors"
                                    if (l.get("extra") or {}).get("fell_back") else "")
        rows.append((l["name"], kernel, method, ranks, l.get("precision") or "-", params,
                     "-" if err is None else f"{err:.3f}", note))
    return rows


def render_table(r: Report, max_layers: int = 200) -> str:
    lines = []
    rows = _layer_rows(r, max_layers)
    if len(rows) > 1:
        lines += wrap_table(rows)
        if len(r.layers) > max_layers:
            lines.append(f"... {len(r.layers) - max_layers} more layers in the JSON report")
        lines.append("")
    m = r.model
    lines.append(f"params  {_n(m.get('params_before'))} -> {_n(m.get('params_after'))} "
                 f"({_ratio(m.get('params_before'), m.get('params_after'))} smaller)")
    if m.get("decomposed_params_before"):
        lines.append(f"  decomposed layers  {_n(m['decomposed_params_before'])} -> "
                     f"{_n(m['decomposed_params_after'])} "
                     f"({_ratio(m['decomposed_params_before'], m['decomposed_params_after'])})")
    for note in m.get("allocation_notes") or []:
        lines.append(f"  allocation  {note}")
    lines.append(f"MACs    {_n(m.get('macs_before'))} -> {_n(m.get('macs_after'))} "
                 f"({_ratio(m.get('macs_before'), m.get('macs_after'))} fewer)")
    lines.append(f"file    {_n(m.get('bytes_before'))}B -> {_n(m.get('bytes_after'))}B "
                 f"({_ratio(m.get('bytes_before'), m.get('bytes_after'))} smaller)")
    if (m.get("data_aware") or {}).get("layers"):
        lines.append(data_aware_line(m["data_aware"]))
    q = r.quantization
    if q.get("int8"):
        i8 = q["int8"]
        lines.append(f"INT8    QDQ, {i8['activations']} activations / {i8['weights']} weights"
                     f"{' per-channel' if i8.get('per_channel') else ''} ({i8.get('reason', '')})")
    lines += _int4_qaf_lines(q)
    if q.get("fp16"):
        lines.append(f"FP16    {q['fp16'].get('note', '')}")
    if r.calibration:
        lines.append(f"calib   {r.calibration.get('description', '')} ({r.calibration.get('samples', '?')} samples)")
    lines.append("passes  " + ", ".join(f"{p.name} {p.seconds:.2f}s" + ("" if p.modified else " (no change)")
                                       for p in r.passes))
    f = r.fidelity
    if f:
        parts = [f"{f.get('samples')} samples"]
        if f.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * f['top1_agreement']:.1f}%")
        if f.get("sqnr_db") is not None:
            parts.append(f"SQNR {f['sqnr_db']:.1f} dB")
        if f.get("max_abs_diff") is not None:
            parts.append(f"max |diff| {f['max_abs_diff']:.3g}")
        lines.append("fidelity " + ", ".join(parts) + f"  [{f.get('data', '')}]")
        if f.get("accuracy_before") is not None:
            lines.append(f"accuracy {100 * f['accuracy_before']:.2f}% -> {100 * f['accuracy_after']:.2f}% "
                         f"(drop {100 * f['accuracy_drop']:.2f} points)")
    lat = r.latency or {}
    if lat.get("median_ms_before") is not None and lat.get("median_ms_after") is not None:
        lines.append(f"latency {lat['median_ms_before']:.3f} ms -> {lat['median_ms_after']:.3f} ms "
                     f"({lat.get('speedup') or 0:.2f}x, {lat.get('provider')}, {lat.get('threads')} thread(s), "
                     f"interleaved median)" + (" SLOWER than the input" if lat.get("slower") else ""))
    if r.budget:
        b = r.budget
        lines.append(f"budget  {b.get('description')}: measured {b.get('measured')}, {b.get('rounds')} "
                     f"candidate(s) verified on {b.get('data')}")
    if lat.get("stages"):
        lines.append(f"latency ({lat.get('provider')}, {lat.get('threads')} thread(s), median) "
                     + ", ".join(f"{s['name']} {s['median_ms']:.2f} ms" for s in lat["stages"]
                                 if s.get("median_ms") is not None)
                     + (f": {lat['speedup']:.2f}x" if lat.get("speedup") else ""))
    if lat.get("guard"):
        gd = lat["guard"]
        lines.append(f"guard   latency guard ({gd['precision']}, {gd['provider']}): {gd['layers_timed']} layers "
                     f"timed, {gd['kept_conv']} kept as the original conv, {gd['seconds']:.2f}s")
    for g in r.gates:
        v = "-" if g.value is None else f"{g.value:.4g}"
        lines.append(f"gate    {g.name} {v} vs {g.threshold:g}: {'ok' if g.passed else 'FAILED'}")
    for w in r.warnings:
        lines.append(f"warning {w}")
    return "\n".join(lines)


def _int4_qaf_lines(q: dict) -> list[str]:
    """The INT4 line (what it bought and cost, measured) and one QAF line per grid."""
    lines = []
    if q.get("int4"):
        i4, ms = q["int4"], q["int4"].get("measured") or {}
        lines.append(f"INT4    Conv weights int4 per channel, {i4['activations']} activations; {i4['matmul']}"
                     + (f"; measured against the model entering INT4: {ms['size_ratio']:.2f}x smaller, "
                        f"{ms['latency_ratio']:.2f}x its speed on {ms['provider']} (a size format)"
                        if ms.get("size_ratio") and ms.get("latency_ratio") else ""))
    for qa in q.get("qaf") or []:
        lines.append(f"QAF     {qa['layers']} factorized chains fitted on the {qa['bits']}-bit grid they are stored "
                     f"on (weight errors per layer in the JSON report)")
    return lines
