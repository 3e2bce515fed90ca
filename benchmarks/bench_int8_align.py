#!/usr/bin/env python
"""INT8 (ORT CPU, QLinearConv) time of factorized convs across ranks: which rank multiple the integer kernels want
(the CPU default of planning.planner.CPU_MULTIPLE), and how far below the original conv's MAC rate thin chains run.

    python benchmarks/bench_int8_align.py [--threads 1] [--runs 25] [--shapes resnet50,digits] [--json FILE]

For each layer shape — real ResNet-50 ones and the digits CNN's (models/digits_cnn.onnx: 32-128 channels at 8x8 and
4x4) — one-layer INT8 models (uint8 activations, per-channel int8 weights, DQ -> Conv -> Q, which ORT fuses to
QLinearConv; planning.latency_guard.layer_model) of the original conv and of its chain at every rank r of a sweep
(SVD of a 1x1: S->r, r->T; Tucker2 of a kxk: S->r, r->r kxk, r->T) are timed in one process, interleaved
round-robin, fastest run of each kept (preemption on a shared machine only adds time). Printed per rank: chain time,
MACs, speedup over the conv and efficiency = speedup / MAC reduction (1.0: the chain runs at the conv's MAC rate).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from onnxcompress.decompose.costs import ConvSpec  # noqa: E402
from onnxcompress.ort.session import make_session  # noqa: E402
from onnxcompress.ort.timing import time_interleaved  # noqa: E402
from onnxcompress.planning.latency_guard import layer_model  # noqa: E402

ONE = (1, 1)
Z = (0, 0, 0, 0)
# name, input (N,C,H,W), S, T, kernel, stride, ranks
SHAPES = {
    "resnet50": [
        ("l1 conv1 1x1 256->64 @56", (1, 256, 56, 56), 256, 64, 1, 1, [8, 12, 16, 20, 24, 28, 32, 40, 48]),
        ("l1 conv2 3x3 64->64 @56", (1, 64, 56, 56), 64, 64, 3, 1, [8, 12, 16, 20, 24, 28, 32, 40, 48]),
        ("l3 conv1 1x1 1024->256 @14", (1, 1024, 14, 14), 1024, 256, 1, 1, [48, 56, 64, 72, 80, 88, 96]),
        ("l3 conv2 3x3 256->256 @14", (1, 256, 14, 14), 256, 256, 3, 1, [56, 64, 72, 80, 88, 96, 104, 112]),
    ],
    "digits": [
        ("digits s1 3x3 32->32 @8", (1, 32, 8, 8), 32, 32, 3, 1, [8, 12, 16, 20, 24]),
        ("digits s2 3x3 64->64 @4", (1, 64, 4, 4), 64, 64, 3, 1, [8, 16, 24, 32, 40]),
        ("digits s3 3x3 128->128 @2", (1, 128, 2, 2), 128, 128, 3, 1, [16, 24, 32, 40, 48, 56, 64]),
    ],
}


def chain(S, T, k, stride, r):
    kk, st, pads = (k, k), (stride, stride), (k // 2,) * 4
    if k == 1:
        return [ConvSpec(S, r, ONE, st, Z, ONE), ConvSpec(r, T, ONE, ONE, Z, ONE, bias=True)]
    return [ConvSpec(S, r, ONE, ONE, Z, ONE), ConvSpec(r, r, kk, st, pads, ONE), ConvSpec(r, T, ONE, ONE, Z, ONE, bias=True)]


def macs(in_shape, convs):
    h, w = in_shape[2:]
    tot = 0
    for c in convs:
        h = (h + c.pads[0] + c.pads[2] - c.kernel[0]) // c.strides[0] + 1
        w = (w + c.pads[1] + c.pads[3] - c.kernel[1]) // c.strides[1] + 1
        tot += c.out_ch * c.in_ch * c.kernel[0] * c.kernel[1] * h * w
    return tot


def run_shape(in_shape, S, T, k, stride, ranks, threads, runs):
    orig = [ConvSpec(S, T, (k, k), (stride, stride), (k // 2,) * 4, ONE, bias=True)]
    models = [("conv", orig)] + [(f"r={r}", chain(S, T, k, stride, r)) for r in ranks]
    x = np.random.default_rng(0).integers(0, 255, in_shape).astype(np.uint8)
    runners = []
    with tempfile.TemporaryDirectory() as td:
        for i, (_, convs) in enumerate(models):
            p = Path(td) / f"m{i}.onnx"
            onnx.save(layer_model(in_shape, convs, "int8"), p)
            s = make_session(str(p), "cpu", threads=threads)
            name = s.get_inputs()[0].name
            runners.append(lambda s=s, name=name: s.run(None, {name: x}))
        t = time_interleaved(runners, warmup=3, runs=runs)
    tmin = [float(np.min(v)) for v in t]
    m0 = macs(in_shape, orig)
    return [{"label": label, "us_min": a * 1e6, "us_median": float(np.median(v)) * 1e6, "macs": macs(in_shape, c),
             "mac_reduction": m0 / macs(in_shape, c), "speedup": tmin[0] / a,
             "efficiency": (tmin[0] / a) / (m0 / macs(in_shape, c))}
            for (label, c), a, v in zip(models, tmin, t)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--shapes", default="resnet50,digits")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    for group in args.shapes.split(","):
        for name, in_shape, S, T, k, stride, ranks in SHAPES[group]:
            rows = run_shape(in_shape, S, T, k, stride, ranks, args.threads, args.runs)
            out[name] = rows
            print(f"\n{name}   ({args.threads} thread(s), fastest of {args.runs} interleaved runs)")
            print(f"  {'':8s} {'us':>8s} {'(median)':>9s} {'MACs M':>8s} {'MACx':>6s} {'speedup':>8s} {'eff':>5s}")
            for r in rows:
                print(f"  {r['label']:8s} {r['us_min']:8.1f} {r['us_median']:9.1f} {r['macs'] / 1e6:8.2f} "
                      f"{r['mac_reduction']:6.2f} {r['speedup']:7.2f}x {r['efficiency']:5.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
