#!/usr/bin/env python
"""Scale: `optimize` time and peak RSS against the model's size — params vs seconds vs peak RSS, up to a > 2 GB
model with external data.

    python benchmarks/bench_scale.py [--sizes 4,8,16,32,60] [--width 1024] [--vgg16] [--checkouts after=.]
                                     [--method none|tucker2] [--ratio 2] [--samples 8] [--rss-limit-mb 12000]
                                     [--json FILE]

Models (random weights: kernel speed and memory do not depend on the values):
  * ``wide-L``: a plain CNN at 4x4 resolution: stem 3x3 conv 3->W, L 3x3 convs W->W with ReLU, global average
    pool, Gemm W->1000. Params ~ 9 L W^2: L scales the weights linearly at a fixed layer shape (constant work per
    layer: time should grow linearly). W=1024, L=60: 567 M params, 2.27 GB, stored with external data.
  * ``vgg16`` (``--vgg16``): torchvision VGG-16 exported with random weights (138 M params, 528 MB).

Each (model, checkout) runs `onnxcompress optimize M --method METHOD [--ratio R] --quantize int8 --calibration
random --calibration-samples N -o OUT` through profile_tool.py's child (the CLI's entry point; per-stage seconds
and RSS; peak = the kernel's VmHWM after the imports were loaded), sequentially; a child whose RSS passes
`--rss-limit-mb` stops itself (reported as failed). Printed: the curve params -> seconds, peak RSS, peak / model
size, per checkout, and a linear fit of seconds on params over the wide models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CACHE = Path(os.environ.get("ONNXCOMPRESS_CACHE") or Path.home() / ".cache" / "onnxcompress") / "scale"


def wide_model(L: int, W: int = 1024, hw: int = 4, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x, cin = [], [], "input", 3
    for i in range(L + 1):
        w = rng.standard_normal((W, cin, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2.0 / (9 * cin)))
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(np.zeros(W, np.float32),
                                                                                        f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], name=f"/conv{i}/Conv",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/relu{i}/Relu"))
        x, cin = f"r{i}", W
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="/gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="/flatten"))
    inits += [numpy_helper.from_array(rng.standard_normal((1000, W), dtype=np.float32) / np.float32(np.sqrt(W)),
                                      "fc.weight"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", transB=1))
    g = helper.make_graph(nodes, f"wide{L}x{W}", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 [1, 3, hw, hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def build_wide(L: int, W: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"wide{L}x{W}.onnx"
    if p.exists():
        return p
    m = wide_model(L, W)
    tmp = p.with_suffix(".tmp.onnx")
    if sum(t.ByteSize() for t in m.graph.initializer) > 2**31 - 2**24:
        onnx.save_model(m, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=p.name + ".data")
    else:
        onnx.save_model(m, tmp)
    os.replace(tmp, p)
    return p


def build_vgg16() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / "vgg16.onnx"
    if p.exists():
        return p
    code = (f"import torch, torchvision; torch.manual_seed(0); m = torchvision.models.vgg16(weights=None).eval(); "
            f"torch.onnx.export(m, (torch.zeros(1, 3, 224, 224),), {str(p) + '.tmp'!r}, dynamo=False, opset_version=17, "
            f"input_names=['input'], output_names=['logits'], do_constant_folding=True)")
    subprocess.run([sys.executable, "-c", code], check=True)
    os.replace(str(p) + ".tmp", p)
    return p


def params_of(p: Path) -> int:
    m = onnx.load(str(p), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,32,60", help="L values of the wide models ('' for none)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vgg16", action="store_true")
    ap.add_argument("--checkouts", default=f"after={HERE.parent}")
    ap.add_argument("--method", default="none")
    ap.add_argument("--ratio", type=float, default=2)
    ap.add_argument("--samples", default="8")
    ap.add_argument("--rss-limit-mb", type=float, default=12000)
    ap.add_argument("--json")
    args = ap.parse_args()
    from profile_tool import model_mb, run_child

    roots = {k: Path(v).resolve() for k, v in (c.split("=", 1) for c in args.checkouts.split(","))}
    models = [("vgg16", build_vgg16())] if args.vgg16 else []
    models += [(f"wide{L}x{args.width}", build_wide(L, args.width)) for L in (int(x) for x in args.sizes.split(",") if x)]
    rows = []
    env = {"ONNXCOMPRESS_RSS_LIMIT_MB": str(args.rss_limit_mb)}
    print(f"method {args.method}{f' --ratio {args.ratio:g}' if args.method != 'none' else ''} + INT8, "
          f"{args.samples} random calibration samples; load average {os.getloadavg()[0]:.1f}")
    for name, p in models:
        n, mb = params_of(p), model_mb(p)
        for label, root in roots.items():
            t0 = time.perf_counter()
            try:
                r = run_child(root, p, args.method, args.ratio, args.samples, env)
                row = {"model": name, "params": n, "file_mb": mb, "checkout": label, "seconds": r["total_s"],
                       "peak_mb": r["peak_mb"], "base_mb": r["base_mb"], "stages": r["stages"], "error": None}
            except Exception as e:  # noqa: BLE001 - a failure is a result here
                msg = str(e).strip().splitlines()
                row = {"model": name, "params": n, "file_mb": mb, "checkout": label,
                       "seconds": time.perf_counter() - t0, "peak_mb": None, "error": " | ".join(msg[-3:])[:400]}
            rows.append(row)
            pk = f"{row['peak_mb']:.0f} MB ({row['peak_mb'] / mb:.2f}x)" if row["peak_mb"] else "-"
            print(f"{name:14s} {n / 1e6:7.1f} M params {mb:8.0f} MB  [{label}] {row['seconds']:7.1f} s  peak {pk}"
                  f"  (load {os.getloadavg()[0]:.1f})" + (f"  FAILED: {row['error']}" if row["error"] else ""),
                  flush=True)
    for label in roots:
        ok = [r for r in rows if r["checkout"] == label and not r["error"] and r["model"].startswith("wide")]
        if len(ok) >= 2:
            x, y = np.array([r["params"] for r in ok], float), np.array([r["seconds"] for r in ok])
            a, b = np.polyfit(x, y, 1)
            print(f"  [{label}] wide models: seconds = {b:.1f} + {a * 1e6:.3f} per M params (max deviation from the "
                  f"line {np.max(np.abs(y - (a * x + b))):.1f} s); peak / model: "
                  + ", ".join(f"{r['peak_mb'] / r['file_mb']:.2f}x" for r in ok))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
