"""Latency of ONNX models on ONNX Runtime, measured side by side.

Every model is loaded into one session per provider once, in one process; after a warm-up the runs are
interleaved round-robin (the starting model rotates every round) so that drift of the machine — other
jobs, clocks, caches — hits all models alike. Reported per model: median, p90, mean and min latency in
milliseconds, and the speedup against the first model (``t_first / t_model``, so > 1 means faster).

A provider that cannot run here (no onnxruntime-gpu, no GPU) is listed as skipped with its reason.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .._json import json_clean
from ..ir.shapes import input_shapes
from .session import PROVIDERS, ProviderUnavailable, make_session, provider_status, random_feeds

Clock = Callable[[], float]


@dataclass
class ModelTiming:
    name: str
    median_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    runs: int = 0
    speedup: float | None = None        # t_first / t_this (the first model is 1.0)
    error: str | None = None            # why this model could not run on this provider

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProviderBench:
    provider: str
    skipped: str | None = None          # reason, when the provider cannot run here
    models: list[ModelTiming] = field(default_factory=list)
    note: str | None = None


@dataclass
class BenchReport:
    threads: int | None
    warmup: int
    runs: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    providers: list[ProviderBench] = field(default_factory=list)
    method: str = ("one process, sessions built once, warm-up then runs interleaved round-robin "
                   "(start rotates each round); speedup = median(first model) / median(model)")

    def to_dict(self) -> dict:
        return json_clean(asdict(self))

    def provider(self, name: str) -> ProviderBench | None:
        return next((p for p in self.providers if p.provider == name), None)

    def table(self) -> str:
        lines = [f"threads {self.threads if self.threads else 'ORT default'}, warm-up {self.warmup}, "
                 f"{self.runs} interleaved runs per model"]
        for p in self.providers:
            if p.skipped:
                lines.append(f"[{p.provider}] skipped: {p.skipped}")
                continue
            lines.append(f"[{p.provider}]" + (f"  note: {p.note}" if p.note else ""))
            rows = [("model", "median ms", "p90 ms", "min ms", "speedup")]
            for m in p.models:
                if m.error:
                    rows.append((m.name, "-", "-", "-", f"error: {m.error}"))
                else:
                    rows.append((m.name, f"{m.median_ms:.3f}", f"{m.p90_ms:.3f}", f"{m.min_ms:.3f}",
                                 "-" if m.speedup is None else f"{m.speedup:.2f}x"))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for j, r in enumerate(rows):
                lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
                if j == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ timing core
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def time_interleaved(runners: Sequence[Callable[[], object]], warmup: int = 3, runs: int = 10,
                     clock: Clock = time.perf_counter) -> list[list[float]]:
    """Run each callable `warmup` times, then `runs` rounds of one call each, round-robin with a rotating
    start. Returns the per-call times in seconds, one list per runner."""
    n = len(runners)
    for _ in range(max(warmup, 0)):
        for r in runners:
            r()
    times: list[list[float]] = [[] for _ in range(n)]
    for k in range(max(runs, 1)):
        for j in range(n):
            i = (j + k) % n
            t0 = clock()
            runners[i]()
            times[i].append(clock() - t0)
    return times


def summarize(name: str, seconds: Sequence[float]) -> ModelTiming:
    ms = [s * 1e3 for s in seconds]
    return ModelTiming(name=name, median_ms=statistics.median(ms), p90_ms=percentile(ms, 90),
                       mean_ms=statistics.fmean(ms), min_ms=min(ms), runs=len(ms))


# ------------------------------------------------------------------------------------------ feeds
def model_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Random inputs for `model`: its static shapes, a dynamic batch dim as 1, `shapes` overriding."""
    shp = input_shapes(model, {k: tuple(v) for k, v in (shapes or {}).items()}, default_batch=1)
    return random_feeds(model, shp, seed, integers="random"), shp


def _load(m) -> tuple[str, onnx.ModelProto | str]:
    if isinstance(m, onnx.ModelProto):
        return (m.graph.name or "model"), m
    p = Path(m)
    return p.name, str(p)


