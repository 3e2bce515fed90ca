"""QAF and INT4 evidence (issue 14), through the public API: every model is `onnxcompress.optimize(model, Recipe)`.

    python benchmarks/qaf_int4_evidence.py --table       # digits: CP4 / CP3 / Tucker2 at 2x, plain vs EPC vs QAF,
                                                         #   FP32 / INT8 / INT4 (the goals' numbers)
    python benchmarks/qaf_int4_evidence.py --ratios      # digits: CP4 / CP3 INT8 penalty at 3x and 4x, QAF off / on
    python benchmarks/qaf_int4_evidence.py --ablation    # digits: what EPC, equalisation and the κ fallback add on
                                                         #   top of QAF (CP4 2x, INT8 and INT4)
    python benchmarks/qaf_int4_evidence.py --mobilenet   # MobileNetV2, real ImageNet weights, real photos
    python benchmarks/qaf_int4_evidence.py --latency     # what INT4 buys and costs on ORT CPU (size, latency)

No flag: all sections. Default model: models/digits_cnn.onnx (trained on sklearn's real digits; calibration
models/digits_calib.npz, 64 training images; evaluation models/digits_test.npz, 360 labelled test images: one
image = 0.28 points). Every factorized row uses `--allocation sensitivity` (the redesign issue's allocation:
per-layer ranks from measured one-layer sensitivity curves, spent where they cost least) at the same overall
parameter ratio for every method (equal size), the latency guard off (CP chains are slower than the conv on ORT CPU:
the guard would keep every layer), ranks aligned to 8 (the CPU default). "plain" CP = ALS + balancing +
equalisation without EPC; "EPC" = with error-preserving correction; "+ QAF" = the QAF pass on the grid the
weights are stored on. INT8 = QDQ, uint8 activations per tensor, int8 weights per channel (ORT CPU's fast
layout). INT4 = weight-only int4 Conv weights (depthwise factors float), the classifier as MatMulNBits
(`--quantize int4`, the default `--int4-activations float`); "INT4 w4a8" = int4 Conv weights with the INT8
activations (`--int4-activations int8`).

Columns: accuracy (%), penalty = accuracy − the same chain's FP32 accuracy (points), top-1 agreement with the
original FP32 model, output SQNR (dB), w.err = mean over the factorized k×k layers of ‖K − K̂‖/‖K‖ with K̂ composed
from the weights *as stored* (dequantized from the file), QAF before→after = mean weight error of the chains
with round-to-nearest vs QAF (the pass's own report), bytes = the serialized model. Latency: ORT CPU, 1 thread,
interleaved runs in one process (onnxcompress.ort.timing.bench), ratios side by side.
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
from onnx import numpy_helper  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from onnxcompress import optimize  # noqa: E402
from onnxcompress.decompose.qaf import _mats, compose  # noqa: E402
from onnxcompress.ort.int4 import unpack_int4  # noqa: E402
from onnxcompress.ort.timing import bench  # noqa: E402
from onnxcompress.passes.fold_bn import FoldBatchNorm  # noqa: E402
from onnxcompress.passes.qaf import CHAINS  # noqa: E402
from onnxcompress.recipe import Recipe  # noqa: E402

DIGITS = os.path.join(ROOT, "models", "digits_cnn.onnx")
CALIB = os.path.join(ROOT, "models", "digits_calib.npz")
TEST = os.path.join(ROOT, "models", "digits_test.npz")
DIGITS_KW = dict(calibration=CALIB, calibration_samples=64, eval_data=TEST, eval_samples=360,
                 allocation="sensitivity", latency_guard=False, jobs=1)


# ------------------------------------------------------------------------------------------ measurements
def weight_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Tensor name -> float value for float initializers and for DequantizeLinear outputs of initializers
    (int8 / uint8 / int4, per tensor or per axis): the weights as the model stores them."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {n: numpy_helper.to_array(t).astype(np.float64) for n, t in inits.items()
           if t.data_type == onnx.TensorProto.FLOAT}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        q = unpack_int4(t) if t.data_type == onnx.TensorProto.INT4 else numpy_helper.to_array(t)
        sc = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = np.zeros_like(sc)
        if len(n.input) > 2 and n.input[2] in inits:
            z = inits[n.input[2]]
            zp = (unpack_int4(z) if z.data_type == onnx.TensorProto.INT4 else numpy_helper.to_array(z)).astype(
                np.float64)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shp = [1] * q.ndim
        if sc.ndim == 1 and sc.size > 1:
            shp[axis] = -1
        out[n.output[0]] = (q.astype(np.float64) - zp.reshape(shp)) * sc.reshape(shp)
    return out


def stored_weight_error(original: onnx.ModelProto, model: onnx.ModelProto) -> float | None:
    """Mean over the factorized k×k layers (CP4/CP3/Tucker2 chains) of ‖K − K̂‖/‖K‖, K̂ from the stored weights."""
    vals = weight_values(model)
    orig = weight_values(original)
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    oconv = {n.name: n for n in original.graph.node if n.op_type == "Conv"}
    errs = []
    for name in convs:
        for kind, sfx in CHAINS.items():
            if kind == "svd" or not name.endswith("/" + sfx[0]):
                continue
            layer = name[: -len(sfx[0]) - 1]
            nodes = [convs.get(f"{layer}/{s}") for s in sfx]
            if None in nodes or layer not in oconv:
                continue
            ws = [vals[n.input[1]] for n in nodes]
            k = ws[1].shape[2] * ws[2].shape[3] if kind == "cp4" else int(np.prod(ws[1].shape[2:]))
            kern = orig[oconv[layer].input[1]]
            kern = kern.reshape(kern.shape[0], -1)
            errs.append(float(np.linalg.norm(compose(_mats(ws, kind), kind, k) - kern) / np.linalg.norm(kern)))
    return float(np.mean(errs)) if errs else None


def run(model, label: str, original: onnx.ModelProto, calibration=None, eval_data=None, **kw) -> dict:
    t0 = time.perf_counter()
    res = optimize(model, Recipe(**kw), calibration=calibration, eval_data=eval_data)
    rep = res.report
    f, m = rep.fidelity, rep.model
    q = [{**l["extra"]["qaf"], "layer": l["name"]} for l in rep.layers
         if "skipped" not in l["extra"].get("qaf", {"skipped": 1})]
    kxk = [l for l in rep.layers if l.get("skipped") is None and l.get("method") in ("cp4", "cp3", "tucker2")]
    row = {"label": label, "model": res.model, "acc": None if f.get("accuracy_after") is None else
           100 * f["accuracy_after"], "top1": f.get("top1_agreement"), "top5": f.get("top5_agreement"),
           "sqnr": f.get("sqnr_db"), "bytes": m["bytes_after"], "werr": stored_weight_error(original, res.model),
           "qaf_before": np.mean([x["weight_rel_error_before"] for x in q]) if q else None,
           "qaf_after": np.mean([x["weight_rel_error_after"] for x in q]) if q else None,
           "admm": sum(x["admm_iterations"] for x in q) if q else None, "qaf_layers": q,
           "params": sum(l["params_after"] for l in kxk), "kappa": max((l["extra"]["kappa"] for l in kxk if "kappa" in l["extra"]),
                                                                        default=None),
           "fallback": sum(1 for l in kxk if l["extra"].get("fallback")),
           "layers": f"{len(kxk)}/{sum(1 for l in rep.layers if l.get('skipped') is None and l.get('method') == 'svd')}",
           "seconds": round(time.perf_counter() - t0, 1), "int4": rep.quantization.get("int4", {}).get("measured")}
    print(f"  [{row['seconds']:6.1f}s] {label}: acc {_f(row['acc'], 2)} top1 {_f(row['top1'], 3)} "
          f"SQNR {_f(row['sqnr'], 1)} w.err {_f(row['werr'], 4)} bytes {row['bytes']}", flush=True)
    return row


def _f(v, nd):
    return "-" if v is None else f"{v:.{nd}f}"


def _qaf(r):
    return "-" if r["qaf_before"] is None else f"{r['qaf_before']:.4f} → {r['qaf_after']:.4f} ({r['admm']})"


def digits_row(method: str, label: str, quantize: str, ratio: float = 2.0, **kw) -> dict:
    return run(DIGITS, label, _folded(), method=method, ratio=ratio, quantize=quantize, **{**DIGITS_KW, **kw})


_FOLDED = []


def _folded() -> onnx.ModelProto:
    if not _FOLDED:
        _FOLDED.append(FoldBatchNorm().run(onnx.load(DIGITS)).model)
    return _FOLDED[0]


def print_table(rows: list[dict], fp32: dict[str, float]) -> None:
    print("| model | accuracy % | penalty vs own FP32 | top-1 agr. | SQNR dB | w.err (stored) | QAF w.err before → after "
          "(ADMM it.) | max κ / layers on the κ fallback | factorized k×k / 1×1 | bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = fp32.get(r.get("family", ""))
        pen = "" if base is None or r["acc"] is None or r.get("precision") == "FP32" else f"{r['acc'] - base:+.2f}"
        print(f"| {r['label']} | {_f(r['acc'], 2)} | {pen} | {_f(r['top1'], 3)} | {_f(r['sqnr'], 1)} | "
              f"{_f(r['werr'], 4)} | {_qaf(r)} | {_f(r['kappa'], 2)} / {r['fallback']} | {r['layers']} | {r['bytes']} |")


# ------------------------------------------------------------------------------------------ sections
def section_table() -> list[dict]:
    print("\n## digits: CP4, CP3, Tucker2 at 2x (sensitivity allocation, equal size), plain vs EPC vs QAF", flush=True)
    rows, fp32 = [], {}
    for q in ("none", "int8", "int4"):
        r = run(DIGITS, f"original {q}", _folded(), method="none", quantize=q, calibration=CALIB,
                calibration_samples=64, eval_data=TEST, eval_samples=360)
        r.update(family="original", precision={"none": "FP32"}.get(q, q.upper()))
        rows.append(r)
    fp32["original"] = rows[0]["acc"]
    for method in ("cp4", "cp3", "tucker2"):
        variants = [("plain", {"cp_epc": False}), ("EPC", {"cp_epc": True})] if method != "tucker2" else [("", {})]
        for vname, vkw in variants:
            fam = f"{method} {vname}".strip()
            r = digits_row(method, f"{fam} FP32", "none", **vkw)
            r.update(family=fam, precision="FP32")
            rows.append(r)
            fp32[fam] = r["acc"]
            for q in ("int8", "int4"):
                for use in (False, True):
                    r = digits_row(method, f"{fam} {q.upper()}{' + QAF' if use else ''}", q, qaf=use, **vkw)
                    r.update(family=fam, precision=q.upper())
                    rows.append(r)
        if method == "tucker2":
            r = digits_row(method, "tucker2 INT4 w4a8 + QAF", "int4", qaf=True, int4_activations="int8")
            r.update(family="tucker2", precision="INT4")
            rows.append(r)
    print()
    print_table(rows, fp32)
    return rows


def section_ratios() -> None:
    print("\n## digits: CP + INT8 penalty at 3x and 4x (sensitivity allocation), QAF off / on; and uniform 2x",
          flush=True)
    rows, fp32 = [], {}
    for method in ("cp4", "tucker2"):
        fam = f"{method} 2x uniform"
        r = digits_row(method, f"{fam} FP32", "none", allocation="uniform", **({"cp_epc": True} if method == "cp4"
                                                                              else {}))
        r.update(family=fam, precision="FP32")
        rows.append(r)
        fp32[fam] = r["acc"]
        for q in ("int8", "int4"):
            for use in (False, True):
                r = digits_row(method, f"{fam} {q.upper()}{' + QAF' if use else ''}", q, qaf=use, allocation="uniform")
                r.update(family=fam, precision=q.upper())
                rows.append(r)
    for method in ("cp4", "cp3"):
        for ratio in (3.0, 4.0):
            fam = f"{method} {ratio:g}x"
            r = digits_row(method, f"{fam} FP32", "none", ratio=ratio, cp_epc=True)
            r.update(family=fam, precision="FP32")
            rows.append(r)
            fp32[fam] = r["acc"]
            for use in (False, True):
                r = digits_row(method, f"{fam} INT8{' + QAF' if use else ''}", "int8", ratio=ratio, qaf=use)
                r.update(family=fam, precision="INT8")
                rows.append(r)
    print()
    print_table(rows, fp32)


def section_ablation() -> None:
    print("\n## digits: what EPC, equalisation and the κ fallback add on top of QAF (CP4 2x)", flush=True)
    rows = []
    for q in ("int8", "int4"):
        for epc in (False, True):
            for eq in ("none", "data-free", "data"):
                rows.append(digits_row("cp4", f"{q.upper()} + QAF, {'EPC' if epc else 'ALS'}, equalise {eq}", q,
                                       qaf=True, cp_epc=epc, cp_equalize=eq))
        for fb in ("none", "keep-float", "int16"):
            if q == "int4" and fb == "int16":
                continue
            rows.append(digits_row("cp4", f"{q.upper()} + QAF, EPC, κ_max 1.4, fallback {fb}", q, qaf=True,
                                   cp_epc=True, cp_kappa_max=1.4, cp_fallback=fb))
    print()
    print("| variant (CP4 2x, sensitivity allocation) | accuracy % | top-1 agr. | SQNR dB | w.err (stored) | "
          "QAF w.err before → after (ADMM it.) | max κ | layers on the fallback | bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {_f(r['acc'], 2)} | {_f(r['top1'], 3)} | {_f(r['sqnr'], 1)} | {_f(r['werr'], 4)} | "
              f"{_qaf(r)} | {_f(r['kappa'], 2)} | {r['fallback']} | {r['bytes']} |")


def section_qaf_layers(rows: list[dict]) -> None:
    """Per layer: weight error before/after QAF and ADMM iterations, for the EPC CP4 and the Tucker2 chains."""
    print("\n### per layer (from the reports): QAF weight error RTN → QAF (float chain), ADMM iterations")
    for r in rows:
        if r["label"] not in ("cp4 EPC INT8 + QAF", "cp4 EPC INT4 + QAF", "tucker2 INT8 + QAF", "tucker2 INT4 + QAF"):
            continue
        print(f"- {r['label']}: " + "; ".join(
            f"{x['layer']}: {x['weight_rel_error_before']:.4f} → {x['weight_rel_error_after']:.4f} "
            f"({x['weight_rel_error_float']:.4f}), {x['admm_iterations']} it." for x in r["qaf_layers"]))


def latency_rows(rows: list[dict], batch_shape: dict, names=None, runs: int = 20) -> None:
    names = names or [r["label"] for r in rows]
    rep = bench([r["model"] for r in rows], ["cpu"], threads=1, warmup=3, runs=runs, input_shape=batch_shape,
                names=names)
    print(f"\nlatency, ORT CPU 1 thread, input {batch_shape}, median of {runs} interleaved runs (vs the first row):")
    print("| model | bytes | size vs first | median ms | speed vs first |")
    print("|---|---|---|---|---|")
    for r, t in zip(rows, rep.providers[0].models):
        print(f"| {t.name} | {r['bytes']} | {rows[0]['bytes'] / r['bytes']:.2f}x | {_f(t.median_ms, 3)} | "
              f"{'-' if t.speedup is None else f'{t.speedup:.2f}x'} |")


def section_latency(table_rows: list[dict] | None) -> None:
    print("\n## what INT4 buys and costs on ORT CPU (size, latency)", flush=True)
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "qaf_int4_digits_op21.onnx")
    onnx.save(onnx.version_converter.convert_version(onnx.load(DIGITS), 21), tmp)
    base = dict(method="none", calibration=CALIB, calibration_samples=64, eval_data=TEST, eval_samples=360)
    rows = [run(DIGITS, "digits FP32", _folded(), quantize="none", **base),
            run(DIGITS, "digits INT8", _folded(), quantize="int8", **base),
            run(DIGITS, "digits INT4 weight-only (contrib DQ, opset 17)", _folded(), quantize="int4", **base),
            run(tmp, "digits INT4 weight-only (standard DQ, opset 21)", _folded(), quantize="int4", **base),
            run(DIGITS, "digits INT4 w4a8", _folded(), quantize="int4", int4_activations="int8", **base)]
    latency_rows(rows, {"input": [64, 1, 16, 16]})
    print("\n(the pipeline's own measurement of each INT4 run, model entering INT4 vs its result: " + "; ".join(
        f"{r['label']}: {r['int4']['size_ratio']:.2f}x smaller, {r['int4']['latency_ratio']:.2f}x the speed"
        for r in rows if r["int4"]) + ")")
    if table_rows:
        pick = ["original none", "tucker2 FP32", "tucker2 INT8 + QAF", "tucker2 INT4 + QAF", "cp4 EPC FP32",
                "cp4 EPC INT8 + QAF", "cp4 EPC INT4 + QAF"]
        sel = [next(r for r in table_rows if r["label"] == p) for p in pick]
        latency_rows(sel, {"input": [64, 1, 16, 16]})
    mlp = transformer_like()
    mp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "qaf_int4_mlp.onnx")
    onnx.save(mlp, mp)
    kw = dict(method="none", calibration="random", calibration_samples=256, eval_samples=64, latency_guard=False)
    mrows = [run(mp, "MLP FP32", mlp, quantize="none", **kw), run(mp, "MLP INT8 static QDQ", mlp, quantize="int8", **kw)]
    for bs, al in ((32, None), (128, None), (32, 4)):
        mrows.append(run(mp, f"MLP INT4 MatMulNBits block {bs}" + (f", accuracy_level {al}" if al else ""), mlp,
                         quantize="int4", int4_block_size=bs, int4_accuracy_level=al, **kw))
    latency_rows(mrows, {"x": [64, 512]})
    print("(random Gaussian weights and inputs: nothing for 4 bits to exploit, four blocks compound; the output SQNR "
          "is the rows' SQNR column above)")


def transformer_like(d=512, ff=2048, layers=4, tokens=64, seed=0) -> onnx.ModelProto:
    """A stack of transformer-MLP blocks: MatMul d->ff, Relu, MatMul ff->d, Add residual (a batch of tokens)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        w1 = (rng.standard_normal((d, ff)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.standard_normal((ff, d)) / np.sqrt(ff)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(w2, f"w2_{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"w1_{i}"], [f"h{i}"], name=f"mm1_{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu_{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"o{i}"], name=f"mm2_{i}"),
                  helper.make_node("Add", [f"o{i}", cur], [f"y{i}"], name=f"add_{i}")]
        cur = f"y{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, d])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [tokens, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def section_mobilenet(n_calib: int = 64, n_eval: int = 96) -> None:
    from pathlib import Path

    import mobilenetv2_svd as mb

    print("\n## MobileNetV2, real ImageNet weights, real photos (calibration / evaluation photos disjoint)", flush=True)
    path = Path(os.environ.get("ONNXCOMPRESS_CACHE", os.path.expanduser("~/.cache/onnxcompress"))) / \
        "mobilenetv2-imagenet-folded.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        mb.export_mobilenetv2(path)
    m = onnx.load(str(path))
    cal, ev = mb.datasets(n_calib, n_eval)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    dw = sum(1 for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute))
    print(f"{len(convs)} convs, {dw} depthwise: no layer CP4/CP3/Tucker2 can take (every dense 3x3 conv but the S=3 "
          f"stem is depthwise) -> the factorized rows are SVD of the 1x1 convs (data-aware, QAF target = the chain)")
    kw = dict(calibration_samples=n_calib, eval_samples=n_eval, latency_guard=False, jobs=1)
    rows = [run(str(path), f"MobileNetV2 {lab}", m, cal, ev, method="none", quantize=q, **kw, **extra)
            for lab, q, extra in (("FP32", "none", {}), ("INT8", "int8", {}), ("INT4 weight-only", "int4", {}),
                                  ("INT4 w4a8", "int4", {"int4_activations": "int8"}))]
    # SVD of the seven largest 1x1 convs (blocks 15-18: 40 % of the conv weights), data-aware, 1.25x uniform (1.5x
    # with the sensitivity allocation left top-1 agreement 0.073 in FP32: nothing left for QAF to show)
    svd = dict(method="svd", ratio=1.25, data_aware=True, allocation="uniform", rank_multiple=1,
               include=["/features/features.1[5-8]/*"], **kw)
    for lab, q, use in (("FP32", "none", None), ("INT8", "int8", False), ("INT8 + QAF", "int8", True),
                        ("INT4", "int4", False), ("INT4 + QAF", "int4", True)):
        rows.append(run(str(path), f"SVD 1.25x data-aware {lab}", m, cal, ev, quantize=q, qaf=use, **svd))
    print("\n| model | top-1 agr. | top-5 agr. | SQNR dB | QAF w.err before → after (ADMM it.) | bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {_f(r['top1'], 3)} | {_f(r['top5'], 3)} | {_f(r['sqnr'], 1)} | {_qaf(r)} | "
              f"{r['bytes']} |")
    latency_rows(rows[:4], {m.graph.input[0].name: [1, 3, 224, 224]}, runs=15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ("table", "ratios", "ablation", "mobilenet", "latency")
    for n in names:
        ap.add_argument(f"--{n}", action="store_true")
    args = ap.parse_args()
    todo = [n for n in names if getattr(args, n)] or list(names)
    t0 = time.perf_counter()
    import onnxruntime

    print(f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; sections: {', '.join(todo)}")
    table = None
    if "table" in todo:
        table = section_table()
        section_qaf_layers(table)
    if "ratios" in todo:
        section_ratios()
    if "ablation" in todo:
        section_ablation()
    if "latency" in todo:
        section_latency(table)
    if "mobilenet" in todo:
        section_mobilenet()
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
