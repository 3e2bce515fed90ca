"""ResNet-50 on ONNX Runtime CPU, 1 thread: FP32 vs INT8 vs Tucker2 2x/3x vs Tucker2 + INT8, side by side.

    python benchmarks/bench_latency.py [--quick] [--runs 20] [--warmup 5] [--threads 1] [--json FILE]
                                       [--no-guard-variant] [--profile]

torchvision ResNet-50 with random weights (exported once into the onnxcompress cache; ``--quick``: ResNet-18)
is optimized by ``onnxcompress.optimize`` into each variant (calibration on random inputs: timing does not
depend on the weights' values), and all variants are then timed in one process by
``onnxcompress.ort.timing.bench`` (sessions built once, no pool spinning between interleaved multi-thread sessions,
warm-up, interleaved round-robin runs). Printed per variant: median and p90 latency, speedup vs FP32, MACs vs FP32,
the fraction of the INT8 variants' ceiling (speedup / (MAC reduction x INT8-alone speedup), same run), how many
layers the latency guard kept as the original conv, and how many Conv / Add nodes ORT actually runs as integer
kernels (counted in the graph ORT executes, after its own fusions). ``--profile``: ORT's per-op time breakdown of
the fastest variant (``ort.timing.profile_nodes``); per-layer chain profiles: ``benchmarks/profile_ops.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from onnxcompress import Recipe, optimize  # noqa: E402
from onnxcompress.ort.timing import bench, ort_kernels  # noqa: E402
from onnxcompress.ir.shapes import input_shapes
from onnxcompress.ir.counts import model_macs  # noqa: E402
from onnxcompress.zoo import cached_export  # noqa: E402


def variants(no_guard: bool) -> list[tuple[str, Recipe | None]]:
    common = dict(calibration="random", calibration_samples=8, eval_samples=4)
    v = [("FP32", None),
         ("INT8", Recipe(method="none", quantize="int8", **common)),
         ("Tucker2 2x", Recipe(method="tucker2", ratio=2, quantize="none", **common)),
         ("Tucker2 3x", Recipe(method="tucker2", ratio=3, quantize="none", **common)),
         ("Tucker2 2x+INT8", Recipe(method="tucker2", ratio=2, quantize="int8", **common)),
         ("Tucker2 3x+INT8", Recipe(method="tucker2", ratio=3, quantize="int8", **common))]
    if not no_guard:
        v.append(("Tucker2 3x+INT8 no guard",
                  Recipe(method="tucker2", ratio=3, quantize="int8", latency_guard=False, **common)))
    return v


def profile(path: str, threads: int, runs: int = 10) -> list[tuple[str, float, int]]:
    from onnxcompress.ort.timing import profile_nodes

    prof = profile_nodes(path, threads, runs=runs)
    return [(op, us / 1e3, n) for op, (us, n) in prof.by_op("median").items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 instead of ResNet-50")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--no-guard-variant", action="store_true", help="skip the Tucker2 3x+INT8 run without guard")
    ap.add_argument("--profile", action="store_true", help="ORT per-op breakdown of the fastest variant")
    ap.add_argument("--keep", help="keep the optimized models in this folder")
    args = ap.parse_args()

    name = "resnet18" if args.quick else "resnet50"
    t0 = time.perf_counter()
    src = str(cached_export(name))
    print(f"{name}: {src} ({time.perf_counter() - t0:.1f}s)", flush=True)
    base = onnx.load(src)
    shapes = input_shapes(base)
    macs0 = model_macs(base, shapes)

    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnxcompress-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, recipe in variants(args.no_guard_variant):
        if recipe is None:
            rows.append({"variant": label, "path": src, "macs": macs0, "optimize_s": 0.0, "guard_kept_conv": None,
                         "decomposed": 0})
            continue
        t0 = time.perf_counter()
        res = optimize(src, recipe)
        dt = time.perf_counter() - t0
        p = out_dir / (label.replace(" ", "_").replace("+", "_") + ".onnx")
        onnx.save(res.model, p)
        rep = res.report.to_dict()
        guard = (rep.get("latency") or {}).get("guard")
        rows.append({"variant": label, "path": str(p), "macs": rep["model"]["macs_after"], "optimize_s": dt,
                     "decomposed": rep["model"].get("decomposed_layers", 0),
                     "guard_kept_conv": guard["kept_conv"] if guard else None,
                     "guard_seconds": guard["seconds"] if guard else None,
                     "float_ops_left": rep["quantization"].get("float_ops_left"),
                     "top1_agreement_random": (rep.get("fidelity") or {}).get("top1_agreement")})
        print(f"  optimized {label:26s} {dt:6.1f}s  decomposed {rows[-1]['decomposed']:2d} layers"
              + (f", guard kept {guard['kept_conv']} conv(s) ({guard['seconds']:.1f}s timing)" if guard else ""),
              flush=True)

    for r in rows:
        r["kernels"] = ort_kernels(r["path"], "cpu", args.threads)
    print(f"timing {len(rows)} models, {args.threads} thread(s), warm-up {args.warmup}, {args.runs} interleaved "
          f"runs ...", flush=True)
    b = bench([r["path"] for r in rows], ["cpu"], threads=args.threads, warmup=args.warmup, runs=args.runs,
              names=[r["variant"] for r in rows])
    timings = b.providers[0].models
    print()
    fmin = timings[0].min_ms
    hdr = (f"{'variant':26s} {'median ms':>9s} {'p90 ms':>8s} {'min ms':>7s} {'speedup':>8s} {'(min)':>6s} "
           f"{'MACs':>7s} {'ceil.frac':>9s} {'decomp':>6s} "
           f"{'guard':>5s} {'int Conv':>9s} {'int Add':>8s}")
    print(hdr)
    print("-" * len(hdr))
    int8_sp = next((t.speedup for r, t in zip(rows, timings) if r["variant"] == "INT8"), None)
    for r, t in zip(rows, timings):
        k = r["kernels"]
        frac = (t.speedup / (macs0 / r["macs"] * int8_sp) if int8_sp and t.speedup and r["macs"]
                and "INT8" in r["variant"] else None)
        r["ceiling_fraction"] = frac
        r.update({"median_ms": t.median_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms, "speedup": t.speedup,
                  "speedup_min": fmin / t.min_ms, "macs_ratio": macs0 / r["macs"] if r["macs"] else None})
        nconv, nadd = k["conv_int"] + k["conv_float"], k["add_int"] + k["add_float"]
        print(f"{r['variant']:26s} {t.median_ms:9.2f} {t.p90_ms:8.2f} {t.min_ms:7.2f} {t.speedup:7.2f}x "
              f"{r['speedup_min']:5.2f}x "
              f"{r['macs_ratio']:6.2f}x {'-' if frac is None else f'{frac:.3f}':>9s} {r['decomposed']:6d} "
              f"{'-' if r['guard_kept_conv'] is None else r['guard_kept_conv']:>5} "
              f"{k['conv_int']:>4d}/{nconv:<4d} {k['add_int']:>3d}/{nadd:<4d}")
    print("\nspeedup = median(FP32) / median(variant), (min): the same with the fastest runs; MACs = FP32 MACs / variant MACs; "
          "ceil.frac = speedup / (MACs x INT8-alone speedup), same run; guard = layers the "
          "latency guard kept as the original conv; int Conv/Add = nodes ORT runs as integer kernels / all")
    prof = None
    if args.profile:
        best = max(rows, key=lambda r: r["speedup"] or 0)
        prof = profile(best["path"], args.threads)
        print(f"\nwhere the time goes in {best['variant']} (ORT profiling, per run):")
        tot = sum(t for _, t, _ in prof)
        for op, t, n in prof[:10]:
            print(f"  {op:28s} {t:7.2f} ms  {100 * t / tot:5.1f}%  ({n} nodes)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "threads": args.threads, "bench": b.to_dict(),
                                               "variants": rows, "profile": prof}, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
