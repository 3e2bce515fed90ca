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

It works for any decomposition method: the method supplies a :data:`ChainBuilder` (decision → the chain's
conv shapes); :func:`tucker2_chain` is the one for Tucker2. The guard wraps the pass's rank policy
(:meth:`LatencyGuard.wrap`), and takes a timing function so tests can drive it deterministically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import ConvInfo

OPSET = 17


@dataclass(frozen=True)
class ConvSpec:
    """Shape and attributes of one conv of a chain (weights are not needed to time it)."""
    in_ch: int
    out_ch: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int = 1
    bias: bool = False


#: (layer, the pass's decision for it, e.g. Tucker2 ranks) → the convs that would replace it, in order
ChainBuilder = Callable[[ConvInfo, Any], Sequence[ConvSpec]]
#: (model of the original conv, model of the chain, layer) → (seconds for the conv, seconds for the chain)
Timer = Callable[[onnx.ModelProto, onnx.ModelProto, ConvInfo], "tuple[float, float]"]


def original_spec(info: ConvInfo) -> ConvSpec:
    nd = len(info.kernel)
    return ConvSpec(info.S, info.T, tuple(info.kernel), tuple(info.strides), tuple(info.pads) or (0,) * (2 * nd),
                    tuple(info.dilations), info.group, info.has_bias)


def tucker2_chain(info: ConvInfo, ranks) -> list[ConvSpec]:
    """Tucker2: 1×1 (S→R3) · k×k (R3→R4, the conv's strides/pads/dilations) · 1×1 (R4→T, with the bias)."""
    r3, r4 = int(ranks[0]), int(ranks[1])
    nd = len(info.kernel)
    one, zero = (1,) * nd, (0,) * (2 * nd)
    o = original_spec(info)
    return [ConvSpec(info.S, r3, one, one, zero, one),
            ConvSpec(r3, r4, o.kernel, o.strides, o.pads, o.dilations),
            ConvSpec(r4, info.T, one, one, zero, one, bias=info.has_bias)]


# ------------------------------------------------------------------------------------------ one-layer models
def layer_model(in_shape: Sequence[int], convs: Sequence[ConvSpec], precision: str = "fp32",
                seed: int = 0) -> onnx.ModelProto:
    """A model holding just `convs` in sequence, input of `in_shape` (N, C, spatial...).

    precision "fp32": float in/out, float convs. "int8": uint8 in/out, every conv as DQ → Conv → Q with
    per-channel int8 weights and an int32 bias (what ORT CPU fuses to QLinearConv)."""
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


def ort_timer(provider: str = "cpu", threads: int | None = 1, warmup: int = 2, runs: int = 7) -> Timer:
    """The default timer: both one-layer models on ORT `provider`, `runs` interleaved runs after `warmup`,
    the fastest run of each (seconds). The minimum, not the median: on a loaded machine preemption only ever
    adds time, and a handful of runs is too few for a median to shed it."""
    from .bench import model_feeds, time_interleaved
    from .evaluate import make_session

    def timer(conv: onnx.ModelProto, chain: onnx.ModelProto, info: ConvInfo) -> tuple[float, float]:
        s0, s1 = make_session(conv, provider, threads=threads), make_session(chain, provider, threads=threads)
        feeds, _ = model_feeds(conv)
        t = time_interleaved([lambda: s0.run(None, feeds), lambda: s1.run(None, feeds)], warmup, runs)
        return float(np.min(t[0])), float(np.min(t[1]))

    return timer


# ------------------------------------------------------------------------------------------ policy wrappers
class PolicyWrapper:
    """A rank policy seen through `then(info, decision) -> decision`. Planners' other methods (`prepare`,
    which sees all layers before the pass asks layer by layer, `plan`, `notes`) are forwarded."""

    def __init__(self, policy: Callable[[ConvInfo], Any], then: Callable[[ConvInfo, Any], Any]):
        self.policy = policy
        self.then = then

    def __call__(self, info: ConvInfo):
        return self.then(info, self.policy(info))

    def __getattr__(self, name: str):
        if name in ("policy", "then"):
            raise AttributeError(name)
        return getattr(self.policy, name)


