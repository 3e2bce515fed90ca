"""Allocation for every method on the shipped digits CNN (real data): uniform vs later-first vs sensitivity,
for tucker2, cp4, cp3 and svd, FP32 and + INT8, at the same overall weight ratio of the layers each method
takes. Before the single planner, cp4/cp3/svd refused later-first and sensitivity.

* sensitivity curves are measured on the fly on the 64 calibration images (training split);
* accuracy on the 360 held-out test images; latency guard off and --rank-multiple 1 (pure allocation effect);
* `ratio` = achieved weights ratio over the layers the method rewrote or was asked to plan.

    python benchmarks/allocation_by_method.py [--ratio 2] [--methods tucker2,cp4,cp3,svd]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = str(ROOT / "models" / "digits_test.npz")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--methods", default="tucker2,cp4,cp3,svd")
    ap.add_argument("--allocations", default="uniform,later-first,sensitivity")
    a = ap.parse_args()
    from onnxcompress import Recipe, optimize

    print(f"digits CNN, ratio {a.ratio:g}; accuracy on 360 held-out test images (FP32 original "
          f"99.72%); ratio = weights before/after over the planned layers")
    print("| method | allocation | layers rewritten | ratio | FP32 acc | INT8 acc | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method in a.methods.split(","):
        for alloc in a.allocations.split(","):
            row = []
            for quant in ("none", "int8"):
                t0 = time.perf_counter()
                r = Recipe(method=method, quantize=quant, ratio=a.ratio, allocation=alloc, calibration=CALIB,
                           eval_data=TEST, latency_guard=False, rank_multiple=1, seed=0)
                rep = optimize(MODEL, r).report
                planned = [l for l in rep.layers if l["method"] not in ("-", None) and l["skipped"] in (
                    None, "left for the global target (later-first)", "kept by the sensitivity allocation")]
                done = [l for l in planned if l["skipped"] is None]
                before = sum(l["params_before"] for l in planned)
                after = sum(l["params_after"] if l["skipped"] is None else l["params_before"] for l in planned)
                row.append((len(done), before / max(after, 1), 100 * rep.fidelity["accuracy_after"],
                            time.perf_counter() - t0))
            (n, ratio, acc32, s1), (_, _, acc8, s2) = row
            print(f"| {method} | {alloc} | {n} | {ratio:.2f}x | {acc32:.2f}% | {acc8:.2f}% | {s1 + s2:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
