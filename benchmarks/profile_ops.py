#!/usr/bin/env python
"""Where the time of a factorized + INT8 model goes on ORT CPU, and how close it gets to its ceiling.

    python benchmarks/profile_ops.py [--model resnet50] [--ratio 3] [--variants default,m8,m16,nofuse]
                                     [--threads 1,2,4] [--rounds 40] [--prof-runs 15] [--cache DIR] [--json FILE]

Models (torchvision weights='none'; INT8 calibrated on random inputs, which does not change kernel speed; built
through `optimize` with verification off to save time — the recipes are otherwise the CLI's):
  FP32           the exported model
  INT8           --method none --quantize int8
  T2 3x+INT8     --method tucker2 --ratio 3 --quantize int8 (defaults: rank multiple 16 else 8, latency guard,
                 Fuse pass) — the variant of issue 16
  +m8 / +m16     the same with --rank-multiple 8 (the former default) / 16 (no fallback to 8)
  +nofuse        the same without the Fuse pass (registry.FUSION emptied)
  +noguard       the same without the latency guard

1. Latency, every model in one process (sessions from files, no pool spinning between interleaved multi-thread
   sessions), warm-up then `--rounds` interleaved round-robin rounds, at each thread count. Ceiling of a variant
   = its MAC reduction x the INT8-alone speedup over FP32 measured in the same run; fraction = its speedup /
   ceiling = (t_INT8 / t_variant) / MAC reduction. Noise: the fraction from each round's own times (the models
   of one round run back to back, so drift hits them alike): median [p25-p75].
2. ORT profiler at 1 thread: per-op-type time side by side; per decomposed layer the INT8 conv vs its INT8 chain
   (kernel time, MAC reduction, efficiency = speedup / MAC reduction); the Q/DQ/Transpose/Reorder nodes ORT runs;
   the Amdahl bound (the fraction if every chain ran at its conv's MAC rate, the rest as measured).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from onnxcompress import Recipe, optimize  # noqa: E402
from onnxcompress.ort.session import make_session  # noqa: E402
from onnxcompress.ort.timing import (executed_layer, factor_of, model_feeds, node_macs, profile_nodes,  # noqa: E402
                                     time_interleaved)

FACTORS = ("t2_in", "t2_core", "t2_out", "svd_in", "svd_out", "concat", "cp_in", "cp_out")
COMMON = dict(calibration="random", calibration_samples=8, eval_samples=4, verify=False)
VARIANTS = {"default": {}, "m8": {"rank_multiple": 8}, "m16": {"rank_multiple": 16}, "nofuse": {"_nofuse": True},
            "noguard": {"latency_guard": False}}


def build(src: str, label: str, kw: dict, out: Path) -> dict:
    """Make variant `label` at `out` (reused when present with its facts); returns the facts."""
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        return json.loads(meta.read_text())
    from onnxcompress.passes import registry

    t0 = time.perf_counter()
    kw = dict(kw)
    fusion = registry.FUSION
    if kw.pop("_nofuse", False):
        registry.FUSION = ()
    try:
        res = optimize(src, Recipe(**kw, **COMMON))
    finally:
        registry.FUSION = fusion
    rep = res.report.to_dict()
    onnx.save(res.model, out)
    fuse = next((p for p in rep["passes"] if p["name"] == "Fuse"), None)
    facts = {"label": label, "optimize_s": round(time.perf_counter() - t0, 1),
             "params_after": rep["model"]["params_after"], "macs_after": rep["model"]["macs_after"],
             "guard_kept": sum(1 for l in rep["layers"] if "latency guard" in (l.get("skipped") or "")),
             "decomposed": sum(1 for l in rep["layers"] if l.get("skipped") is None and l.get("ranks")),
             "ranks_not_16": sum(1 for l in rep["layers"] if l.get("ranks") and any(r % 16 for r in l["ranks"])),
             "fuse_modified": bool(fuse and fuse["modified"])}
    meta.write_text(json.dumps(facts))
    return facts


def timing(paths: dict[str, str], threads: int, rounds: int, feeds) -> dict[str, np.ndarray]:
    sess = {k: make_session(p, "cpu", threads=threads) for k, p in paths.items()}
    runners = [lambda s=s: s.run(None, feeds) for s in sess.values()]
    t = time_interleaved(runners, warmup=3, runs=rounds)
    return {k: np.asarray(v) * 1e3 for k, v in zip(sess, t)}


def q(x, p):
    return float(np.percentile(x, p))


def latency_table(paths, macs, threads, rounds, feeds) -> dict:
    t = timing(paths, threads, rounds, feeds)
    f, i8 = t["FP32"], t["INT8"]
    int8_sp = np.median(f) / np.median(i8)
    print(f"\n-- {threads} thread(s): FP32 {np.median(f):.2f} ms, INT8 {np.median(i8):.2f} ms (INT8 alone "
          f"{int8_sp:.2f}x) --")
    print(f"  {'variant':24s} {'median ms':>9s} {'speedup':>8s} {'MACx':>6s} {'ceiling':>8s} {'fraction':>8s} "
          f"{'per-round fraction [p25-p75]':>30s}")
    rows = {}
    for l in paths:
        mr = macs["FP32"] / macs[l]
        sp = np.median(f) / np.median(t[l])
        ceil = mr * int8_sp
        pr = (i8 / t[l]) / mr
        rows[l] = {"median_ms": float(np.median(t[l])), "speedup": float(sp), "mac_reduction": mr,
                   "ceiling": float(ceil), "fraction": float(sp / ceil), "fraction_rounds_median": float(np.median(pr)),
                   "fraction_rounds_p25": q(pr, 25), "fraction_rounds_p75": q(pr, 75)}
        print(f"  {l:24s} {np.median(t[l]):9.2f} {sp:7.2f}x {mr:6.2f} {ceil:7.2f}x {sp / ceil:8.3f} "
              f"{np.median(pr):12.3f} [{q(pr, 25):.3f}-{q(pr, 75):.3f}]", flush=True)
    return {"int8_speedup": float(int8_sp), "rows": rows}


def chain_table(label, pr, base, layers, m0, per_layer_macs, macs) -> dict:
    """Per decomposed layer: INT8 conv vs its INT8 chain; the Amdahl bound."""
    conv_us, ch_us, ch_n, ch_macs = (collections.defaultdict(float), collections.defaultdict(float),
                                     collections.Counter(), collections.defaultdict(int))
    factored = set()    # layers with a factor node (a merged node keeps the first factor's name: its layer)
    for n, us in base.node_min_us.items():
        L = executed_layer(n, layers)
        if L:
            conv_us[L] += us
    for n, us in pr.node_min_us.items():
        L = executed_layer(n, layers)
        if L:
            ch_us[L] += us
            ch_n[L] += 1
            if factor_of(n) in FACTORS:
                factored.add(L)
    for n, m in per_layer_macs.items():
        L = executed_layer(n, layers)
        if L:
            ch_macs[L] += m
    print(f"\n-- {label}: per decomposed layer, INT8 conv vs its INT8 chain (kernel time, 1 thread) --")
    print(f"  {'layer':46s} {'conv us':>8s} {'chain us':>8s} {'nodes':>5s} {'MACx':>6s} {'speedup':>8s} {'eff':>5s}")
    rows = []
    for L in [x for x in m0 if x in conv_us and x in ch_us]:
        mr, sp = m0[L] / max(ch_macs[L], 1), conv_us[L] / ch_us[L]
        rows.append({"layer": L, "conv_us": conv_us[L], "chain_us": ch_us[L], "nodes": ch_n[L], "mac_reduction": mr,
                     "speedup": sp, "efficiency": sp / mr})
        if L in factored:
            print(f"  {L[:46]:46s} {conv_us[L]:8.0f} {ch_us[L]:8.0f} {ch_n[L]:5d} {mr:6.2f} {sp:7.2f}x {sp / mr:5.2f}")
    dec = [r for r in rows if r["layer"] in factored]
    tc, tch = sum(r["conv_us"] for r in dec), sum(r["chain_us"] for r in dec)
    mc, mch = sum(m0[r["layer"]] for r in dec), sum(ch_macs[r["layer"]] for r in dec)
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for n, us in pr.node_min_us.items():
        if pr.node_op[n] == "QLinearConv" and executed_layer(n, layers):
            k = factor_of(n)
            k = k if k in FACTORS else "unfactored conv"
            kinds[k][0] += us
            kinds[k][1] += 1
    t_int8 = base.kernel_us()
    t_ideal = t_int8 - tc + tc / (mc / max(mch, 1))
    mr_all = macs["FP32"] / macs[label]
    bound = {"fraction_bound": (t_int8 / t_ideal) / mr_all, "fraction_kernels": (t_int8 / pr.kernel_us()) / mr_all,
             "chain_efficiency": tc / max(tch, 1e-9) / (mc / max(mch, 1)), "decomposed_conv_us": tc,
             "decomposed_chain_us": tch}
    print(f"  decomposed layers together: conv {tc / 1e3:.2f} ms -> chains {tch / 1e3:.2f} ms for {mc / max(mch, 1):.2f}x "
          f"fewer MACs: efficiency {bound['chain_efficiency']:.2f}")
    print("  QLinearConv time by factor kind: " + ", ".join(
        f"{k} {v[0] / 1e3:.2f} ms ({v[1]})" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])))
    print(f"  Amdahl bound (kernel times, fastest run per node): INT8 kernels {t_int8 / 1e3:.2f} ms, decomposed convs "
          f"{tc / 1e3:.2f} ms of it; every chain at its conv's MAC rate -> fraction <= {bound['fraction_bound']:.3f} "
          f"(kernels as measured: {bound['fraction_kernels']:.3f})")
    return {"layers": rows, "bound": bound}


def profile(paths, feeds, runs, fp32, m0, per_layer_macs, macs) -> dict:
    print(f"\n== ORT profiler, 1 thread, fastest of {runs} profiled runs per node ==")
    prof = {l: profile_nodes(p, 1, runs=runs, warmup=3, feeds=feeds) for l, p in paths.items()}
    ops: dict = collections.OrderedDict()
    for l, pr in prof.items():
        for op, (us, n) in pr.by_op().items():
            ops.setdefault(op, {})[l] = (us, n)
    print("  " + f"{'op type':22s}" + "".join(f"{l[:20]:>22s}" for l in prof))
    for op, d in ops.items():
        print("  " + f"{op:22s}" + "".join(f"{d[l][0] / 1e3:12.2f} ms ({d[l][1]:3d})" if l in d else f"{'-':>22s}"
                                           for l in prof))
    print("  " + f"{'sum of kernels':22s}" + "".join(f"{pr.kernel_us() / 1e3:15.2f} ms   " for pr in prof.values()))
    out = {"by_op": {op: {l: list(v) for l, v in d.items()} for op, d in ops.items()}, "chains": {}, "between": {}}
    layers = {n.name for n in fp32.graph.node if n.op_type == "Conv"}
    for l in [x for x in prof if x not in ("FP32", "INT8")]:
        out["chains"][l] = chain_table(l, prof[l], prof["INT8"], layers, m0, per_layer_macs[l], macs)
    print("\n-- nodes ORT executes between the convs (after its fusions) --")
    for l in paths:
        c = collections.Counter(prof[l].node_op.values())
        between = {k: v for k, v in c.items() if k in ("QuantizeLinear", "DequantizeLinear", "Transpose",
                                                        "ReorderInput", "ReorderOutput")}
        out["between"][l] = between
        print(f"  {l:24s} nodes {sum(c.values()):4d}; Q/DQ/Transpose/Reorder: {between}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--src", help="an ONNX file instead of --model")
    ap.add_argument("--method", default="tucker2")
    ap.add_argument("--ratio", type=float, default=3)
    ap.add_argument("--variants", default="default", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--prof-runs", type=int, default=15)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--cache", help="folder for the variant models (reused between runs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import tempfile

    if args.src:
        src = args.src
    else:
        from onnxcompress.zoo import cached_export
        src = str(cached_export(args.model, weights="none"))
    cache = Path(args.cache or tempfile.mkdtemp(prefix="onnxcompress-prof-"))
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{ {'tucker2': 'T2', 'svd': 'SVD'}.get(args.method, args.method.upper())} {args.ratio:g}x+INT8"
    wanted = {"INT8": {"method": "none", "quantize": "int8"}}
    for v in args.variants.split(","):
        wanted[tag + ("" if v == "default" else f" +{v}")] = {"method": args.method, "ratio": args.ratio,
                                                              "quantize": "int8", **VARIANTS[v]}
    paths, facts = {"FP32": src}, {}
    for l, kw in wanted.items():
        p = cache / (Path(src).stem + "-" + l.replace(" ", "_").replace("+", "p") + ".onnx")
        facts[l] = build(src, l, kw, p)
        paths[l] = str(p)
        print(f"built {l:24s} {facts[l]}", flush=True)
    fp32 = onnx.load(src, load_external_data=False)
    feeds, shapes = model_feeds(fp32)
    m0 = node_macs(fp32, shapes)
    per_layer = {l: node_macs(onnx.load(p, load_external_data=False), shapes) for l, p in paths.items()}
    macs = {l: sum(v.values()) for l, v in per_layer.items()}
    out = {"model": Path(src).name, "macs": macs, "facts": facts, "timing": {}, "profile": {}}
    print(f"\n== latency, every model interleaved in one process ({args.rounds} rounds after 3 warm-up) ==")
    for th in [int(x) for x in args.threads.split(",")]:
        out["timing"][th] = latency_table(paths, macs, th, args.rounds, feeds)
    if not args.no_profile:
        out["profile"] = profile(paths, feeds, args.prof_runs, fp32, m0, per_layer, macs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
