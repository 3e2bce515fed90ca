#!/usr/bin/env python
"""INT8 time of a factorized ResNet downsampling block's residual Add before and after the Fuse pass's
``merge_parallel_1x1_add`` (two SVD chains' last factors + Add -> Concat + one 1x1 conv), per ResNet-50 stage.

    python benchmarks/bench_parallel_merge.py [--runs 60] [--threads 1]

Per stage (the ranks Tucker2 3x's SVD chains get at the CPU rank multiple): x -> (1x1 C0->r1, 1x1 C0->r2) ->
(1x1 r1->T, 1x1 r2->T, Add) -> Relu; the merged model is made from it by passes/fuse.merge_parallel_1x1_add. Both
are quantized by ort.quantize.quantize_qdq (QDQ, uint8 activations, per-channel int8 weights; ORT fuses to
QLinearConv / QLinearAdd / QLinearConcat), timed in one process, interleaved, fastest run of each. The two leading
1x1 convs are common to both models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxcompress.ort.quantize import int8_format_for, quantize_qdq  # noqa: E402
from onnxcompress.ort.session import make_session  # noqa: E402
from onnxcompress.ort.timing import time_interleaved  # noqa: E402
from onnxcompress.passes.fuse import merge_parallel_1x1_add  # noqa: E402

# (r1, r2, T, hw, C0): conv3's and the downsample's SVD ranks, output width, resolution, block input width
STAGES = [(16, 16, 256, 56, 64), (32, 64, 512, 28, 128), (64, 112, 1024, 14, 256), (128, 224, 2048, 7, 512)]


def block(r1: int, r2: int, T: int, hw: int, C0: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    ini, nodes = [], []

    def conv(name, x, cin, cout, y, bias=True):
        ini.append(numpy_helper.from_array((rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32),
                                           name + "_W"))
        ins = [x, name + "_W"]
        if bias:
            ini.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, name + "_B"))
            ins.append(name + "_B")
        nodes.append(helper.make_node("Conv", ins, [y], name=name, kernel_shape=[1, 1]))
    conv("/conv3/Conv/svd_in", "x", C0, r1, "z1", False)
    conv("/down/Conv/svd_in", "x", C0, r2, "z2", False)
    conv("/conv3/Conv/svd_out", "z1", r1, T, "y1")
    conv("/down/Conv/svd_out", "z2", r2, T, "y2")
    nodes += [helper.make_node("Add", ["y1", "y2"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["out"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C0, hw, hw])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, T, hw, hw])], ini)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


class Reader:
    def __init__(self, C0, hw):
        self.i, self.C0, self.hw = 0, C0, hw

    def get_next(self):
        self.i += 1
        if self.i > 4:
            return None
        return {"x": np.abs(np.random.default_rng(self.i).standard_normal((1, self.C0, self.hw, self.hw))).astype(np.float32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    fmt = int8_format_for("cpu")
    for (r1, r2, T, hw, C0) in STAGES:
        add = block(r1, r2, T, hw, C0)
        merged, rec = merge_parallel_1x1_add(add, {"x": (1, C0, hw, hw)})
        assert len(rec) == 1
        ss = [make_session(quantize_qdq(m, Reader(C0, hw), fmt)[0], "cpu", threads=args.threads) for m in (add, merged)]
        x = {"x": np.abs(np.random.default_rng(9).standard_normal((1, C0, hw, hw))).astype(np.float32)}
        t = time_interleaved([lambda s=s: s.run(None, x) for s in ss], 5, args.runs)
        a, b = np.min(t[0]) * 1e6, np.min(t[1]) * 1e6
        print(f"r1={r1:3d} r2={r2:3d} T={T:4d} @{hw:2d}x{hw:<2d}: two 1x1 + Add {a:6.0f} us, Concat + one 1x1 {b:6.0f} us: "
              f"{a / b:.2f}x (fastest of {args.runs} interleaved runs, {args.threads} thread(s); the two leading 1x1 "
              f"convs included in both)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
