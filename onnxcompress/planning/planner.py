"""The planner: one for every method. It turns a Recipe into per-layer decisions — which method, which ranks,
or why the layer stays — by speaking to each method only through its cost model (decompose.costs.CostModel:
weights and MACs as a function of the ranks, ranks for a ratio, EVBMF ranks, aligned options).

Per layer, in order: the recipe's per-layer override (`skip`, `method`, `ranks`, `ratio`), the method's own
limits (what it can take), `--include/--exclude`, `skip_first`, `svd_skip_last`; the remaining ("free")
layers share one global policy: `--rank vbmf[:w]` (capped by the budget when one is given), else a target
(`--ratio R` in weights, or `--target-macs F` = ratio 1/F in MACs) under `--allocation uniform` (every layer at
R), `later-first` (layers from the end of the network until the free layers together meet R) or
`sensitivity` (a multiple-choice knapsack over measured per-layer curves). A recipe may mix methods per layer.

Then alignment (`rank_multiple`; for the CPU provider 16, else 8 where no multiple of 16 fits: CPU_MULTIPLE): each
planned rank tuple is replaced by the aligned option (each rank the multiple just below or above) whose cost is
closest to the planned cost, never more than one alignment step below a planned rank and never more than 1.25x
the planned layer ratio; a layer with no such option is kept, with the reason. Explicit per-layer ranks are used
as written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..decompose import allocate as al
from ..decompose.costs import MAX_OVERSHOOT, CostModel, Ranks, closest_by_cost
from ..errors import UserError
from ..recipe import Recipe, parse_rank

DEFAULT_RATIO = 2.0
#: an aligned layer may end at most this many times the ratio asked of it (uniform R: never beyond 1.25 R), or
#: of its planned ratio where the allocation chose it
MAX_ALIGN_OVERSHOOT = MAX_OVERSHOOT
KXK_METHODS = ("tucker2", "cp4", "cp3")


@dataclass
class LayerPlan:
    """The plan for one layer. `ranks` None means the layer stays as it is, for `reason`."""
    name: str
    op: str
    method: str | None
    ranks: Ranks | None = None
    reason: str | None = None
    planned: Ranks | None = None        # ranks before alignment
    asked_ratio: float | None = None    # the ratio asked of this layer (uniform R, a per-layer ratio)
    explicit: bool = False              # ranks written in the recipe: no alignment, no latency guard
    free: bool = False                  # decided by the global policy
    predicted_degradation: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def keep(self, reason: str) -> None:
        self.ranks, self.reason = None, reason

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "method": self.method,
                "ranks": list(self.ranks) if self.ranks is not None else None, "reason": self.reason,
                "planned_ranks": list(self.planned) if self.planned is not None else None,
                "explicit": self.explicit, "predicted_degradation": self.predicted_degradation, **self.extra}


@dataclass
class Plan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def policy(self, method: str) -> Callable[[Any], Any]:
        """The rank policy a decomposition pass asks layer by layer: ranks, or the reason to leave it."""
        def decide(info):
            lp = self.layers.get(info.name)
            if lp is None:
                return "not in the plan"
            if lp.ranks is None:
                return lp.reason or "kept by the plan"
            if lp.method != method:
                return f"planned for {lp.method}"
            return lp.ranks
        return decide

    def methods(self) -> list[str]:
        """Methods with at least one layer to rewrite, in first-use order."""
        return list(dict.fromkeys(lp.method for lp in self.layers.values() if lp.ranks is not None))

    def planned(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.ranks is not None]


class Planner:
    """`methods`: cost model per method name (the pass registry's). `curves`: sensitivity options per layer
    for `--allocation sensitivity` ({layer: [(ranks | None, degradation)]}, see planning.sensitivity)."""

    def __init__(self, recipe: Recipe, methods: Mapping[str, CostModel]):
        self.recipe = recipe.validate()
        self.methods = dict(methods)
        m = recipe.rank_multiple
        self.multiple = Multiple(m) if m is not None else default_multiple((recipe.providers or ["cpu"])[0])

    # ------------------------------------------------------------------------------------------ methods
    def candidate_methods(self, info) -> tuple[list[str], str | None]:
        """The methods `--method auto` may try on a layer (overrides, skip rules and what each method takes
        respected), or ([], why not)."""
        r = self.recipe
        o = r.override_for(info.name, info.index)
        if o is not None and o.method not in (None, "auto"):
            m, why = self.method_for(info)
            if why is None:
                why = self.methods[m].takes(info) or self._selection_reason(info)
            return ([m], None) if why is None else ([], why)
        if o is not None and o.skip:
            return [], "skipped by the recipe"
        why = self._selection_reason(info)
        if why:
            return [], why
        family = self._family(info)
        names = [m for m in ((*KXK_METHODS,) if family == "kxk" else ("svd",)) if m in self.methods]
        ok = [m for m in names if self.methods[m].takes(info) is None]
        if not ok:
            return [], next((self.methods[m].takes(info) for m in names), "no method takes it")
        return ok, None

    def _selection_reason(self, info) -> str | None:
        r = self.recipe
        why = r.selected(info.name)
        if why:
            return why
        is_conv = getattr(info, "kind", "conv") == "conv"
        if r.skip_first and is_conv and info.index == 0:
            return "first conv (skip_first)"
        if not is_conv and getattr(info, "last", False) and r.svd_skip_last:
            return "last Gemm/MatMul (classifier; svd_skip_last)"
        return None

    def method_for(self, info) -> tuple[str | None, str | None]:
        """(method, None) for a layer, or (None, reason) when no method applies; overrides first. Under
        `--method auto` the first of the layer's candidate methods."""
        r = self.recipe
        o = r.override_for(info.name, info.index)
        if o is not None and o.skip:
            return None, "skipped by the recipe"
        asked = o.method if o is not None and o.method is not None else r.method
        explicit = o is not None and o.method is not None
        if asked == "auto":
            ms, why = self.candidate_methods(info)
            return (ms[0], None) if ms else (None, why)
        if asked == "none":
            return None, "recipe asks for method none" if explicit else "method none"
        family = self._family(info)
        m = asked
        if asked in KXK_METHODS and family == "linear":
            if explicit:
                return None, f"recipe asks for method {asked} (not a k×k conv)"
            if info.kind != "conv" and not (r.svd_gemm or asked == "svd"):
                return None, "Gemm/MatMul: SVD only with --method svd or svd_gemm"
            m = "svd"
        elif asked == "svd" and family == "kxk":
            return None, ("recipe asks for method svd (k×k conv)" if explicit
                          else "k×k conv (SVD takes 1×1 convs, Gemm and MatMul)")
        if m not in self.methods:
            return None, f"method {m} is not available"
        return m, None

    @staticmethod
    def _family(info) -> str:
        return "linear" if hasattr(info, "kind") and hasattr(info, "W") else "kxk"

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, layers: Sequence[Any], curves: Mapping[str, list] | None = None) -> Plan:
        """The plan for `layers` (layer facts in topological order)."""
        plan = Plan()
        free: list[tuple[Any, LayerPlan]] = []
        for info in layers:
            m, why = self.method_for(info)
            lp = LayerPlan(info.name, getattr(info, "op", "Conv"), m)
            plan.layers[info.name] = lp
            if why is not None:
                lp.keep(why)
                continue
            cost = self.methods[m]
            why = cost.takes(info)
            if why is not None:
                lp.keep(why)
                continue
            why = self._fixed(info, lp, cost)
            if why is False:      # free: the global policy decides
                lp.free = True
                free.append((info, lp))
            elif isinstance(why, str):
                lp.keep(why)
        if free:
            self._global(free, plan, curves)
        self._align(layers, plan)
        return plan

    def _fixed(self, info, lp: LayerPlan, cost: CostModel):
        """Decide a layer from the override table and the selection rules: ranks set on `lp` (returns None),
        a reason (str), or False when the layer is free for the global policy."""
        r = self.recipe
        o = r.override_for(info.name, info.index)
        if o is not None and o.ranks is not None:
            try:
                lp.ranks = lp.planned = cost.check_ranks(info, o.ranks)
            except ValueError as e:
                raise UserError(f"layer {info.name}: {e}") from None
            lp.explicit = True
            return None
        if o is not None and o.ratio is not None:
            rr = cost.ranks_for_ratio(info, o.ratio, "params")
            if rr is None:
                return f"chain would not shrink at ratio {o.ratio:g}"
            lp.ranks, lp.planned, lp.asked_ratio = rr, rr, float(o.ratio)
            return None
        return self._selection_reason(info) or False

    def _target(self, infos) -> tuple[str, float]:
        r = self.recipe
        target = "macs" if r.target_macs is not None else "params"
        ratio = (1.0 / r.target_macs) if r.target_macs is not None else (r.ratio or DEFAULT_RATIO)
        if target == "macs" and any(i.in_shape is None or i.out_shape is None for i in infos):
            raise UserError("--target-macs needs static shapes for every layer: pass --input-shape")
        return target, ratio

    def _global(self, free: list[tuple[Any, LayerPlan]], plan: Plan, curves) -> None:
        r = self.recipe
        infos = [i for i, _ in free]
        target, ratio = self._target(infos)
        cost = {i.name: self.methods[lp.method] for i, lp in free}
        if r.rank is not None:
            w = parse_rank(r.rank)
            budget = r.ratio is not None or r.target_macs is not None
            for info, lp in free:
                c = cost[info.name]
                rr = c.vbmf_ranks(info, w)
                if budget:
                    cap = c.ranks_for_ratio(info, ratio, target)
                    if cap is not None:
                        rr = tuple(min(a, b) for a, b in zip(rr, cap))
                if tuple(rr) == tuple(c.full_ranks(info)):
                    lp.keep(f"EVBMF (w={w:g}) keeps full rank")
                elif not c.shrinks(info, rr):
                    lp.keep(f"EVBMF (w={w:g}) ranks {','.join(map(str, rr))} would not shrink the layer")
                else:
                    lp.ranks = lp.planned = tuple(rr)
            return
        if r.allocation == "uniform":
            alloc = {i.name: cost[i.name].ranks_for_ratio(i, ratio, target) for i in infos}
            kept = f"chain would not shrink at ratio {ratio:g}"
        elif r.allocation == "later-first":
            alloc = self._later_first(infos, cost, ratio, target, plan)
            kept = "left for the global target (later-first)"
        else:
            if curves is None:
                raise UserError("--allocation sensitivity needs per-layer sensitivity curves: pass --sensitivity "
                                "FILE (analyze.json from `onnxcompress analyze`), or calibration data to "
                                "measure them")
            alloc = self._sensitivity(infos, cost, ratio, target, curves, plan)
            kept = "kept by the sensitivity allocation"
        for info, lp in free:
            rr = alloc.get(info.name)
            if rr is None:
                lp.keep(kept)
            else:
                lp.ranks = lp.planned = tuple(rr)
                if r.allocation == "uniform":
                    lp.asked_ratio = ratio
        before = sum(cost[i.name].cost(i, None, target) for i in infos)
        after = sum(cost[i.name].cost(i, alloc.get(i.name), target) for i in infos)
        plan.summary.update({"target": target, "ratio_asked": ratio, "ratio_planned": before / max(after, 1e-300),
                             "allocation": r.allocation})

    def _later_first(self, infos, cost, ratio: float, target: str, plan: Plan) -> dict:
        """Decompose from the end of the network until the free layers together meet cost0 / ratio: each
        visited layer takes the least aggressive ladder ratio whose saving alone meets the remaining need, else
        the most aggressive, and the walk goes on."""
        alloc: dict[str, Ranks | None] = {i.name: None for i in infos}
        before = sum(cost[i.name].cost(i, None, target) for i in infos)
        goal, current = before / ratio, before
        for info in reversed(infos):
            if current <= goal:
                break
            c = cost[info.name]
            c0 = c.cost(info, None, target)
            cands = c.candidates(info, al.DEFAULT_RATIOS, target)
            if not cands:
                continue
            need = current - goal
            pick = next((rr for rr in cands if c0 - c.cost(info, rr, target) >= need), None)
            if pick is None:
                pick = min(cands, key=lambda rr: c.cost(info, rr, target))
            new = c.cost(info, pick, target)
            if new >= c0:
                continue
            alloc[info.name] = pick
            current += new - c0
        if current > goal:
            plan.notes.append(f"later-first: target ratio {ratio:g} not reached (achieved {before / current:.3f})")
        return alloc

    def _sensitivity(self, infos, cost, ratio: float, target: str, curves, plan: Plan) -> dict:
        from .sensitivity import options_for

        opts = {}
        for info in infos:
            c = cost[info.name]
            pts = curves.get((info.name, c.method)) if isinstance(curves, dict) else None
            if pts is None:
                raise UserError(f"the sensitivity curves have no measurement for layer {info.name} with method "
                                f"{c.method}: were they measured on this model? (rerun `onnxcompress analyze`)")
            opts[info.name] = options_for(c, info, pts, target)
        baseline = float(sum(cost[i.name].cost(i, None, target) for i in infos))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alloc = al.allocate_sensitivity(opts, baseline / ratio, baseline, target=target)
        plan.notes += [str(c.message) for c in caught]
        pred = 0.0
        for info in infos:
            d = next(o[1] for o in opts[info.name] if o[2] == alloc[info.name])
            pred += d
            plan.layers[info.name].predicted_degradation = d
        got = sum(cost[i.name].cost(i, alloc[i.name], target) for i in infos)
        plan.summary["predicted_degradation"] = pred
        plan.notes.append(f"sensitivity allocation: {target} ratio {baseline / max(got, 1):.3f} over {len(infos)} "
                          f"layers (target {ratio:g}), predicted degradation {pred:.4g}")
        return alloc

    # ------------------------------------------------------------------------------------------ alignment
    def _align(self, layers, plan: Plan) -> None:
        m = self.multiple
        target = "macs" if self.recipe.target_macs is not None else "params"
        for info in layers:
            lp = plan.layers[info.name]
            if lp.ranks is None or lp.explicit:
                continue
            pick, why = align(self.methods[lp.method], info, lp.ranks, m, target, lp.asked_ratio)
            if pick is None:
                lp.keep(why)
            elif pick != lp.ranks:
                lp.extra["aligned_from"] = list(lp.ranks)
                lp.ranks = pick


