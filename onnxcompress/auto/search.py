"""The auto search: choose per layer keep / factorize (method, ranks) and INT8 / float to maximise the objective
(latency or size) under the accuracy budget, and never return a model that is worse than the input.

1. Measure: every option's one-layer latency on the target provider (candidates.measure_latency) and every
   layer's sensitivity (the analyze sweep on the calibration split: one layer factorized at each grid ratio,
   one layer in INT8), cached on disk.
2. Predict and solve: the output-noise energies of the chosen options add (ALGORITHMS §5); a multiple-choice
   knapsack (decompose.allocate) picks one option per layer maximising the objective with a predicted noise
   of at most τ.
3. Verify: the chosen model is built with the real passes and measured on data held apart from everything the
   choices were made on: the budget, the whole model's latency against the input (interleaved), its size. τ is
   then bisected (geometrically: up while the budget holds, down when it misses), bounded rounds.
4. Never worse: the result meets the budget on the held-apart data, is not slower (objective latency) and not
   larger than the input; INT8 alone is always one of the candidates, and where nothing qualifies the lossless
   clean-up of the input is the result (the caller says why).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..decompose import allocate as al
from .budget import Budget
from .candidates import Option

MAX_ROUNDS = 6
#: candidates whose whole-model latencies are within this fraction of the fastest count as equally fast: the
#: most faithful of them wins (timing noise must not buy a less accurate model)
LATENCY_TIE = 0.03


@dataclass
class Verified:
    """One built and measured candidate."""
    label: str
    tau: float | None
    selection: dict[str, Option]
    predicted: float
    fidelity: Any
    measured: float | None
    met: bool
    latency: dict
    bytes: int
    ok: bool
    why_not: str | None
    model: Any = field(default=None, repr=False)
    build_info: Any = field(default=None, repr=False)

    def point(self) -> dict:
        f = self.fidelity
        return {"label": self.label, "tau": self.tau, "predicted_noise": self.predicted,
                "measured": self.measured, "budget_met": self.met, "ok": self.ok, "why_not": self.why_not,
                "top1_agreement": f.top1_agreement, "sqnr_db": f.sqnr_db, "accuracy_drop": f.accuracy_drop,
                "latency_ratio": self.latency.get("speedup"), "median_ms": self.latency.get("median_ms_after"),
                "bytes": self.bytes,
                "layers_factorized": sum(1 for o in self.selection.values() if o.method),
                "layers_int8": sum(1 for o in self.selection.values() if o.precision == "int8")}


def _value(o: Option, objective: str) -> float:
    if objective == "size":
        return float(o.bytes_saved) + 1e-9 * o.saved_s
    return o.saved_s + 1e-12 * o.bytes_saved


def solve(options: dict[str, list[Option]], tau: float, objective: str, base_precision: str) -> dict[str, Option]:
    """One option per layer: the largest total objective value whose summed predicted noise is at most τ
    (exact multiple-choice knapsack); the base option of each layer (the layer as it is, in
    `base_precision`) is always available."""
    curves, index = {}, {}
    for name, opts in options.items():
        base = next(o for o in opts if o.method is None and o.precision == base_precision)
        usable = [o for o in opts if o.noise is not None and o is not base]
        bv = _value(base, objective)
        entries = [(max(base.noise or 0.0, 0.0), 0.0, None)]
        for o in usable:
            entries.append((max(o.noise, 0.0), -(_value(o, objective) - bv), o.key))
        curves[name] = entries
        index[name] = {o.key: o for o in usable} | {None: base}
    baseline = sum(e[0][0] for e in curves.values())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc = al.allocate_sensitivity(curves, max(tau, baseline), baseline)
    return {name: index[name][alloc[name]] for name in options}


def predicted(selection: dict[str, Option]) -> float:
    return float(sum(o.noise or 0.0 for o in selection.values()))


class Search:
    """`build(selection) -> (model, build_info)` makes the model of a selection with the real passes;
    `measure(model) -> (fidelity, latency dict, bytes)` measures it on the held-apart data against the input."""

    def __init__(self, options: dict[str, list[Option]], budget: Budget, objective: str, base_precision: str,
                 build: Callable, measure: Callable, input_bytes: int, progress=None, rounds: int = MAX_ROUNDS,
                 int8_allowed: bool = False):
        self.options, self.budget, self.objective = options, budget, objective
        self.base_precision = base_precision
        self.build, self.measure = build, measure
        self.input_bytes = input_bytes
        self.progress = progress
        self.rounds = rounds
        self.int8_allowed = int8_allowed
        self.verified: list[Verified] = []
        self._seen: dict[tuple, Verified] = {}

    def note(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    def verify(self, selection: dict[str, Option], label: str, tau: float | None) -> Verified:
        key = tuple(sorted((n, o.key) for n, o in selection.items()))
        if key in self._seen:
            return self._seen[key]
        t0 = time.perf_counter()
        model, info = self.build(selection)
        fid, lat, nbytes = self.measure(model)
        met = self.budget.met(fid)
        why = None
        if not met:
            v = self.budget.measured(fid)
            why = f"misses the budget ({self.budget.describe()}; measured {v if v is None else round(v, 4)})"
        elif self.objective == "latency" and lat.get("slower"):
            why = "slower than the input"
        elif nbytes > self.input_bytes:
            why = "larger than the input"
        v = Verified(label, tau, dict(selection), predicted(selection), fid, self.budget.measured(fid), met, lat,
                     nbytes, why is None, why, model, info)
        self.verified.append(v)
        self._seen[key] = v
        self.note(f"auto: {label}: {self.budget.kind} {v.measured if v.measured is None else round(v.measured, 4)}"
                  f", latency x{lat.get('speedup') or float('nan'):.2f}, {'ok' if v.ok else why} "
                  f"({time.perf_counter() - t0:.1f}s)")
        return v

    def run(self) -> Verified | None:
        """The best verified candidate that qualifies (None when none does)."""
        if self.int8_allowed:   # INT8 alone: the baseline auto must never do worse than
            self.verify({n: next(o for o in opts if o.method is None and o.precision == "int8")
                         for n, opts in self.options.items()}, "int8-only", None)
        tau = self.budget.initial_noise()
        lo, hi = 0.0, math.inf
        for r in range(self.rounds):
            sel = solve(self.options, tau, self.objective, self.base_precision)
            v = self.verify(sel, f"round {r + 1} (tau {tau:.3g})", tau)
            if v.met:
                lo = max(lo, tau)
            else:
                hi = min(hi, tau)
            nxt = tau * 4 if hi == math.inf else (tau / 4 if lo == 0 else math.sqrt(lo * hi))
            if hi != math.inf and lo > 0 and hi / lo < 1.3:
                break
            if nxt > 1e3 or nxt < 1e-9:
                break
            tau = nxt
        return self.best()

    def best(self) -> Verified | None:
        """The qualifying candidate with the best objective; near-ties (LATENCY_TIE, or equal size) go to the
        most faithful (highest SQNR)."""
        ok = [v for v in self.verified if v.ok]
        if not ok:
            return None
        fid = lambda v: v.fidelity.sqnr_db if v.fidelity.sqnr_db is not None else -math.inf   # noqa: E731
        if self.objective == "size":
            top = min(v.bytes for v in ok)
            return max((v for v in ok if v.bytes <= top * 1.0001), key=fid)
        lat = lambda v: v.latency.get("median_ms_after") or math.inf   # noqa: E731
        top = min(lat(v) for v in ok)
        return max((v for v in ok if lat(v) <= top * (1 + LATENCY_TIE)), key=fid)

    def frontier(self) -> list[dict]:
        return [v.point() for v in self.verified]
