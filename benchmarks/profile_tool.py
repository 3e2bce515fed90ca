#!/usr/bin/env python
"""Time and peak RSS of `optimize` per stage, for several checkouts of the package side by side in one run.

    python benchmarks/profile_tool.py [--checkouts before=DIR,after=.] [--model resnet50 | --src FILE]
                                      [--method tucker2] [--ratio 2] [--samples N] [--repeat 2] [--json FILE]

The recipe is the explicit one of issue 16, run through the CLI's own entry point: `onnxcompress optimize M
--method tucker2 --ratio 2 --quantize int8 --calibration random -o OUT` (CLI defaults otherwise: latency
guard on, verification on), the output model written as the CLI writes it.
Each checkout runs in its own child process (PYTHONPATH = that checkout, so that one's heap cannot inflate
the other's peak), checkouts alternating `--repeat` times on the same model file. In each child a sampler
thread reads VmRSS every 10 ms and attributes it to the current stage (from the pipeline's progress lines:
each pass, its verification, the INT8 sub-stages, the latency guard, fidelity, latency); the process peak is
the kernel's VmHWM (reset after the imports, which are not the tool's working memory: they are reported
apart). Each child gets an empty latency-guard timing cache (ONNXCOMPRESS_LATENCY_CACHE), so every run times its
layers. A "before" checkout is any directory holding an `onnxcompress` package, e.g.
`git archive <commit> | tar -x -C DIR`. Ratios (time, peak) are between checkouts of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, {bench!r})
from _rss import RSSSampler, rss_mb
src, method, ratio, samples, out_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
import numpy as np, onnx, onnxruntime, onnxruntime.quantization   # imports: reported apart
from onnxcompress.passes import manager
base = rss_mb()
with RSSSampler(0.01, float(os.environ.get("ONNXCOMPRESS_RSS_LIMIT_MB") or 0) or None) as s:
    def progress(msg):
        for key in ("pass ", "INT8", "latency guard", "fidelity", "latency of", "latency against", "auto:"):
            if msg.startswith(key):
                name = msg if key == "pass " else key if key in ("latency guard", "auto:", "latency against") else \
                    msg.split("(")[0].strip()[:40]
                if name != s.current:
                    s.stage(name)
                return
    real_verify = manager.PassManager._verify
    def verify(self, p, *a, **k):
        prev = s.current
        s.stage("verify " + p.name)
        try:
            return real_verify(self, p, *a, **k)
        finally:
            s.stage(prev.split(" (")[0] + " (after verify)")
    manager.PassManager._verify = verify
    import onnxcompress.cli.optimize as cli_opt
    from onnxcompress import pipeline
    cli_opt.progress_printer = lambda args: progress
    got = {{}}
    real_optimize = pipeline.optimize
    def keep(*a, **k):
        got["res"] = real_optimize(*a, **k)
        s.stage("write the model")
        return got["res"]
    pipeline.optimize = keep
    from onnxcompress.cli.main import main
    argv = ["optimize", src, "--method", method] + (["--ratio", str(ratio)] if method != "none" else []) + [
            "--quantize", "int8", "--calibration", "random", "-o", out_path, "--quiet"] + (
            [] if samples == "default" else ["--calibration-samples", samples])
    s.stage("load + clean-up")
    t0 = time.perf_counter()
    rc = main(argv)
    total = time.perf_counter() - t0
res = got["res"]
rep = res.report.to_dict()
out = {{"total_s": total, "peak_mb": s.peak_mb, "base_mb": base, "stages": [[n, t, m] for n, t, m in s.table()],
       "passes": [[p["name"], p["seconds"]] for p in rep["passes"]],
       "fidelity": {{k: rep["fidelity"].get(k) for k in ("sqnr_db", "top1_agreement", "cosine")}},
       "params_after": rep["model"]["params_after"], "macs_after": rep["model"]["macs_after"],
       "latency": {{k: rep["latency"].get(k) for k in ("speedup", "median_ms_before", "median_ms_after")}}}}
print("RESULT " + json.dumps(out))
'''


def export(name: str) -> Path:
    code = f"from onnxcompress.zoo import cached_export; print(cached_export({name!r}, weights='none'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=str(HERE.parent), env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return Path(out.stdout.strip().splitlines()[-1])


def model_mb(src: Path) -> float:
    import onnx

    from onnx.external_data_helper import _get_all_tensors

    size = src.stat().st_size
    m = onnx.load(str(src), load_external_data=False)
    seen = set()
    for t in _get_all_tensors(m):
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                size += (src.parent / e.value).stat().st_size
    return size / 2**20


def run_child(root: Path, src: Path, method: str, ratio: float, samples: str, extra_env: dict | None = None) -> dict:
    code = CHILD.format(bench=str(HERE))
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="profile-tool-")) / "out.onnx"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code, str(src), method, str(ratio), samples, str(out)]
    # a fresh latency-guard timing cache per child: no checkout reuses timings another measured
    env = {**os.environ, "PYTHONPATH": str(root), "ONNXCOMPRESS_LATENCY_CACHE": str(out.parent / "latency"),
           **(extra_env or {})}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(out.parent))   # not a checkout
    wall = time.perf_counter() - t0
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{root} failed:\n{p.stderr.split('Command being timed')[0][-3000:]}")
    res = json.loads(line[0][7:])
    res["process_wall_s"] = wall
    import shutil

    shutil.rmtree(out.parent, ignore_errors=True)
    for l in p.stderr.splitlines():
        if "Maximum resident set size" in l:
            res["time_v_max_rss_mb"] = int(l.split(":")[1]) / 1024
    return res


def summarize(rs: list[dict]) -> dict:
    r = dict(min(rs, key=lambda x: x["total_s"]))
    r["total_s_all"] = [x["total_s"] for x in rs]
    r["peak_mb_all"] = [x["peak_mb"] for x in rs]
    r["peak_mb"] = float(np.median(r["peak_mb_all"]))
    names = list(dict.fromkeys(n for x in rs for n, _, _ in x["stages"]))
    r["stages"] = [[n, min(dict((a, b) for a, b, _ in x["stages"]).get(n, 0.0) for x in rs),
                    float(np.median([dict((a, c) for a, _, c in x["stages"]).get(n, 0.0) for x in rs]))]
                   for n in names]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkouts", default=f"after={HERE.parent}",
                    help="label=DIR,...: package checkouts to compare (DIR holds onnxcompress/)")
    ap.add_argument("--env", action="append", default=[],
                    help="label:NAME=VALUE: an environment variable for that checkout's child (repeatable)")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--src", help="an ONNX file instead of --model")
    ap.add_argument("--method", default="tucker2")
    ap.add_argument("--ratio", type=float, default=2)
    ap.add_argument("--samples", default="default", help="--calibration-samples (default: the CLI's)")
    ap.add_argument("--repeat", type=int, default=1, help="run the checkouts alternately this many times")
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Path(args.src) if args.src else export(args.model)
    size = model_mb(src)
    roots = {k: Path(v).resolve() for k, v in (c.split("=", 1) for c in args.checkouts.split(","))}
    envs: dict[str, dict] = {}
    for e in args.env:
        label, kv = e.split(":", 1)
        envs.setdefault(label, {})[kv.split("=", 1)[0]] = kv.split("=", 1)[1]
    print(f"model {src.name}: {size:.1f} MB; optimize --method {args.method} --ratio {args.ratio:g} --quantize int8 "
          f"--calibration random{'' if args.samples == 'default' else ' --calibration-samples ' + args.samples}; "
          f"load average {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[dict]] = {k: [] for k in roots}
    for k in range(args.repeat):
        for label, root in roots.items():
            runs[label].append(run_child(root, src, args.method, args.ratio, args.samples, envs.get(label)))
            x = runs[label][-1]
            print(f"  run {k + 1}/{args.repeat} {label}: {x['total_s']:.1f} s, peak {x['peak_mb']:.0f} MB "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    results = {label: summarize(rs) for label, rs in runs.items()}
    for label, r in results.items():
        print(f"\n[{label}] {roots[label]} {envs.get(label) or ''}: optimize {r['total_s']:.1f} s (runs: "
              f"{', '.join(f'{t:.1f}' for t in r['total_s_all'])}), peak RSS {r['peak_mb']:.0f} MB (runs: "
              f"{', '.join(f'{m:.0f}' for m in r['peak_mb_all'])}) = {r['peak_mb'] / size:.2f}x the model "
              f"(after imports {r['base_mb']:.0f} MB); SQNR {r['fidelity']['sqnr_db']}, "
              f"MACs after {r['macs_after'] / 1e9:.3f} G")
        print(f"  {'stage':48s} {'s (min)':>8s} {'peak MB':>8s}")
        for n, t, m in r["stages"]:
            print(f"  {n[:48]:48s} {t:8.2f} {m:8.0f}")
    labels = list(results)
    for b in labels[1:]:
        a = labels[0]
        ra, rb = results[a], results[b]
        print(f"\n{b} vs {a} (same run): time {ra['total_s'] / rb['total_s']:.2f}x faster (fastest runs), peak RSS "
              f"{ra['peak_mb'] / rb['peak_mb']:.2f}x lower ({rb['peak_mb'] / size:.2f}x vs {ra['peak_mb'] / size:.2f}x "
              f"the model)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_mb": size, "load": os.getloadavg(), "results": results},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
