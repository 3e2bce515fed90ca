"""The options of every layer for the auto search, each with a measured latency (one-layer models at the
layer's real input shape, in the precision it would run, interleaved on the target provider) and a measured
sensitivity (the whole model's output-noise energy with only that layer changed: the analyze sweep, cached).

Options per layer: keep it in float, keep it in INT8, or factorize it (every method that takes it, at a few
ratios) in INT8 or float — as the quantization setting allows. The predicted degradation of an option is its
output-noise energy 10^(-SQNR/10) (ALGORITHMS §5: the energies of independent errors add); a factorized layer
in INT8 is predicted as its factorization noise plus CHAIN_INT8 times the layer's own INT8 noise (a chain has
more quantized tensors than the conv it replaces)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..decompose.costs import Ranks

#: INT8 noise of a factorized chain relative to the original layer's (ALGORITHMS §5: "about 2–3x")
CHAIN_INT8 = 2.5
#: per-layer ratios the search tries for every method
GRID = (1.5, 2.0, 3.0)
#: samples the one-layer sensitivities are measured on (output-noise energy is a mean over every output
#: element of every sample: a few dozen samples give it to a few percent)
SENSITIVITY_SAMPLES = 32


@dataclass
class Option:
    layer: str
    method: str | None          # None: the layer as it is
    ranks: Ranks | None
    precision: str              # "int8" | "float"
    seconds: float | None = None      # one-layer time (None: not timed, e.g. Gemm/MatMul)
    saved_s: float = 0.0              # vs the original layer in float
    bytes_saved: int = 0              # vs the original layer in float
    noise: float | None = None        # predicted output-noise energy (None: not measured)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.layer, self.method, self.ranks, self.precision)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "method": self.method, "ranks": list(self.ranks) if self.ranks else None,
                "precision": self.precision, "seconds": self.seconds, "saved_ms": 1e3 * self.saved_s,
                "bytes_saved": self.bytes_saved, "predicted_noise": self.noise}


def enumerate_options(layers, plan_methods: dict, methods: dict, precisions: Sequence[str],
                      grid: Sequence[float] = GRID, multiple: int = 1) -> dict[str, list[Option]]:
    """Every option of every layer (before measurement). `plan_methods`: {layer: [methods]} that may factorize
    it (the planner's rules: overrides, skip rules, what each method takes); ranks aligned to `multiple` as
    the planner aligns them."""
    from ..planning.planner import align

    out: dict[str, list[Option]] = {}
    for info in layers:
        opts = [Option(info.name, None, None, p) for p in precisions]
        for m in plan_methods.get(info.name, []):
            cost = methods[m]
            seen = set()
            for r in grid:
                rr = cost.ranks_for_ratio(info, r, "params")
                if rr is not None and multiple > 1:
                    rr, _ = align(cost, info, tuple(rr), multiple, "params", r)
                if rr is None or rr in seen:
                    continue
                seen.add(rr)
                opts += [Option(info.name, m, tuple(rr), p, extra={"ratio": r}) for p in precisions]
        out[info.name] = opts
    return out


def _bytes(info, cost, ranks, precision: str) -> int:
    per = {"int8": 1, "int4": 0.5}.get(precision, 4)
    n = cost.weights(info, ranks) if cost is not None else int(info.params)
    return int(per * int(n))


def measure_latency(layers, options: dict[str, list[Option]], methods: dict, provider: str,
                    progress: Callable[[str], None] | None = None, timer=None) -> dict:
    """Time every option of every conv layer at its input shape (one interleaved session set per layer);
    fills `seconds`, `saved_s` (vs the layer in float) and `bytes_saved` of each option. Returns facts."""
    from ..ir.layers import conv_spec
    from ..ort.timing import time_models
    from ..planning.latency_guard import layer_model

    t0 = time.perf_counter()
    timed = 0
    conv_layers = [i for i in layers if options.get(i.name)]
    for k, info in enumerate(conv_layers):
        opts = options[info.name]
        conv = info if hasattr(info, "weight_shape") else getattr(info, "conv", None)
        base_cost = next((methods[o.method] for o in opts if o.method), None)
        for o in opts:
            cost = methods[o.method] if o.method else base_cost
            o.bytes_saved = _bytes(info, base_cost, None, "float") - _bytes(info, cost, o.ranks, o.precision)
        if conv is None or info.in_shape is None or conv.problem is not None:
            continue
        if progress:
            eta = (time.perf_counter() - t0) / k * (len(conv_layers) - k) if k else None
            progress(f"latency {k + 1}/{len(conv_layers)}: {info.name}" + (f" (eta {eta:.0f}s)" if eta else ""))
        orig = [conv_spec(conv)]
        models, keys = [], []
        for o in opts:
            specs = orig if o.method is None else methods[o.method].chain(info, o.ranks)
            if not specs:
                continue
            keys.append(o)
            # INT4 runs as float convs on ORT CPU (the per-run dequantization of the weights is not timed)
            models.append(layer_model(info.in_shape, specs, "int8" if o.precision == "int8" else "fp32"))
        if not models:
            continue
        try:
            secs = (timer or time_models)(models, provider)
        except Exception as e:  # noqa: BLE001 - an untimable layer keeps no latency claim
            for o in keys:
                o.extra["timing"] = f"failed: {str(e).splitlines()[0][:120]}"
            continue
        timed += 1
        base = next((s for o, s in zip(keys, secs) if o.method is None and o.precision == "float"), None)
        for o, s in zip(keys, secs):
            o.seconds = s
            o.saved_s = (base - s) if base is not None else 0.0
    return {"layers_timed": timed, "seconds": round(time.perf_counter() - t0, 2), "provider": provider}


def predicted_noise(options: dict[str, list[Option]], td_noise: dict, int8_noise: dict,
                    int4_noise: dict | None = None) -> None:
    """Fill each option's predicted noise from the sweep: td_noise[(layer, method, ranks)], int8_noise[layer],
    int4_noise[layer] (weight-only INT4 of the layer, auto/int4.py; plus the layer's INT8 noise, when measured,
    for the INT8 activations of a mixed model)."""
    for name, opts in options.items():
        q8 = int8_noise.get(name)
        w4 = (int4_noise or {}).get(name)
        for o in opts:
            q = q8 if o.precision != "int4" else (None if w4 is None else w4 + (q8 or 0.0))
            t = td_noise.get((name, o.method, o.ranks)) if o.method is not None else None
            o.extra["measured"] = {k: v for k, v in (("factorized_noise", t), ("int8_noise", q8),
                                                     ("int4_weight_noise", w4 if o.precision == "int4" else None))
                                   if v is not None}
            if o.method is None:
                o.noise = 0.0 if o.precision == "float" else q
            else:
                if t is None:
                    o.noise = None
                elif o.precision == "float":
                    o.noise = t
                else:
                    o.noise = None if q is None else t + CHAIN_INT8 * q
