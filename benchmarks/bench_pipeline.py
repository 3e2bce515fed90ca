#!/usr/bin/env python
"""Issue-2 benchmark: `optimize` on ResNet-50 (Tucker2 2x + INT8, 16 calibration samples).

Prints wall time per pass, total time, and peak RSS (this process only: the model is exported in a child
process first), next to the model file size. With --naive, also runs the naive reference side by side in a
child process (tensorly partial_tucker per layer + quantize_static) so the two are compared in one run.

    python benchmarks/bench_pipeline.py [--model resnet50|resnet18] [--naive] [--no-verify]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def export(name: str) -> Path:
    code = f"from onnxcompress.zoo import cached_export; print(cached_export({name!r}, weights='none'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


NAIVE = r'''
import sys, time, resource, tempfile, numpy as np, onnx
from onnx import numpy_helper, helper
import tensorly as tl
from tensorly.decomposition import partial_tucker
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader
t0 = time.perf_counter()
m = onnx.load(sys.argv[1])
inits = {t.name: t for t in m.graph.initializer}
nodes = []
for n in m.graph.node:
    w = inits.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
    W = numpy_helper.to_array(w) if w is not None else None
    g = next((a.i for a in n.attribute if a.name == "group"), 1)
    if W is None or W.shape[2] * W.shape[3] == 1 or W.shape[1] <= 4 or g != 1:
        nodes.append(n); continue
    T, S, kh, kw = W.shape; k = kh * kw
    a, b = S * T * k, S * S + T * T
    kap = (-b + (b * b + 4 * a * a / 2) ** 0.5) / (2 * a)
    r3, r4 = max(1, round(kap * S)), max(1, round(kap * T))
    (core, (ut, us)), _ = partial_tucker(W.astype(np.float64), rank=[r4, r3], modes=[0, 1], init="svd", n_iter_max=50, tol=1e-6)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    nm = n.name
    m.graph.initializer.extend([numpy_helper.from_array(us.T.reshape(r3, S, 1, 1).astype(np.float32), nm + "_a"),
                                numpy_helper.from_array(core.astype(np.float32), nm + "_b"),
                                numpy_helper.from_array(ut.reshape(T, r4, 1, 1).astype(np.float32), nm + "_c")])
    nodes += [helper.make_node("Conv", [n.input[0], nm + "_a"], [nm + "_z1"], kernel_shape=[1, 1]),
              helper.make_node("Conv", [nm + "_z1", nm + "_b"], [nm + "_z2"], **attrs),
              helper.make_node("Conv", [nm + "_z2", nm + "_c"] + list(n.input[2:]), list(n.output), kernel_shape=[1, 1])]
del m.graph.node[:]; m.graph.node.extend(nodes)
t1 = time.perf_counter()
class R(CalibrationDataReader):
    def __init__(s): s.i = 0
    def get_next(s):
        s.i += 1
        return None if s.i > 16 else {m.graph.input[0].name: np.random.default_rng(s.i).standard_normal((1, 3, 224, 224)).astype(np.float32)}
with tempfile.TemporaryDirectory() as td:
    onnx.save(m, td + "/t.onnx")
    quantize_static(td + "/t.onnx", td + "/q.onnx", R(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
t2 = time.perf_counter()
print(f"NAIVE tucker {t1 - t0:.1f}s quantize {t2 - t1:.1f}s total {t2 - t0:.1f}s peak_rss "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB")
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--naive", action="store_true", help="also run the naive reference (slow)")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    path = export(args.model)
    size_mb = path.stat().st_size / 2**20
    rss0 = rss_mb()
    from onnxcompress import Recipe, optimize

    stamps = []
    t0 = time.perf_counter()
    res = optimize(str(path), Recipe(method="tucker2", ratio=2, quantize="int8", calibration="random",
                                     calibration_samples=16, eval_samples=4, verify=not args.no_verify,
                                     latency_guard=False),
                   progress=lambda msg: stamps.append((time.perf_counter() - t0, msg)))
    total = time.perf_counter() - t0
    rep = res.report
    print(f"model {args.model}: {path.name} {size_mb:.1f} MB")
    for p in rep.passes:
        ver = p.verified.get("seconds", 0.0)
        print(f"  pass {p.name:<14} {p.seconds:7.2f} s   (+ verification {ver:.2f} s)")
    print(f"  optimize total  {total:7.2f} s   (incl. fidelity on {rep.fidelity['samples']} samples)")
    print(f"  peak RSS        {rss_mb():7.0f} MB  (before optimize {rss0:.0f} MB; {rss_mb() / size_mb:.1f}x the file)")
    print(f"  decomposed ratio {rep.model.get('decomposed_ratio', 0):.3f}, params "
          f"{rep.model['params_before']} -> {rep.model['params_after']}")
    if args.naive:
        out = subprocess.run([sys.executable, "-c", NAIVE, str(path)], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("NAIVE")]
        print("  " + (line[0] if line else f"naive failed: {out.stderr[-300:]}"))
        if line:
            naive_total = float(line[0].split("total ")[1].split("s")[0])
            print(f"  speedup vs naive: {naive_total / total:.1f}x")
    print(json.dumps({"total_s": round(total, 2), "peak_rss_mb": round(rss_mb()), "file_mb": round(size_mb, 1),
                      "passes": {p.name: p.seconds for p in rep.passes}}))


if __name__ == "__main__":
    main()
