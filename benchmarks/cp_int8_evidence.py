"""CP4 + INT8 on real trained weights vs Tucker2 at the same parameter count (issue 3, item 6).

    python benchmarks/cp_int8_evidence.py [--ratios 2 3] [--kappa]

Model: models/digits_cnn.onnx (trained on sklearn digits; BN folded; the five 3x3 convs after the stem are
decomposed: the stem has S=1). Calibration: models/digits_calib.npz (64 training images); evaluation:
models/digits_test.npz (360 labelled test images). Everything runs on ONNX Runtime CPU; INT8 is the
pipeline's QuantizeInt8 (QDQ, uint8 activations per tensor, int8 weights per channel, MinMax).

For each ratio: CP4 variants (plain ALS with λ in the last conv; ALS + sqrt_size balancing; EPC + balancing;
EPC + balancing + data-free CLE; EPC + balancing + CLE + data-driven equalisation) and Tucker2 with the
largest proportional ranks whose chain is no bigger than the CP4 chain, layer by layer. Columns: output
SQNR (dB, logits vs the original FP32 model) and accuracy for FP32 and INT8, and the INT8 penalty
e_Q = ‖y_int8 − y_fp32‖/‖y_fp32‖ of the decomposed model against its own FP32 version (the noise INT8
adds; sqrt(e_int8² − e_fp32²) is ill-conditioned when the decomposition error dominates).
`--kappa`: per-layer κ vs the layer's INT8 penalty (one layer decomposed at a time), for the fallback
threshold; `--fallback`: INT8 with every CP layer forced into each fallback (keep-float / int16 / tucker2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from onnxcompress.decompose.cp import cp4_rank_for_ratio  # noqa: E402
from onnxcompress.ort.session import make_session  # noqa: E402
from onnxcompress.passes.base import PassContext  # noqa: E402
from onnxcompress.passes.cp import CPPass  # noqa: E402
from onnxcompress.passes.fold_bn import FoldBatchNorm  # noqa: E402
from onnxcompress.passes.int8 import QuantizeInt8
from onnxcompress.ort.quantize import int8_format_for  # noqa: E402
from onnxcompress.passes.tucker2 import Tucker2Pass  # noqa: E402

SHAPES = {"input": (1, 1, 16, 16)}
CALIB = np.load(os.path.join(ROOT, "models", "digits_calib.npz"))["x"].astype(np.float32)
_TEST = np.load(os.path.join(ROOT, "models", "digits_test.npz"))
XTEST, YTEST = _TEST["x"].astype(np.float32), _TEST["y"]


class _Reader(CalibrationDataReader):
    def __init__(self, x, bs=16):
        self.batches = [x[i:i + bs] for i in range(0, len(x), bs)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"input": self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def calib_feeds():
    return ({"input": CALIB[i:i + 16]} for i in range(0, len(CALIB), 16))


def logits(model: onnx.ModelProto) -> np.ndarray:
    s = make_session(model, "cpu", threads=1)
    return np.concatenate([s.run(None, {"input": XTEST[i:i + 120]})[0] for i in range(0, len(XTEST), 120)])


def int8(model: onnx.ModelProto, float_nodes=(), int16_tensors=()) -> onnx.ModelProto:
    q = QuantizeInt8(lambda: _Reader(CALIB), int8_format_for("cpu"))
    handoff = {"float_nodes": list(float_nodes), "int16_tensors": list(int16_tensors)}
    return q.run(model, PassContext(handoff=handoff)).model


def metrics(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return err, -20 * np.log10(max(err, 1e-12)), float((out.argmax(1) == YTEST).mean() * 100)


def penalty(y32: np.ndarray, y8: np.ndarray) -> float:
    return float(np.linalg.norm(y8 - y32) / np.linalg.norm(y32))


def cp_policy(ratio: float, only: str | None = None):
    def policy(info):
        if info.index == 0:
            return "first conv"
        if only is not None and info.name != only:
            return "not this layer"
        return cp4_rank_for_ratio(info.T, info.S, *info.kernel, ratio)
    return policy


def tucker2_same_size(cp_layers):
    """Largest proportional (r3, r4) per layer whose Tucker2 chain has no more weights than the CP4 chain."""
    budget = {l.name: l.params_after for l in cp_layers if l.skipped is None}
    shapes = {l.name: l.kernel_shape for l in cp_layers if l.skipped is None}

    def policy(info):
        if info.name not in budget:
            return "not a CP layer"
        t, s, kh, kw = shapes[info.name]
        best = None
        for r3 in range(1, s + 1):
            r4 = max(1, min(t, round(r3 * t / s)))
            if s * r3 + r3 * r4 * kh * kw + r4 * t + t <= budget[info.name]:
                best = (r3, r4)
        return best or "no ranks fit"
    return policy


VARIANTS = [  # label, use_epc, balance, equalize
    ("ALS, λ in last conv", False, "none", "none"),
    ("ALS + balance", False, "sqrt_size", "none"),
    ("EPC + balance", True, "sqrt_size", "none"),
    ("EPC + bal + CLE", True, "sqrt_size", "data-free"),
    ("EPC + bal + CLE + data-eq", True, "sqrt_size", "data"),
]


def run_ratio(folded, ref, ratio, q_base_err):
    rows = []
    t2_layers = None
    for label, use_epc, bal, eq in VARIANTS:
        p = CPPass(cp_policy(ratio), SHAPES, variant="cp4", use_epc=use_epc, balance=bal, equalize=eq,
                   calibration=calib_feeds if eq == "data" else None)
        res = p.run(folded)
        if t2_layers is None:
            t2_layers = res.layers
        done = [l for l in res.layers if l.skipped is None]
        kap = max(l.extra["kappa"] for l in done)
        rows.append((label, res.model, sum(l.params_after for l in done), kap,
                     float(np.mean([l.weight_rel_error for l in done]))))
    t2 = Tucker2Pass(tucker2_same_size(t2_layers), SHAPES).run(folded)
    done = [l for l in t2.layers if l.skipped is None]
    rows.append(("Tucker2 (same size)", t2.model, sum(l.params_after for l in done), 1.0,
                 float(np.mean([l.weight_rel_error for l in done]))))
    print(f"\n### ratio {ratio:g} (CP4 ranks {[l.ranks[0] for l in t2_layers if l.skipped is None]}, "
          f"Tucker2 ranks {[tuple(l.ranks) for l in done]})")
    print("| variant | params | max κ | mean w.err | FP32 SQNR dB | FP32 acc % | INT8 SQNR dB | INT8 acc % "
          "| INT8 penalty e_Q | e_Q / Tucker2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for label, m, params, kap, werr in rows:
        y32, y8 = logits(m), logits(int8(m))
        e32, s32, a32 = metrics(ref, y32)
        e8, s8, a8 = metrics(ref, y8)
        eq_ = penalty(y32, y8)
        results.append((label, params, kap, werr, s32, a32, s8, a8, eq_))
    eq_t2 = results[-1][-1]
    for label, params, kap, werr, s32, a32, s8, a8, eq_ in results:
        print(f"| {label} | {params} | {kap:.2f} | {werr:.3f} | {s32:.1f} | {a32:.2f} | {s8:.1f} | {a8:.2f} "
              f"| {eq_:.4f} | {eq_ / max(eq_t2, 1e-12):.2f} |")
    print(f"(original model INT8: e_Q {q_base_err:.4f})")
    return results


def run_kappa(folded, ref, ratios):
    """Per layer and ratio: κ (ALS and EPC) vs the INT8 penalty of the CP4 layer alone, and Tucker2's."""
    print("\n### per-layer κ vs INT8 penalty (one layer decomposed, rest of the net INT8 as well)")
    print("| layer | ratio | variant | κ | FP32 err | INT8 e_Q | Tucker2 e_Q (same size) | ratio to T2 |")
    print("|---|---|---|---|---|---|---|---|")
    names = [n.name for n in folded.graph.node if n.op_type == "Conv"]
    pts = []
    for ratio in ratios:
        for name in names[1:]:
            base = None
            for label, use_epc, bal in (("ALS", False, "none"), ("EPC+bal+CLE", True, "sqrt_size")):
                res = CPPass(cp_policy(ratio, name), SHAPES, use_epc=use_epc, balance=bal,
                             equalize="data-free" if use_epc else "none").run(folded)
                if not res.modified:
                    break
                if base is None:
                    t2 = Tucker2Pass(tucker2_same_size(res.layers), SHAPES).run(folded).model
                    base = penalty(logits(t2), logits(int8(t2)))
                rec = next(l for l in res.layers if l.skipped is None)
                y32 = logits(res.model)
                e32, _, _ = metrics(ref, y32)
                eq_ = penalty(y32, logits(int8(res.model)))
                pts.append((rec.extra["kappa"], eq_ / max(base, 1e-12)))
                print(f"| {name} | {ratio:g} | {label} | {rec.extra['kappa']:.2f} | {e32:.3f} | {eq_:.4f} "
                      f"| {base:.4f} | {eq_ / max(base, 1e-12):.2f} |")
    return pts


