"""Accuracy vs overall decomposed-params ratio on the shipped digits CNN (real data, 99.72 % test accuracy):
uniform, later-first and sensitivity allocation, FP32 and + INT8.

* sensitivity curves: `onnxcompress analyze` on the 64 *calibration* images (training split; the test set
  is never used for any choice), full grid 1.5..8, with INT8 and TD+INT8 per layer;
* each point: `optimize` at --ratio R (uniform: every layer at R; later-first / sensitivity: R is the target
  for all decomposable layers together), latency guard and rank rounding off (pure allocation effect);
* x = achieved overall ratio = sum(original params of all decomposable layers) / sum(after), untouched layers
  counted at their original size; y = accuracy on the 360 test images (ORT CPU).

    python benchmarks/tradeoff_digits.py [--out DIR] [--ratios 1.5,2,3,4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"

ALLOCATIONS = [("uniform", {}), ("later-first", {"allocation": "later-first"}),
               ("sensitivity", {"allocation": "sensitivity"}),
               ("sensitivity/noise", {"allocation": "sensitivity", "sensitivity_metric": "noise"}),
               ("uniform+data-aware", {"data_aware": True}),
               ("sensitivity+data-aware", {"allocation": "sensitivity", "data_aware": True})]
#: the two 1x1 shortcut convs (SVD, not Tucker2) stay as they are: the comparison is about Tucker2 allocation
EXCLUDE = ["*shortcut*"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "tradeoff_digits"))
    ap.add_argument("--ratios", default="1.5,2,3,4")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, "blas")
    from onnxcompress import Recipe, optimize
    from onnxcompress.analysis.sweep import analyze
    from onnxcompress.analysis.outputs import render_summary, write_outputs

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = analyze(MODEL, str(CALIB), grid=[1.5, 2, 3, 4, 6, 8], samples=64, quantize="int8", jobs=a.jobs,
                  cache_dir=out / "cache", progress=False)
    write_outputs(res, out / "analyze")
    print(f"analyze on {res['settings']['samples']} calibration images: {time.perf_counter() - t0:.1f}s "
          f"({res['stats']['evaluated']} evaluated, {res['stats']['cached']} cached)")
    print(render_summary(res))
    sens = out / "analyze" / "analyze.json"
    dec_total = res["model"]["decomposable_params"]
    ratios = [float(r) for r in a.ratios.split(",")]
    rows = []
    for label, kw in ALLOCATIONS:
        for q in ("none", "int8"):
            for r in ratios:
                extra = {"sensitivity": str(sens)} if kw.get("allocation") == "sensitivity" else {}
                rec = Recipe(ratio=r, quantize=q, calibration=str(CALIB), calibration_samples=64,
                             eval_data=str(TEST), latency_guard=False, rank_multiple=1, exclude=EXCLUDE,
                             **kw, **extra)
                try:
                    rep = optimize(MODEL, rec).report.to_dict()
                except Exception as e:  # noqa: BLE001 - an optional mode that is not available here
                    print(f"{label} {q} R={r:g}: {type(e).__name__}: {str(e)[:120]}")
                    rows.append({"allocation": label, "quantize": q, "target": r, "achieved": float("nan"),
                                 "layers": 0, "accuracy": float("nan"), "before": float("nan"),
                                 "agreement": float("nan")})
                    continue
                done = [l for l in rep["layers"] if l["skipped"] is None and l.get("ranks")
                        and l["method"] == "tucker2"]
                after = dec_total - sum(l["params_before"] - l["params_after"] for l in done)
                f = rep["fidelity"]
                rows.append({"allocation": label, "quantize": q, "target": r, "achieved": dec_total / after,
                             "layers": len(done), "accuracy": f["accuracy_after"], "before": f["accuracy_before"],
                             "agreement": f["top1_agreement"]})
    base = next(x["before"] for x in rows if x["before"] == x["before"])
    print(f"\noriginal test accuracy {100 * base:.2f}% (360 images); cells: test accuracy % "
          f"[achieved overall decomposed-params ratio, layers decomposed]")
    print(f"{'allocation':24s} {'prec':5s}" + "".join(f"{'R=' + format(r, 'g'):>20s}" for r in ratios))
    for label, _ in ALLOCATIONS:
        for q in ("none", "int8"):
            cells = [x for x in rows if x["allocation"] == label and x["quantize"] == q]
            print(f"{label:24s} {'fp32' if q == 'none' else 'int8':5s}" + "".join(
                f"{100 * c['accuracy']:8.2f} [{c['achieved']:.2f}x,{c['layers']}]".rjust(20) for c in cells))
    _plot(rows, base, out / "tradeoff_digits.png")
    print(f"\nwrote {out / 'tradeoff_digits.png'} and {out / 'analyze'}/ ({time.perf_counter() - t0:.0f}s total)")
    return 0


def _plot(rows, base, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _ in ALLOCATIONS:
        for q, style in (("none", "-"), ("int8", "--")):
            pts = sorted((x["achieved"], 100 * x["accuracy"]) for x in rows
                         if x["allocation"] == label and x["quantize"] == q)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" + style, ms=4,
                    label=f"{label} {'FP32' if q == 'none' else '+INT8'}")
    ax.axhline(100 * base, color="k", lw=0.8, ls=":", label="original")
    ax.axhline(100 * base - 1, color="r", lw=0.8, ls=":", label="original - 1 point")
    ax.set_xlabel("overall decomposed-params ratio (all decomposable layers)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits CNN: Tucker2 allocation trade-off (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