# ------------------------------------------------------------------------------------------ bench
def bench(models: Sequence, providers: Sequence[str] = ("cpu",), threads: int | None = 1, warmup: int = 5,
          runs: int = 20, input_shape: dict[str, Sequence[int]] | None = None,
          names: Sequence[str] | None = None, seed: int = 0, clock: Clock = time.perf_counter,
          optimize: bool = True, cache: dict | None = None) -> BenchReport:
    """Median / p90 latency of each model (paths or ModelProtos) on each provider, interleaved.

    All models get the same random feeds when their inputs agree (shapes from the first model, dynamic
    batch = 1 unless `input_shape` pins it). `threads`: ORT intra-op threads (None = ORT's default).
    `cache`: a dict kept by the caller across calls with the same models: their sessions are made once."""
    if not models:
        raise ValueError("bench needs at least one model")
    loaded = [_load(m) for m in models]
    labels = list(names) if names is not None else _unique([n for n, _ in loaded])
    if len(labels) != len(loaded):
        raise ValueError(f"{len(labels)} names for {len(loaded)} models")
    protos = [m if isinstance(m, onnx.ModelProto) else onnx.load(m, load_external_data=False) for _, m in loaded]
    feeds0, shp0 = model_feeds(protos[0], input_shape, seed)
    feeds = []
    for p in protos:
        f, _ = model_feeds(p, input_shape, seed)
        same = set(f) == set(feeds0) and all(f[k].shape == feeds0[k].shape and f[k].dtype == feeds0[k].dtype
                                             for k in f)
        feeds.append(feeds0 if same else f)
    rep = BenchReport(threads=threads, warmup=warmup, runs=runs,
                      input_shapes={k: list(v) for k, v in shp0.items()})
    for prov in providers:
        why = provider_status(prov)
        pb = ProviderBench(provider=prov, skipped=why)
        rep.providers.append(pb)
        if why:
            continue
        if prov == "cuda":
            pb.note = ("host->device copies included in each run; INT8 QDQ models run as simulated "
                       "quantization on the CUDA EP (Q/DQ around float kernels): not an INT8 speed figure")
        elif prov == "tensorrt":
            pb.note = "host->device copies included in each run; TensorRT engines are built at session creation"
        sessions, timings = [], []
        for label, (_, m) in zip(labels, loaded):
            t = ModelTiming(name=label)
            try:
                key = (prov, labels.index(label), threads, optimize) if cache is not None else None
                s = cache.get(key) if key is not None else None
                if s is None:
                    s = make_session(m, prov, threads=threads, optimize=optimize)
                    if key is not None:
                        cache[key] = s
                if fell_back(s, prov):
                    s = None
                    t.error = (f"the {prov} session fell back to CPUExecutionProvider (its provider library "
                               f"did not load: CUDA/cuDNN libraries missing?); not timed as {prov}")
                sessions.append(s)
            except ProviderUnavailable as e:
                t.error = str(e)
                sessions.append(None)
            except Exception as e:  # noqa: BLE001 - a model that does not load is reported, not fatal
                t.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                sessions.append(None)
            timings.append(t)
        live = [i for i, s in enumerate(sessions) if s is not None]
        runners = [(lambda s=sessions[i], f=feeds[i]: s.run(None, f)) for i in live]
        for i in live:  # a model that fails at run time is reported, not fatal
            try:
                runners[live.index(i)]()
            except Exception as e:  # noqa: BLE001
                timings[i].error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        ok = [i for i in live if timings[i].error is None]
        res = time_interleaved([runners[live.index(i)] for i in ok], warmup, runs, clock)
        for i, secs in zip(ok, res):
            t = summarize(labels[i], secs)
            timings[i] = t
        first = timings[0]
        for t in timings:
            if first.median_ms and t.median_ms:
                t.speedup = first.median_ms / t.median_ms
        pb.models = timings
    return rep


def fell_back(session, provider: str) -> bool:
    """True when a session made for `provider` runs on the CPU only (ORT falls back when e.g. the CUDA
    provider's libraries fail to load)."""

    if provider == "cpu":
        return False
    try:
        return PROVIDERS[provider] not in session.get_providers()
    except Exception:  # noqa: BLE001
        return False


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}#{seen[n]}")
        else:
            seen[n] = 1
            out.append(n)
    return out


# ------------------------------------------------------------------------------------------ pipeline hook
def stage_latency(stages: Sequence[tuple[str, onnx.ModelProto]], provider: str = "cpu",
                  threads: int | None = 1, warmup: int = 3, runs: int = 15,
                  input_shape: dict[str, Sequence[int]] | None = None, seed: int = 0) -> dict:
    """Latency of the models after each pipeline stage (the first is the input model), measured side by
    side; `speedup` is the last stage against the first. The dict goes into the report under `latency`."""
    rep = bench([m for _, m in stages], [provider], threads=threads, warmup=warmup, runs=runs,
                input_shape=input_shape, names=[n for n, _ in stages], seed=seed)
    pb = rep.providers[0]
    out = {"provider": provider, "threads": threads, "warmup": warmup, "runs": runs,
           "input_shapes": rep.input_shapes, "method": rep.method, "stages": [m.to_dict() for m in pb.models],
           "speedup": None}
    if pb.skipped:
        out["skipped"] = pb.skipped
        return out
    if pb.note:
        out["note"] = pb.note
    last = pb.models[-1]
    out["speedup"] = last.speedup
    out["median_ms_before"] = pb.models[0].median_ms
    out["median_ms_after"] = last.median_ms
    return out