def run_fallback(folded, ref, ratio):
    print(f"\n### fallbacks at ratio {ratio:g}, every CP layer forced unstable (kappa_max=0)")
    print("| fallback | params | INT8 SQNR dB | INT8 acc % | INT8 e_Q (vs own FP32) | float compute ops left "
          "| ORT CPU ms/batch-120 |")
    print("|---|---|---|---|---|---|---|")
    for fb in ("none", "keep-float", "int16", "tucker2"):
        p = CPPass(cp_policy(ratio), SHAPES, use_epc=True, equalize="data", calibration=calib_feeds, int8=True,
                   fallback=fb, kappa_max=0.0)
        res = p.run(folded)
        params = sum(l.params_after for l in res.layers if l.skipped is None)
        q = int8(res.model, res.handoff.get("float_nodes", []), res.handoff.get("int16_tensors", []))
        out = logits(q)
        _, s8, a8 = metrics(ref, out)
        eq_ = penalty(logits(res.model), out)
        from onnxcompress.ort.quantize import _float_compute_ops
        s = make_session(q, "cpu", threads=1)
        xb = XTEST[:120]
        s.run(None, {"input": xb})
        t0 = time.perf_counter()
        for _ in range(10):
            s.run(None, {"input": xb})
        ms = (time.perf_counter() - t0) * 100
        print(f"| {fb} | {params} | {s8:.1f} | {a8:.2f} | {eq_:.4f} | {_float_compute_ops(q)} | {ms:.1f} |")