def align_rank(r: int, limit: int, multiple: int) -> int:
    """`r` to the nearest multiple of `multiple` (at least `multiple`); down instead of up when up would
    reach the full channel count `limit` (no compression). Unchanged when no aligned value fits."""
    if multiple <= 1 or r <= 0:
        return r
    up = max(multiple, int(round(r / multiple)) * multiple)
    if up < limit:
        return up
    down = (r // multiple) * multiple
    return down if 0 < down < limit else r


def align_ranks(policy: Callable[[ConvInfo], Any], multiple: int = 8,
                exempt: Callable[[ConvInfo], bool] | None = None) -> PolicyWrapper:
    """Round every rank the policy picks to a multiple of `multiple` (explicit per-layer ranks: `exempt`).

    ORT CPU's INT8 conv kernels (MLAS, NHWC QLinearConv) run channel counts that are a multiple of 8 far
    faster than their neighbours: a 64→31→31→64 Tucker2 chain at 56×56 takes 0.64 ms, 64→32→32→64 0.38 ms
    (measured here, one thread). Fewer channels are not less time unless they are aligned."""
    def then(info: ConvInfo, decision):
        if isinstance(decision, str) or (exempt is not None and exempt(info)):
            return decision
        limits = (info.S, info.T) + tuple([max(info.S, info.T)] * max(len(decision) - 2, 0))
        if len(decision) == 2 and info.weight_shape:
            return align_tucker2_pair(int(decision[0]), int(decision[1]), info, multiple)
        return tuple(align_rank(int(r), lim, multiple) for r, lim in zip(decision, limits))
    return PolicyWrapper(policy, then)


def align_tucker2_pair(r3: int, r4: int, info: ConvInfo, multiple: int) -> tuple[int, int]:
    """The aligned (r3, r4) whose chain size is closest to that of the planned (r3, r4): rounding each rank
    on its own over-compresses small layers (32 channels: 19, 20 → 16, 16 keeps 71 % of the planned weights;
    16, 24 keeps 101 %). Candidates: the multiples just below and above each rank, below the full channel
    count; when none fits, the rank is left as planned."""
    from .decompose.tucker2 import tucker2_params

    k = int(np.prod(info.kernel))

    def options(r: int, limit: int) -> list[int]:
        lo, hi = (r // multiple) * multiple, -(-r // multiple) * multiple
        c = sorted({v for v in (lo, hi) if 0 < v < limit})
        return c or [r]

    goal = tucker2_params(info.T, info.S, k, r3, r4)
    pairs = [(a, b) for a in options(r3, info.S) for b in options(r4, info.T)]
    return min(pairs, key=lambda p: (abs(tucker2_params(info.T, info.S, k, *p) - goal), -p[0] - p[1]))


# ------------------------------------------------------------------------------------------ the guard
@dataclass
class LatencyGuard:
    """Wraps a decomposition pass's rank policy: a layer whose chain is not faster than the conv keeps
    the conv. `min_gain`: the chain must be this many times faster (1.0: strictly faster)."""
    chain_builder: ChainBuilder
    provider: str = "cpu"
    precision: str = "fp32"
    threads: int | None = 1
    timer: Timer | None = None
    min_gain: float = 1.0
    exempt: Callable[[ConvInfo], bool] | None = None
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.timer is None:
            self.timer = ort_timer(self.provider, self.threads)

    def check(self, info: ConvInfo, decision) -> str | None:
        """None when the chain is faster (rewrite), else why the original conv stays."""
        if info.in_shape is None:
            self.measurements[info.name] = {"measured": False, "why": "input shape unknown: not timed"}
            return None
        t0 = time.perf_counter()
        conv, chain = original_spec(info), tuple(self.chain_builder(info, decision))
        key = (tuple(info.in_shape), conv, chain, self.precision)
        cached = key in self._cache
        if not cached:
            try:
                m0 = layer_model(info.in_shape, [conv], self.precision)
                m1 = layer_model(info.in_shape, chain, self.precision)
                self._cache[key] = tuple(float(t) for t in self.timer(m0, m1, info))
            except Exception as e:  # noqa: BLE001 - a layer that cannot be timed is not blocked
                self._cache[key] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        self.seconds += time.perf_counter() - t0
        res = self._cache[key]
        if isinstance(res, str):
            self.measurements[info.name] = {"measured": False, "why": f"timing failed: {res}"}
            return None
        t_conv, t_chain = res
        gain = t_conv / t_chain if t_chain > 0 else float("inf")
        rec = {"measured": True, "provider": self.provider, "precision": self.precision,
               "threads": self.threads, "in_shape": list(info.in_shape),
               "conv_ms": round(t_conv * 1e3, 4), "chain_ms": round(t_chain * 1e3, 4),
               "speedup": round(gain, 3), "cached": cached}
        self.measurements[info.name] = rec
        if gain > self.min_gain:
            rec["kept"] = "chain"
            return None
        rec["kept"] = "conv"
        if t_chain >= t_conv:
            return f"latency guard: chain {t_chain / t_conv:.2f}x slower than the conv"
        return f"latency guard: chain only {gain:.2f}x faster than the conv (needs > {self.min_gain:g}x)"

    def wrap(self, policy: Callable[[ConvInfo], Any]) -> "PolicyWrapper":
        """A policy that asks `policy` first and then times its decision (strings pass through); a
        planner's `prepare` (it sees every layer first, for global budgets) is forwarded."""
        def guarded(info: ConvInfo, decision):
            if isinstance(decision, str) or (self.exempt is not None and self.exempt(info)):
                return decision
            why = self.check(info, decision)
            return why if why is not None else decision
        return PolicyWrapper(policy, guarded)

    def annotate(self, records) -> None:
        """Put each layer's measurement into its record's `extra["latency_guard"]`."""
        for r in records:
            m = self.measurements.get(getattr(r, "name", None))
            if m is not None:
                r.extra["latency_guard"] = dict(m)

    def summary(self) -> dict[str, Any]:
        ms = [m for m in self.measurements.values() if m.get("measured")]
        return {"provider": self.provider, "precision": self.precision, "threads": self.threads,
                "min_gain": self.min_gain, "layers_timed": len(ms),
                "kept_conv": sum(1 for m in ms if m.get("kept") == "conv"),
                "kept_chain": sum(1 for m in ms if m.get("kept") == "chain"),
                "seconds": round(self.seconds, 3),
                "timed": ("INT8 QDQ conv vs INT8 QDQ chain (uint8 activations, per-channel int8 weights)"
                          if self.precision == "int8" else "FP32 conv vs FP32 chain")
                         + ", one-layer models at the layer's input shape, interleaved runs, fastest run of each"}


def guard_enabled(setting: bool | None, providers: Sequence[str]) -> bool:
    """`Recipe.latency_guard`: None = on when the first provider is the CPU."""
    if setting is not None:
        return bool(setting)
    return bool(providers) and providers[0] == "cpu"


def guard_for_recipe(recipe, chain_builder: ChainBuilder, timer: Timer | None = None) -> LatencyGuard | None:
    """The guard a Recipe asks for (None when off). Times INT8 QDQ layers when the recipe quantizes to INT8
    for ORT CPU, else FP32. Layers with explicit ranks in the recipe's per-layer table are exempt: the user
    asked for exactly that rewrite (their measurement is still not taken)."""
    if not guard_enabled(recipe.latency_guard, recipe.providers):
        return None
    provider = recipe.providers[0] if recipe.providers else "cpu"
    precision = "int8" if recipe.quantize == "int8" and provider == "cpu" else "fp32"

    return LatencyGuard(chain_builder, provider=provider, precision=precision, threads=1, timer=timer,
                        exempt=_explicit_ranks(recipe))


def _explicit_ranks(recipe) -> Callable[[ConvInfo], bool]:
    def exempt(info: ConvInfo) -> bool:
        o = recipe.override_for(info.name, info.index)
        return o is not None and o.ranks is not None
    return exempt


def aligned_for_recipe(recipe, policy):
    """`policy` with its ranks rounded to `Recipe.rank_multiple` (None: 8 when the first provider is the
    CPU, else unchanged); explicit per-layer ranks are left as written."""
    m = recipe.rank_multiple
    if m is None:
        m = 8 if (recipe.providers or ["cpu"])[0] == "cpu" else 1
    return policy if m <= 1 else align_ranks(policy, m, _explicit_ranks(recipe))
