"""Validate an optimized model against its original on real data, per ONNX Runtime provider.

For each requested provider both models run on the same batches; reported: top-1 / top-5 agreement,
SQNR, cosine similarity, max abs diff, and accuracy before/after when the data has labels (ImageNet-style
class folders, a labels file, or ``y`` in an .npz). A provider that cannot run here is listed as skipped
with its reason — never dropped silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import onnx

from ._json import json_clean
from .data import inputs_for_model, open_for_model
from .errors import UserError
from .ir.counts import has_quantized_ops
from .ir.modelio import load_model
from .ir.shapes import input_shapes
from .ort.fidelity import Fidelity, FidelityAccumulator
from .ort.session import ProviderUnavailable, make_session, provider_status
from .ort.timing import fell_back

CUDA_INT8_NOTE = ("INT8 QDQ on the CUDA EP runs as simulated quantization (QuantizeLinear/DequantizeLinear "
                  "around float kernels): this is an accuracy check there, not a speed claim; the TensorRT EP "
                  "is what runs QDQ models on INT8 kernels on NVIDIA GPUs")


@dataclass
class ProviderValidation(Fidelity):
    """Fidelity on one provider, or why that provider was skipped."""
    skipped: str | None = None
    note: str | None = None


@dataclass
class ValidationReport:
    original: str
    optimized: str
    data: str
    labelled: bool
    samples: int
    providers: list[ProviderValidation] = field(default_factory=list)
    optimized_quantized: list[str] = field(default_factory=list)   # quantized op types in the optimized model
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_clean(asdict(self))

    def provider(self, name: str) -> ProviderValidation | None:
        return next((p for p in self.providers if p.provider == name), None)

    def table(self) -> str:
        lines = [f"original  {self.original}", f"optimized {self.optimized}", f"data      {self.data}"]
        rows = [("provider", "samples", "top-1 agr", "top-5 agr", "SQNR dB", "cosine", "max|diff|",
                 "acc before", "acc after", "drop")]
        skipped = []
        for p in self.providers:
            if p.skipped:
                skipped.append(p)
                continue
            rows.append((p.provider, str(p.samples), _pct(p.top1_agreement), _pct(p.top5_agreement),
                         _f(p.sqnr_db, ".1f"), _f(p.cosine, ".5f"), _f(p.max_abs_diff, ".3g"),
                         _pct(p.accuracy_before), _pct(p.accuracy_after),
                         "-" if p.accuracy_drop is None else f"{100 * p.accuracy_drop:.2f} pt"))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for j, r in enumerate(rows):
                lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))).rstrip())
                if j == 0:
                    lines.append("  ".join("-" * w for w in widths))
        for p in skipped:
            lines.append(f"[{p.provider}] skipped: {p.skipped}")
        for p in self.providers:
            if p.note and not p.skipped:
                lines.append(f"[{p.provider}] note: {p.note}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


# ------------------------------------------------------------------------------------------ validate
def validate(original, optimized, data, providers: Sequence[str] = ("cpu",), labels=None, preprocess=None,
             input_shape: dict[str, Sequence[int]] | None = None, samples: int | None = None,
             batch_size: int = 16, seed: int = 0, output_index: int = 0, force: bool = False) -> ValidationReport:
    """Compare `optimized` with `original` (paths or ModelProtos) on `data` on every provider. Models whose
    inputs or outputs differ (names, element types, static shapes) are refused unless `force`."""
    orig_name = str(original) if not isinstance(original, onnx.ModelProto) else "<original model>"
    opt_name = str(optimized) if not isinstance(optimized, onnx.ModelProto) else "<optimized model>"
    m0 = original if isinstance(original, onnx.ModelProto) else load_model(original)
    m1 = optimized if isinstance(optimized, onnx.ModelProto) else load_model(optimized)
    ins0 = [i.name for i in m0.graph.input if i.name not in {t.name for t in m0.graph.initializer}]
    ins1 = [i.name for i in m1.graph.input if i.name not in {t.name for t in m1.graph.initializer}]
    from .ir.signature import io_mismatch

    mismatch = io_mismatch(m0, m1)
    if mismatch and not force:
        raise UserError(f"{mismatch}: not an optimized copy of the original? (--force compares them anyway)")
    if ins0 != ins1:
        raise UserError(f"the models' inputs differ: {', '.join(ins0)} vs {', '.join(ins1)}")
    shapes = input_shapes(m0, {k: tuple(v) for k, v in (input_shape or {}).items()})
    if not shapes:
        raise UserError("model has no inputs")
    ds = open_for_model(data, m0, shapes, preprocess=preprocess, labels=labels, limit=samples, seed=seed)
    q = has_quantized_ops(m1)
    rep = ValidationReport(original=orig_name, optimized=opt_name, data=getattr(ds, "description", str(data)),
                           labelled=bool(getattr(ds, "has_labels", False)), samples=len(ds),
                           optimized_quantized=q)
    if getattr(ds, "kind", "") == "random":
        rep.notes.append("random inputs (not real data): agreement and SQNR say little about accuracy")
    if mismatch:
        rep.notes.append(f"forced: {mismatch}")
    if labels is not None and not rep.labelled:
        rep.notes.append("labels were given but the data source did not use them")

    s0, s1 = _serialize(m0), _serialize(m1)
    for prov in providers:
        pv = ProviderValidation(provider=prov, skipped=provider_status(prov))
        rep.providers.append(pv)
        if pv.skipped:
            continue
        if prov == "cuda" and q:
            pv.note = CUDA_INT8_NOTE
        try:
            a, b = make_session(s0, prov), make_session(s1, prov)
        except ProviderUnavailable as e:
            pv.skipped = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - e.g. CUDA EP present but no device: report, keep going
            pv.skipped = f"cannot create a session: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}"
            continue
        if fell_back(a, prov) or fell_back(b, prov):
            pv.skipped = (f"the {prov} session fell back to CPUExecutionProvider (its provider library did not "
                          f"load: CUDA/cuDNN libraries missing?)")
            pv.note = None
            continue
        acc = FidelityAccumulator()
        from .ir.shapes import fixed_batch

        bs = fixed_batch(m1, ins0[0]) or batch_size   # either model may fix the batch
        for feeds, lab in inputs_for_model(m0, ds, batch_size=bs):
            ya, yb = a.run(None, feeds)[output_index], b.run(None, feeds)[output_index]
            if ya.shape != yb.shape:
                raise UserError(f"output {output_index} has shape {list(ya.shape)} in the original and "
                                f"{list(yb.shape)} in the optimized model: cannot compare them")
            acc.update(ya, yb, lab)
        f = acc.result(prov, rep.data)
        for k in fields(Fidelity):
            setattr(pv, k.name, getattr(f, k.name))
    if q and any(p == "cuda" for p in providers):
        rep.notes.append(CUDA_INT8_NOTE)
    return rep


def _serialize(m: onnx.ModelProto):
    """The model for ORT; models over 2 GB go through a temporary file (kept for the process lifetime)."""
    if m.ByteSize() < 2**31 - 1:
        return m
    import tempfile

    td = tempfile.mkdtemp(prefix="onnxcompress-val-")
    p = Path(td) / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, location="m.data")
    return str(p)
