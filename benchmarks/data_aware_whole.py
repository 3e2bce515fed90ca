"""Whole-network evidence for `--data-aware` (issue 13): plain vs data-aware factors on entire models, through
`onnxcompress.optimize` (the path users run), calibration and evaluation on disjoint data.

* MobileNetV2, torchvision's ImageNet weights (BN folded), every 1×1 conv SVD'd (34 layers, exact ranks:
  rank_multiple 1) at parameter ratios 1.25 / 1.5 / 2. Calibration: 128 crops of the 11 CALIB_PHOTOS;
  evaluation: 128 crops of the 10 *other* EVAL_PHOTOS (benchmarks/mobilenetv2_svd.py; crops, flips and
  brightness jitter happen within one side of the split only).
* The default model models/digits_cnn.onnx, Tucker2 (+ SVD of its 1×1 shortcuts) at 2x and 3x, calibration
  models/digits_calib.npz (64), evaluation the labelled models/digits_test.npz (360): accuracy too.
* The transformer encoder of benchmarks/transformer_svd.py (8 MatMul/Gemm layers, SVD 2x / 3x), 256
  calibration / 256 other evaluation sequences.

Plain = `Recipe(method=…, ratio=…, quantize="none", rank_multiple=1)`; data-aware = the same with
`data_aware=True` (the pipeline holds every 4th calibration sample out of the fit; per layer the plain,
plain + bias correction and damped compensating factors are scored on those held-out rows). `--no-refit` adds
rows with `data_aware_refit=False` (inputs from the original model). Metrics: the report's fidelity on the
evaluation data (logits SQNR, top-1 agreement, accuracy with labels).

    python benchmarks/data_aware_whole.py [--models mobilenetv2 digits transformer] [--no-refit]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


class ArrayData:
    """A Dataset over in-memory arrays (optionally labelled)."""

    def __init__(self, x: np.ndarray, description: str, y: np.ndarray | None = None, kind: str = "array"):
        self.x, self.y, self.description, self.source, self.kind = x, y, description, description, kind
        self.has_labels = y is not None

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size: int = 1):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], (None if self.y is None else self.y[i:i + batch_size])


def run(model, cal, ev, label: str, variant: str, **recipe) -> dict:
    from onnxcompress import Recipe, optimize

    da = variant != "plain"
    rec = Recipe(quantize="none", rank_multiple=1, latency_guard=False, verify=False, data_aware=da,
                 data_aware_refit=variant != "data-aware --no-refit", calibration_samples=len(cal),
                 eval_samples=len(ev), **recipe)
    t0 = time.perf_counter()
    rep = optimize(model, rec, calibration=cal, eval_data=ev).report
    f = rep.fidelity
    r = {"model": label, "ratio": recipe["ratio"], "factors": variant, "sqnr_db": round(f["sqnr_db"], 2),
         "top1": round(f["top1_agreement"], 3),
         "acc": None if f.get("accuracy_after") is None else round(f["accuracy_after"], 3),
         "acc_ref": None if f.get("accuracy_before") is None else round(f["accuracy_before"], 3),
         "layers": rep.model["decomposed_layers"], "seconds": round(time.perf_counter() - t0, 1)}
    d = rep.model.get("data_aware")
    if d:
        kinds = [l["kept"].split("(")[0] for l in d["layers"]]
        r.update({"kept": {k: kinds.count(k) for k in ("plain", "plain+bias", "da")},
                  "fell_back": [(l["name"], l["reason"]) for l in d["layers"] if l["fell_back"]],
                  "heldout_net_db": [round(d["net_db_plain"], 2), round(d["net_db_final"], 2)],
                  "pass_seconds": next(p.seconds for p in rep.passes if p.name == "DataAware"),
                  "da_seconds": d["seconds"]})
    print(json.dumps(r), flush=True)
    return r


def rows_for(model, cal, ev, label, ratios, variants, **recipe) -> list[dict]:
    return [run(model, cal, ev, label, v, ratio=ratio, **recipe) for ratio in ratios for v in variants]


def mobilenetv2(ratios, variants):
    import mobilenetv2_svd as mb

    from onnxcompress.zoo import cache_dir

    path = cache_dir() / "mobilenetv2-imagenet-folded.onnx"
    if not path.is_file():
        mb.export_mobilenetv2(path)
    cal, ev = mb.datasets(128, 128, "photos")
    return rows_for(str(path), cal, ev, "MobileNetV2 (all 34 1x1 convs, SVD)", ratios, variants, method="svd")


def digits(ratios, variants):
    cal, te = np.load(ROOT / "models" / "digits_calib.npz"), np.load(ROOT / "models" / "digits_test.npz")
    return rows_for(str(ROOT / "models" / "digits_cnn.onnx"), ArrayData(cal["x"], "digits calib (64)"),
                    ArrayData(te["x"], "digits test (360, labelled)", te["y"]), "digits CNN (Tucker2 + SVD 1x1)",
                    ratios, variants, method="tucker2")


def transformer(ratios, variants):
    import transformer_svd as ts

    path = ts.export(Path(tempfile.mkdtemp()) / "encoder.onnx")
    cal, ev = ArrayData(ts.tokens(256, 1), "256 sequences"), ArrayData(ts.tokens(256, 2), "256 other sequences")
    return rows_for(str(path), cal, ev, "transformer encoder (8 MatMul/Gemm, SVD)", ratios, variants,
                    method="svd", input_shape={"x": [1, ts.L, ts.D]})


def table(rows) -> str:
    out = [("| model | ratio | factors | SQNR dB | top-1 agr. | accuracy | kept plain / +bias / DA | held-out net dB "
            "plain → kept | s (DataAware pass) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r.get("kept")
        kept = f"{k['plain']} / {k['plain+bias']} / {k['da']}" if k else ""
        acc = f"{r['acc']:.3f} (orig {r['acc_ref']:.3f})" if r.get("acc") is not None else "-"
        net = f"{r['heldout_net_db'][0]:.2f} → {r['heldout_net_db'][1]:.2f}" if r.get("heldout_net_db") else ""
        secs = f"{r['seconds']}" + (f" ({r['pass_seconds']:.1f})" if r.get("pass_seconds") is not None else "")
        out.append(f"| {r['model']} | {r['ratio']:g} | {r['factors']} | {r['sqnr_db']:.2f} | {r['top1']:.3f} | "
                   f"{acc} | {kept} | {net} | {secs} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits", "transformer", "mobilenetv2"])
    ap.add_argument("--no-refit", action="store_true", help="also data-aware with --no-refit")
    ap.add_argument("--out", default="benchmarks/out/data_aware_whole.json")
    a = ap.parse_args(argv)
    variants = ["plain", "data-aware"] + (["data-aware --no-refit"] if a.no_refit else [])
    runs = {"mobilenetv2": (mobilenetv2, [1.25, 1.5, 2.0]), "digits": (digits, [2.0, 3.0]),
            "transformer": (transformer, [2.0, 3.0])}
    rows = []
    for m in a.models:
        fn, ratios = runs[m]
        rows += fn(ratios, variants)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))


if __name__ == "__main__":
    sys.exit(main())
