"""Latency guard: keep a conv whose factor chain would not run faster than it.

Fewer MACs do not always mean less time: a chain of three small convs pays three kernel launches, three
passes over memory and (in INT8) three requantizations, and a thin 1×1 conv runs far below the peak of a
fat one. A decomposed layer that costs more time is a regression, not a compression, so before a
decomposition pass rewrites a layer the guard times, on the target provider and at the layer's real input
shape, a one-layer model of the original conv against a model of the candidate chain (same input,
interleaved runs, fastest of a handful; :func:`onnxcompress.bench.time_interleaved`), and keeps the original where the
chain is not faster.

What is timed: with ``precision="int8"`` (the default when the pipeline quantizes to INT8 for ORT CPU) each
conv of both models is wrapped as DequantizeLinear → Conv → QuantizeLinear with uint8 activations and
per-channel int8 weights, uint8 in and out — the pattern ORT fuses to QLinearConv, i.e. the integer kernels
the final model runs; otherwise FP32 conv vs FP32 chain. Weights are random (kernel speed does not depend
on their values); Relu/Add around the layer are not included (they are the same on both sides).

It works for every method alike: the method's cost model gives the original layer and its chain as conv
shapes (`original`, `chain`); the guard runs over the plan (:meth:`LatencyGuard.apply`) and keeps the layers
whose chain is not faster, with the measurement in the plan. It takes a timing function so tests can drive it
deterministically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..decompose.costs import ConvSpec
from .latency_cache import DEFAULT_NEED, MAX_ROUNDS, TimingCache, default_dir, measure

OPSET = 17


#: (model of the original layer, model of the chain, layer name) → (seconds for the original, for the chain)
Timer = Callable[[onnx.ModelProto, onnx.ModelProto, str], "tuple[float, float]"]


# ------------------------------------------------------------------------------------------ one-layer models
def layer_model(in_shape: Sequence[int], convs: Sequence[ConvSpec], precision: str = "fp32",
                seed: int = 0, copies: int = 1) -> onnx.ModelProto:
    """A model holding just `convs` in sequence, input of `in_shape` (N, C, spatial...).

    precision "fp32": float in/out, float convs. "int8": uint8 in/out, every conv as DQ → Conv → Q with
    per-channel int8 weights and an int32 bias (what ORT CPU fuses to QLinearConv).
    `copies` > 1: that many independent copies of the chain (own weights, so ORT cannot merge them) on the
    same input, one output each: a small layer's time then outweighs the fixed cost of a session run."""
    if copies > 1:
        return _copies(in_shape, convs, precision, seed, copies)
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
    rng = np.random.default_rng(seed)
    q8 = precision == "int8"
    nodes, inits = [], []
    x = "x"
    if q8:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), "a_zp")]
    for i, c in enumerate(convs):
        wshape = (c.out_ch, c.in_ch // c.group) + tuple(c.kernel)
        fan_in = int(np.prod(wshape[1:]))
        w = (rng.standard_normal(wshape) / np.sqrt(fan_in)).astype(np.float32)
        ins = []
        if q8:
            xd = f"x{i}_dq"
            nodes.append(helper.make_node("DequantizeLinear", [x, "a_scale", "a_zp"], [xd]))
            sw = (np.abs(w).reshape(c.out_ch, -1).max(1) / 127.0 + 1e-8).astype(np.float32)
            wq = np.clip(np.round(w / sw.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(wq, f"w{i}_q"), numpy_helper.from_array(sw, f"w{i}_s"),
                      numpy_helper.from_array(np.zeros(c.out_ch, np.int8), f"w{i}_zp")]
            nodes.append(helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_zp"], [f"w{i}"],
                                          axis=0))
            ins = [xd, f"w{i}"]
            if c.bias:
                bs = (0.05 * sw).astype(np.float32)
                inits += [numpy_helper.from_array(rng.integers(-1000, 1000, c.out_ch).astype(np.int32), f"b{i}_q"),
                          numpy_helper.from_array(bs, f"b{i}_s"),
                          numpy_helper.from_array(np.zeros(c.out_ch, np.int32), f"b{i}_zp")]
                nodes.append(helper.make_node("DequantizeLinear", [f"b{i}_q", f"b{i}_s", f"b{i}_zp"], [f"b{i}"],
                                              axis=0))
                ins.append(f"b{i}")
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            ins = [x, f"w{i}"]
            if c.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(c.out_ch).astype(np.float32), f"b{i}"))
                ins.append(f"b{i}")
        y = f"y{i}"
        nodes.append(helper.make_node("Conv", ins, [y], name=f"conv{i}", kernel_shape=list(c.kernel),
                                      strides=list(c.strides), pads=list(c.pads), dilations=list(c.dilations),
                                      group=c.group))
        if q8:
            nodes.append(helper.make_node("QuantizeLinear", [y, "a_scale", "a_zp"], [f"y{i}_q"]))
            y = f"y{i}_q"
        x = y
    et = TensorProto.UINT8 if q8 else TensorProto.FLOAT
    nodes[-1].output[0] = "out"
    g = helper.make_graph(nodes, "latency_guard", [helper.make_tensor_value_info("x", et, list(in_shape))],
                          [helper.make_tensor_value_info("out", et, [None] * len(in_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def _copies(in_shape, convs, precision, seed, copies) -> onnx.ModelProto:
    shared = {"x", "a_scale", "a_zp"}
    base = None
    for j in range(copies):
        m = layer_model(in_shape, convs, precision, seed + j)
        ren = lambda n: n if n in shared or not n else f"k{j}_{n}"   # noqa: E731
        for n in m.graph.node:
            n.name = ren(n.name) if n.name else n.name
            n.input[:] = [ren(i) for i in n.input]
            n.output[:] = [ren(o) for o in n.output]
        for t in m.graph.initializer:
            t.name = ren(t.name)
        m.graph.output[0].name = ren(m.graph.output[0].name)
        if base is None:
            base = m
            continue
        base.graph.node.extend(m.graph.node)
        base.graph.initializer.extend(t for t in m.graph.initializer if t.name not in shared)
        base.graph.output.extend(m.graph.output)
    return base


#: a timed layer model holds at least this many MACs (copies of a small layer; see layer_model)
COPIES_TARGET_MACS = 16_000_000
MAX_COPIES = 32


def copies_for(macs: int | None) -> int:
    """How many copies of a layer to time together so that a run costs ~COPIES_TARGET_MACS."""
    macs = macs or 0
    return 1 if macs <= 0 else int(max(1, min(MAX_COPIES, -(-COPIES_TARGET_MACS // macs))))


def ort_timer(provider: str = "cpu", threads: int | None = 1, warmup: int = 2, runs: int = 7) -> Timer:
    """The default timer: one round = both one-layer models on ORT `provider` in new sessions, `runs`
    interleaved runs after `warmup`, the fastest run of each (seconds). The minimum, not the median: on a
    loaded machine preemption only ever adds time. The guard asks for rounds until its verdict is clear
    (latency_cache.measure); new sessions each round, because a session's own placement in memory moves
    its time by several percent for its whole life (measured: the same small layer pair 1.05x to 1.26x
    across processes with one session pair each)."""
    from ..ort.session import make_session
    from ..ort.timing import model_feeds, time_interleaved

    def timer(conv: onnx.ModelProto, chain: onnx.ModelProto, name: str) -> tuple[float, float]:
        s0, s1 = make_session(conv, provider, threads=threads), make_session(chain, provider, threads=threads)
        feeds, _ = model_feeds(conv)
        t = time_interleaved([lambda: s0.run(None, feeds), lambda: s1.run(None, feeds)], warmup, runs)
        return float(np.min(t[0])), float(np.min(t[1]))

    return timer


# ------------------------------------------------------------------------------------------ the guard
@dataclass
class LatencyGuard:
    """Keeps, in a plan, the layers whose chain is not clearly faster than the original on the target provider.
    `min_gain`: the chain must be this many times faster (1.05: 5 % faster; a tie keeps the original). The
    timer is asked for rounds until the verdict is clear, at most `max_rounds` (latency_cache.decide); `disk`:
    a TimingCache that keeps the rounds per layer shape and machine, so that the next run decides the same
    without timing again (None: in-memory only)."""
    provider: str = "cpu"
    precision: str = "fp32"
    threads: int | None = 1
    timer: Timer | None = None
    min_gain: float = DEFAULT_NEED
    max_rounds: int = MAX_ROUNDS
    disk: TimingCache | None = None
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.timer is None:
            self.timer = ort_timer(self.provider, self.threads)

    def check(self, name: str, in_shape, original: Sequence[ConvSpec], chain: Sequence[ConvSpec],
              macs: int | None = None) -> str | None:
        """None when the chain is clearly faster (rewrite), else why the original stays."""
        if in_shape is None:
            self.measurements[name] = {"measured": False, "why": "input shape unknown: not timed"}
            return None
        t0 = time.perf_counter()
        original, chain = tuple(original), tuple(chain)
        k = copies_for(macs)
        key = (tuple(in_shape), original, chain, self.precision, k)
        source = "run" if key in self._cache else None
        if source is None:
            dkey = TimingCache.key(in_shape=list(in_shape), conv=original, chain=chain, precision=self.precision,
                                   provider=self.provider, threads=self.threads, copies=k)
            stored = self.disk.get(dkey) if self.disk is not None else None
            try:
                models = []

                def one_round():
                    if not models:
                        models.extend([layer_model(in_shape, original, self.precision, copies=k),
                                       layer_model(in_shape, chain, self.precision, copies=k)])
                    return self.timer(models[0], models[1], name)

                v, rounds = measure(one_round, self.min_gain, self.max_rounds, stored)
                if self.disk is not None and rounds != stored:
                    self.disk.put(dkey, rounds, {"layer": name, "in_shape": list(in_shape),
                                                 "provider": self.provider, "precision": self.precision})
                self._cache[key] = (v, rounds, "disk" if stored and rounds == stored else False)
            except Exception as e:  # noqa: BLE001 - a layer that cannot be timed is not blocked
                self._cache[key] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        self.seconds += time.perf_counter() - t0
        res = self._cache[key]
        if isinstance(res, str):
            self.measurements[name] = {"measured": False, "why": f"timing failed: {res}"}
            return None
        v, rounds, cached = res
        t_conv, t_chain = min(a for a, _ in rounds) / k, min(b for _, b in rounds) / k   # per copy
        rec = {"measured": True, "provider": self.provider, "precision": self.precision,
               "threads": self.threads, "in_shape": list(in_shape), "copies": k,
               "conv_ms": round(t_conv * 1e3, 4), "chain_ms": round(t_chain * 1e3, 4),
               "speedup": round(v.speedup, 3), "speedup_range": [round(v.lo, 3), round(v.hi, 3)],
               "needs": self.min_gain, "margin": round(v.margin, 3), "rounds": v.rounds,
               "verdict": "clear" if v.clear else "tie", "cached": source or cached, "kept": v.kept}
        self.measurements[name] = rec
        if v.kept == "chain":
            return None
        if not v.clear:
            return (f"latency guard: chain {v.speedup:.2f}x the conv's speed after {v.rounds} rounds, too close "
                    f"to the {self.min_gain:g}x it needs (a tie keeps the conv)")
        if v.speedup <= 1.0:
            return f"latency guard: chain {1 / v.speedup:.2f}x slower than the conv"
        return f"latency guard: chain only {v.speedup:.2f}x faster than the conv (needs > {self.min_gain:g}x)"

    def apply(self, plan, layers, methods, progress=None) -> None:
        """Time every planned layer (explicit ranks excepted: the user asked for exactly that rewrite) and keep
        the original where its chain is not faster; each layer's measurement goes into its plan."""
        by_name = {i.name: i for i in layers}
        todo = [lp for lp in plan.planned() if not lp.explicit and lp.name in by_name]
        for k, lp in enumerate(todo):
            info, cost = by_name[lp.name], methods[lp.method]
            orig, chain = cost.original(info), cost.chain(info, lp.ranks)
            if not orig or not chain:
                continue
            if progress:
                progress(f"latency guard {k + 1}/{len(todo)}: {lp.name}")
            why = self.check(lp.name, info.in_shape, orig, chain, info.macs)
            if lp.name in self.measurements:
                lp.extra["latency_guard"] = dict(self.measurements[lp.name])
            if why is not None:
                lp.keep(why)

    def summary(self) -> dict[str, Any]:
        ms = [m for m in self.measurements.values() if m.get("measured")]
        return {"provider": self.provider, "precision": self.precision, "threads": self.threads,
                "min_gain": self.min_gain, "layers_timed": len(ms),
                "kept_conv": sum(1 for m in ms if m.get("kept") == "conv"),
                "kept_chain": sum(1 for m in ms if m.get("kept") == "chain"),
                "ties": sum(1 for m in ms if m.get("verdict") == "tie"),
                "smallest_margin": min((abs(m["margin"]) for m in ms if "margin" in m), default=None),
                "rounds": sum(m.get("rounds", 0) for m in ms if m.get("cached") is False),
                "cache": str(self.disk.root) if self.disk is not None and self.disk.root else None,
                "cache_hits": sum(1 for m in ms if m.get("cached") == "disk"),
                "seconds": round(self.seconds, 3),
                "timed": ("INT8 QDQ conv vs INT8 QDQ chain (uint8 activations, per-channel int8 weights)"
                          if self.precision == "int8" else "FP32 conv vs FP32 chain")
                         + ", one-layer models at the layer's input shape, interleaved runs, fastest run of each, "
                           f"rounds until the verdict is clear (chain needs >= {self.min_gain:g}x; a tie keeps "
                           f"the conv)"}


def guard_enabled(setting: bool | None, providers: Sequence[str]) -> bool:
    """`Recipe.latency_guard`: None = on when the first provider is the CPU."""
    if setting is not None:
        return bool(setting)
    return bool(providers) and providers[0] == "cpu"


def guard_for_recipe(recipe, timer: Timer | None = None) -> LatencyGuard | None:
    """The guard a Recipe asks for (None when off). Times INT8 QDQ layers when the recipe quantizes to INT8
    for ORT CPU, else FP32 (INT4 too: ORT CPU runs int4 convs as DequantizeLinear → float Conv)."""
    if not guard_enabled(recipe.latency_guard, recipe.providers):
        return None
    provider = recipe.providers[0] if recipe.providers else "cpu"
    precision = "int8" if recipe.quantize == "int8" and provider == "cpu" else "fp32"
    return LatencyGuard(provider=provider, precision=precision, threads=1, timer=timer,
                        disk=TimingCache(default_dir()) if timer is None else None)