# ------------------------------------------------------------------------------------------ kernels
FLOAT_CONV = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose"}
INT_CONV = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}
FLOAT_ADD = {"Add", "Sum"}
INT_ADD = {"QLinearAdd"}


def ort_kernels(model, provider: str = "cpu", threads: int | None = 1) -> dict:
    """Which kernels ORT actually runs: the op types of the graph after ORT's own optimizations (all
    levels, as a session would run it), with Conv and Add split into integer and float kernels.
    A float FusedConv that absorbed a residual Add counts that Add as float."""
    import collections
    import tempfile

    import onnxruntime as ort


    with tempfile.TemporaryDirectory(prefix="onnxcompress-k-") as td:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(td) / "opt.onnx")
        data = model if isinstance(model, str) else model.SerializeToString()
        ort.InferenceSession(data, so, providers=[PROVIDERS[provider]])
        opt = onnx.load(str(Path(td) / "opt.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in opt.graph.node)
    fused_adds = sum(1 for n in opt.graph.node if n.op_type in FLOAT_CONV  # Z / Sum input: a fused Add
                     and len(n.input) > 3 and n.input[3])
    return {"ops": dict(ops),
            "conv_int": sum(ops[o] for o in INT_CONV), "conv_float": sum(ops[o] for o in FLOAT_CONV),
            "add_int": sum(ops[o] for o in INT_ADD), "add_float": sum(ops[o] for o in FLOAT_ADD) + fused_adds}


def time_models(models: Sequence, provider: str = "cpu", threads: int | None = 1, warmup: int = 2,
                runs: int = 7, seed: int = 0) -> list[float]:
    """The fastest of `runs` interleaved runs of each model (seconds), each fed seeded random inputs of its
    own input types (the same values for models with the same inputs). The minimum, not the median: on a
    loaded machine preemption only ever adds time, and a handful of runs is too few for a median to shed it."""
    protos = [m if isinstance(m, onnx.ModelProto) else onnx.load(m, load_external_data=False) for m in models]
    sessions = [make_session(m, provider, threads=threads) for m in models]
    feeds = [model_feeds(p, seed=seed)[0] for p in protos]
    t = time_interleaved([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], warmup, runs)
    return [float(np.min(x)) for x in t]


#: the result counts as slower than the input beyond this many times its median latency (measurement noise)
SLOWER_MARGIN = 1.03


def compare_latency(original, candidate, provider: str = "cpu", input_shape=None, threads: int | None = 1,
                    seed: int = 0, target_seconds: float = 2.0) -> dict:
    """Median latency of `original` and `candidate`, interleaved in one process, enough runs for about
    `target_seconds`; `slower` only when the candidate is over SLOWER_MARGIN x the original in two
    measurements (a borderline first verdict is measured again)."""
    made: dict = {}   # the two sessions serve every measurement below
    rep = bench([original, candidate], [provider], threads=threads, warmup=2, runs=3, input_shape=input_shape,
                names=["input", "result"], seed=seed, cache=made)
    pb = rep.providers[0]
    if pb.skipped or any(m.error for m in pb.models):
        return {"provider": provider, "skipped": pb.skipped or next(m.error for m in pb.models if m.error)}
    per_round = sum(m.median_ms for m in pb.models) / 1e3
    runs = int(min(200, max(10, target_seconds / max(per_round, 1e-6))))
    verdicts = []
    for _ in range(2):
        rep = bench([original, candidate], [provider], threads=threads, warmup=2, runs=runs,
                    input_shape=input_shape, names=["input", "result"], seed=seed, cache=made)
        a, b = rep.providers[0].models
        verdicts.append((a.median_ms, b.median_ms))
        if b.median_ms <= a.median_ms * SLOWER_MARGIN or b.median_ms > a.median_ms * 1.25:
            break                              # a clear verdict: no second measurement needed
    before = statistics.median(v[0] for v in verdicts)
    after = statistics.median(v[1] for v in verdicts)
    return {"provider": provider, "threads": threads, "runs": runs, "measurements": len(verdicts),
            "median_ms_before": before, "median_ms_after": after, "speedup": before / after if after else None,
            "slower": all(b > a * SLOWER_MARGIN for a, b in verdicts),
            "method": "interleaved runs in one process, median; slower = over "
                      f"{SLOWER_MARGIN:g}x the input in every measurement"}


# ------------------------------------------------------------------------------------------ per-node profile
_TOKEN_RE = re.compile(r"_token_\d+$")


@dataclass
class NodeProfile:
    """ORT profiler figures of one model per executed node (after ORT's fusions; microseconds): the median and
    the fastest kernel time over the profiled runs (on a loaded machine use the fastest: preemption only adds)."""
    path: str
    threads: int
    runs: int
    run_us: float                                                 # median wall time of a whole (profiled) run
    node_us: dict[str, float] = field(default_factory=dict)
    node_min_us: dict[str, float] = field(default_factory=dict)
    node_op: dict[str, str] = field(default_factory=dict)

    def times(self, stat: str = "min") -> dict[str, float]:
        return self.node_min_us if stat == "min" else self.node_us

    def by_op(self, stat: str = "min") -> dict[str, tuple[float, int]]:
        """op type -> (microseconds per run, nodes), slowest first."""
        acc: dict[str, list] = {}
        for n, us in self.times(stat).items():
            a = acc.setdefault(self.node_op[n], [0.0, 0])
            a[0] += us
            a[1] += 1
        return {k: (v[0], v[1]) for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0])}

    def kernel_us(self, stat: str = "min") -> float:
        return float(sum(self.times(stat).values()))


