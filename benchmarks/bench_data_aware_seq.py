"""Speed of `--data-aware` (issue 13), side by side in one process, through `onnxcompress.optimize`: ResNet-18
(torchvision, random init; the pipeline folds BN), Tucker2 2x, 256 generated 224×224 calibration images
(bench_data_aware_pipeline.images; the pipeline fits on 192 and holds 64 out), judged on 32 other generated
images. Arms: `plain` (no --data-aware), `kron` (--data-aware, the default method), `als` (--data-aware-method
als), `no-refit` (--data-aware --no-refit). Prints each optimize call's wall time, the DataAware pass's time and
its breakdown, and the logits SQNR. Goal (issue 13): the data-aware run ≤ 60 s on 2 quiet cores.

    python benchmarks/bench_data_aware_seq.py [plain] [kron] [als] [no-refit]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    from bench_data_aware_pipeline import images, resnet18_onnx

    from onnxcompress import Recipe, optimize

    arms = (argv if argv is not None else sys.argv[1:]) or ["plain", "kron"]
    td = Path(tempfile.mkdtemp())
    path = resnet18_onnx(td / "r18.onnx")
    np.save(td / "cal.npy", images(256))
    np.save(td / "ev.npy", images(32, seed=7))
    out = {}
    for arm in arms:
        rec = Recipe(method="tucker2", ratio=2, quantize="none", latency_guard=False, verify=False,
                     calibration=str(td / "cal.npy"), calibration_samples=256, eval_data=str(td / "ev.npy"),
                     eval_samples=32, data_aware=arm != "plain", data_aware_method="als" if arm == "als" else "kron",
                     data_aware_refit=arm != "no-refit")
        t0 = time.perf_counter()
        rep = optimize(str(path), rec).report
        total = time.perf_counter() - t0
        d = rep.model.get("data_aware") or {}
        out[arm] = {"total_s": round(total, 1), "passes": {p.name: p.seconds for p in rep.passes},
                    "eval_sqnr_db (32 other generated images)": round(rep.fidelity["sqnr_db"], 2),
                    "data_aware_seconds": d.get("seconds"),
                    "heldout_net_db": [d.get("net_db_plain"), d.get("net_db_final")] if d else None,
                    "kept": sorted({l["kept"] for l in d.get("layers", [])}),
                    "fell_back": [l["name"] for l in d.get("layers", []) if l["fell_back"]]}
        print(arm, json.dumps(out[arm]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
