"""Speed of the `analyze` sweep: torchvision ResNet-18 (random weights, exported once to the onnxcompress
cache), every decomposable conv x 6 ratios + the global curve, on 64 generated 224x224 images, ORT CPU.
Target (issue 4): <= 5 minutes on 2 cores.

    python benchmarks/bench_analyze.py [--quick] [--jobs 2] [--samples 64] [--executor local|ray]

--quick: 4 layers x 2 ratios, 16 images (a smoke run). A fresh cache folder per run (nothing is reused),
unless --cache DIR is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--cache", help="reuse this cache folder (default: a fresh temporary one)")
    ap.add_argument("--out", help="also write analyze.json/csv/plots here")
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, "blas")
    from onnxcompress import zoo
    from onnxcompress.analysis.sweep import DEFAULT_GRID, analyze, model_layers
    from onnxcompress.analysis.outputs import render_summary, write_outputs
    from onnxcompress.ir.shapes import input_shapes
    from onnxcompress.ir.modelio import load_model

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    path = zoo.cached_export("resnet18", "imagenet", weights="none")
    t_export = time.perf_counter() - t0
    m = load_model(path)
    layers = [l.name for l in model_layers(m, input_shapes(m)) if l.decomposable]
    grid, samples, sel = list(DEFAULT_GRID), a.samples, None
    if a.quick:
        grid, samples, sel = [2, 4], min(a.samples, 16), layers[::4][:4]
    with tempfile.TemporaryDirectory() as td:
        cache = Path(a.cache) if a.cache else Path(td)
        t1 = time.perf_counter()
        res = analyze(path, "random", grid=grid, samples=samples, jobs=a.jobs, executor=a.executor,
                      cache_dir=cache, layers=sel, global_curve=not a.quick, progress=None)
        wall = time.perf_counter() - t1
    if a.out:
        write_outputs(res, a.out)
    st = res["stats"]
    rows = [r for r in res["measurements"] if not r.get("skipped")]
    per = sorted(r["seconds"] for r in rows if r.get("seconds") and not r.get("cached"))
    print(render_summary(res))
    print(f"\nResNet-18 (random weights, {path.name}; export/cache {t_export:.1f}s): {len(layers)} decomposable "
          f"convs, grid {grid}, {res['settings']['samples']} images, {a.jobs} job(s), executor {a.executor}")
    print(f"sweep: {st['tasks']} tasks ({st['evaluated']} evaluated) in {wall:.1f}s wall "
          f"(setup incl. reference outputs {st['seconds'] - st['run_seconds']:.1f}s, run {st['run_seconds']:.1f}s)")
    if per:
        print(f"per task (one worker): median {per[len(per) // 2]:.2f}s, min {per[0]:.2f}s, max {per[-1]:.2f}s, "
              f"sum {sum(per):.1f}s -> {sum(per) / max(st['run_seconds'], 1e-9):.2f} tasks in parallel on average")
    cpu = sorted(r["cpu_seconds"] for r in rows if r.get("cpu_seconds") and not r.get("cached"))
    if cpu:
        print(f"CPU seconds per task: median {cpu[len(cpu) // 2]:.2f}s, sum {sum(cpu):.1f}s (+ setup "
              f"{st['seconds'] - st['run_seconds']:.1f}s) -> {sum(cpu) / a.jobs + st['seconds'] - st['run_seconds']:.0f}s "
              f"wall on {a.jobs} idle cores")
    print(f"load average (1 min) before {load0:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"target <= 300 s: {'met' if wall <= 300 else 'NOT met'}" + (" (quick subset)" if a.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