def profile_nodes(path, threads: int = 1, runs: int = 10, warmup: int = 3, feeds: dict | None = None) -> NodeProfile:
    """Per-node kernel times of the model file at `path` from ORT's profiler over `runs` runs (after `warmup`).
    The profiler costs a few microseconds per node and run: compare whole-model times un-profiled (`bench`)."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from .session import session_options

    if feeds is None:
        feeds = model_feeds(onnx.load(str(path), load_external_data=False))[0]
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"onnxcompress-prof-{os.getpid()}")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        s.run(None, feeds)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feeds)
        walls.append((time.perf_counter() - t0) * 1e6)
    f = s.end_profiling()
    try:
        with open(f) as fh:
            events = json.load(fh)
    finally:
        os.unlink(f)
    per: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            n = e["name"][: -len("_kernel_time")]
            per.setdefault(n, []).append(float(e["dur"]))
            ops[n] = e["args"].get("op_name", "?")
    prof = NodeProfile(path=str(path), threads=threads, runs=runs, run_us=statistics.median(walls))
    for n, ts in per.items():
        ts = ts[-runs:]          # the warm-up runs are profiled too
        prof.node_us[n] = float(statistics.median(ts))
        prof.node_min_us[n] = float(min(ts))
        prof.node_op[n] = ops[n]
    return prof


def node_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """MACs of each Conv / Gemm / MatMul node (by name) at static input shapes; weights behind a
    DequantizeLinear (QDQ models) are followed to their initializer. Shapes from a weightless copy."""
    from ..ir.shapes import infer_value_shapes

    vs = infer_value_shapes(model, shapes)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}

    def wshape(name):
        if name in inits:
            return inits[name]
        p = prod.get(name)
        if p is not None and p.op_type == "DequantizeLinear":
            return inits.get(p.input[0])
        return vs.get(name)

    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            ws, os_ = wshape(n.input[1]), vs.get(n.output[0])
            if ws and os_:
                out[n.name] = int(np.prod(ws)) * int(np.prod(os_[2:])) * int(os_[0])
        elif n.op_type in ("Gemm", "MatMul"):
            a, o = vs.get(n.input[0]), vs.get(n.output[0])
            if a and o:
                trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
                k = a[0] if (n.op_type == "Gemm" and trans_a) else a[-1]
                out[n.name] = int(np.prod(o)) * int(k)
    return out


def executed_layer(node_name: str, layers) -> str | None:
    """The layer an executed node belongs to: its own name (minus ORT's ``_token_N``) when that is a layer, else
    the longest ``/``-prefix that is one (chain factors are named ``<layer>/<factor>``)."""
    base = _TOKEN_RE.sub("", node_name)
    if base in layers:
        return base
    parts = base.split("/")
    for k in range(len(parts) - 1, 0, -1):
        cand = "/".join(parts[:k])
        if cand in layers:
            return cand
    return None


def factor_of(node_name: str) -> str:
    """``/a/Conv/t2_core_token_17`` -> ``t2_core``: the node's last path part without ORT's token."""
    return _TOKEN_RE.sub("", node_name).rsplit("/", 1)[-1]
