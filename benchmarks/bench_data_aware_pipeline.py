"""Pipeline-level speed of data-aware Tucker2: ResNet-18 (torchvision, random weights, BN folded by the
pipeline), `optimize --method tucker2 --data-aware --calibration <256 images>` on ORT CPU, FP32 out.

The 256 calibration images are generated (smooth random fields with ImageNet-like normalisation, seeded):
speed does not depend on their content. Reports wall time per pass and the data-aware breakdown (reference
pass, capture, solve, checks: passes/data_aware.SeqReport.seconds), and peak RSS. Target: ≤ 60 s on 2 cores.
Side by side with plain Tucker2: benchmarks/bench_data_aware_seq.py.

    python benchmarks/bench_data_aware_pipeline.py [--n 256] [--method kron|als] [--no-refit]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 224, 224), np.float32)
    for i in range(n):
        low = rng.standard_normal((3, 14, 14))
        out[i] = np.repeat(np.repeat(low, 16, axis=1), 16, axis=2) + 0.3 * rng.standard_normal((3, 224, 224))
    return out


def resnet18_onnx(path: Path) -> Path:
    """torchvision ResNet-18, random init (seed 0), legacy exporter, opset 17, dynamic batch, written to `path`."""
    import torch
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    torch.onnx.export(m, torch.randn(1, 3, 224, 224), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--method", default="kron")
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--plain", action="store_true", help="plain Tucker2 (no --data-aware) for comparison")
    a = ap.parse_args(argv)
    from onnxcompress.pipeline import optimize
    from onnxcompress.recipe import Recipe

    td = Path(tempfile.mkdtemp())
    path = resnet18_onnx(td / "resnet18.onnx")
    np.save(td / "cal.npy", images(a.n))
    rec = Recipe(method="tucker2", ratio=2, quantize="none", data_aware=not a.plain, data_aware_method=a.method,
                 data_aware_refit=not a.no_refit, calibration=str(td / "cal.npy"), calibration_samples=a.n,
                 eval_samples=16, latency_guard=False)
    t0 = time.perf_counter()
    r = optimize(str(path), rec, progress=lambda s: print(f"  [{time.perf_counter() - t0:6.1f}s] {s}", flush=True))
    total = time.perf_counter() - t0
    rep = r.report
    out = {"total_s": round(total, 1), "passes": {p.name: p.seconds for p in rep.passes},
           "data_aware": {k: v for k, v in (rep.model.get("data_aware") or {}).items() if k != "layers"},
           "decomposed_layers": rep.model["decomposed_layers"],
           "fidelity_sqnr_db": rep.fidelity["sqnr_db"],
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