def run_synthetic():
    """One 64x64x3x3 conv with a decaying (power-law) channel spectrum, as ALGORITHMS §2.2: κ well above the
    real nets'; INT8 penalty of the CP4 chain vs Tucker2 at the same size, on N(0,1) inputs."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    t = s = 64
    g = rng.standard_normal((t, s, 3, 3))
    g *= (np.arange(1.0, t + 1) ** -0.7)[:, None, None, None] * (np.arange(1.0, s + 1) ** -0.7)[None, :, None, None]
    q1, q2 = np.linalg.qr(rng.standard_normal((t, t)))[0], np.linalg.qr(rng.standard_normal((s, s)))[0]
    w = np.einsum("abhw,ta,sb->tshw", g, q1, q2).astype(np.float32)
    w /= np.linalg.norm(w)
    node = helper.make_node("Conv", ["input", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [8, s, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "W")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = rng.standard_normal((64, s, 12, 12)).astype(np.float32)
    xc = rng.standard_normal((32, s, 12, 12)).astype(np.float32)
    shp = {"input": (8, s, 12, 12)}

    def run(model):
        ss = make_session(model, "cpu", threads=1)
        return np.concatenate([ss.run(None, {"input": x[i:i + 8]})[0] for i in range(0, 64, 8)])

    def q8(model):
        return QuantizeInt8(lambda: _Reader(xc, 8), int8_format_for("cpu")).run(model).model

    y0 = run(m)
    print("\n### synthetic degenerate 64x64x3x3 kernel (decaying spectrum), single conv, INT8 e_Q vs own FP32")
    print("| R | variant | κ | FP32 err | INT8 e_Q | Tucker2 e_Q (same size) | ratio to T2 |")
    print("|---|---|---|---|---|---|---|")
    pts = []
    for r in (16, 32, 48, 64):
        base = None
        for label, use_epc, bal, eq in (("ALS", False, "none", "none"), ("EPC+bal+CLE", True, "sqrt_size", "data-free"),
                                        ("EPC+bal+CLE+data", True, "sqrt_size", "data")):
            res = CPPass(lambda i, r=r: r, shp, use_epc=use_epc, balance=bal, equalize=eq, epc_rounds=50,
                         calibration=(lambda: ({"input": xc[i:i + 8]} for i in range(0, 32, 8))) if eq == "data" else None
                         ).run(m)
            if base is None:
                t2 = Tucker2Pass(tucker2_same_size(res.layers), shp).run(m).model
                base = penalty(run(t2), run(q8(t2)))
            y32 = run(res.model)
            eq_ = penalty(y32, run(q8(res.model)))
            k = res.layers[0].extra["kappa"]
            pts.append((k, eq_ / base))
            print(f"| {r} | {label} | {k:.2f} | {penalty(y0, y32):.3f} | {eq_:.4f} | {base:.4f} | {eq_ / base:.2f} |")
    return pts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--kappa", action="store_true")
    ap.add_argument("--kappa-ratios", type=float, nargs="+", default=[1.5, 3.0])
    ap.add_argument("--fallback", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="κ sweep on degenerate synthetic 64x64x3x3 kernels")
    ap.add_argument("--skip-main", action="store_true", help="skip the per-ratio tables")
    args = ap.parse_args()
    t0 = time.perf_counter()
    orig = onnx.load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
    folded = FoldBatchNorm().run(orig).model
    ref = logits(orig)
    e_orig, s_orig, a_orig = metrics(ref, logits(int8(folded)))
    print(f"original FP32 accuracy {metrics(ref, ref)[2]:.2f} %; original INT8: SQNR {s_orig:.1f} dB, "
          f"accuracy {a_orig:.2f} %, e_Q {e_orig:.4f}")
    for r in ([] if args.skip_main else args.ratios):
        run_ratio(folded, ref, r, e_orig)
    if args.kappa:
        run_kappa(folded, ref, args.kappa_ratios)
    if args.fallback:
        run_fallback(folded, ref, args.ratios[0])
    if args.synthetic:
        run_synthetic()
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