class Multiple(int):
    """A rank multiple (an int) with an optional `fallback`: the multiple `align` uses for a layer where no rank
    aligned to the first one fits (e.g. 16, else 8)."""

    def __new__(cls, value: int, fallback: int | None = None):
        obj = super().__new__(cls, int(value))
        obj.fallback = int(fallback) if fallback and fallback != int(value) else None
        return obj

    def __repr__(self) -> str:
        return f"{int(self)}" + (f" (else {self.fallback})" if self.fallback else "")


#: ORT CPU's integer kernels (MLAS u8s8, AVX-512 VNNI here) time a conv as a staircase in its output channels with
#: steps at multiples of 16 (benchmarks/bench_int8_align.py): ranks on multiples of 16 — never 16k+8, and never
#: below 16 where 16 still shrinks the layer — else, where no multiple of 16 fits the plan (small layers: 32-64
#: channels), multiples of 8 (benchmarks/profile_ops.py --align, the digits CNN of benchmarks/bench_int8_align.py)
CPU_MULTIPLE = Multiple(16, fallback=8)


def default_multiple(provider: str) -> Multiple:
    """The rank multiple a provider's kernels want when the recipe names none."""
    return CPU_MULTIPLE if provider == "cpu" else Multiple(1)


def align(c: CostModel, info, ranks: Ranks, multiple: int, target: str = "params",
          asked_ratio: float | None = None) -> tuple[Ranks | None, str | None]:
    """The aligned ranks closest in cost to `ranks` (each rank the multiple just below or above), that still
    shrink the layer and stay within MAX_ALIGN_OVERSHOOT x the asked ratio (else of the planned one); when none
    fits (or only ranks no multiple reaches below their limit, which aligned_options keeps as they are) and
    `multiple` has a `fallback` (a Multiple), the result for the fallback multiple; (None, why) when no option
    fits."""
    tgt = target if c.cost_known(info, target) else "params"
    goal = c.cost(info, ranks, tgt)
    c0 = c.cost(info, None, tgt)
    floor = c0 / (MAX_ALIGN_OVERSHOOT * asked_ratio) if asked_ratio else goal / MAX_ALIGN_OVERSHOOT
    opts = c.aligned_options(info, ranks, int(multiple))
    pick = closest_by_cost(c, info, opts, goal, tgt, ok=lambda rr: floor <= c.cost(info, rr, tgt) < c0)
    fallback = getattr(multiple, "fallback", None)
    if fallback and (pick is None or any(r % int(multiple) for r in pick)):   # none fits, or only unaligned ones
        return align(c, info, ranks, Multiple(fallback), target, asked_ratio)
    if pick is None:
        return None, _misaligned(c, info, ranks, opts, int(multiple), tgt, c0, goal, asked_ratio)
    return pick, None


def _misaligned(c: CostModel, info, ranks, opts, m: int, tgt: str, c0: float, goal: float,
                asked: float | None) -> str:
    """Why no (aligned) rank fits: each option either does not shrink the layer or overshoots the ratio."""
    bound = f"{MAX_ALIGN_OVERSHOOT:g}x the asked {asked:g}x" if asked else f"{MAX_ALIGN_OVERSHOOT:g}x of the plan"
    if m <= 1:
        return (f"ranks {','.join(map(str, ranks))} would make the layer {c0 / goal:.2f}x smaller, beyond {bound} "
                f"(layer too small for this ratio)")
    shown = ", ".join(
        f"{'/'.join(map(str, rr))} -> {c0 / max(c.cost(info, rr, tgt), 1e-300):.2f}x" for rr in opts)
    return (f"no rank aligned to {m} fits the plan (ranks {','.join(map(str, ranks))}, {c0 / goal:.2f}x planned; "
            f"aligned: {shown}; must shrink the layer and stay within {bound})")
