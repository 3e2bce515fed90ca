"""Per-layer and global Tucker2 rank / budget allocation (ALGORITHMS.md §1.4-§1.5).

Pure numerics on small layer descriptors; numpy only, no ONNX imports.

Conventions
-----------
* ``ratio`` is a *compression* ratio: original cost / compressed cost (> 1).
  The kept fraction is ``rho = 1 / ratio``.
* Costs exclude the bias (it is identical before and after; add ``T`` params /
  ``T*h_out*w_out`` adds yourself if you need them).
* ``target`` selects the cost metric: ``"params"`` or ``"macs"``.
* Rank pairs are ``(r3, r4)``: r3 on the input-channel side (S), r4 on the
  output-channel side (T); chain = 1x1 S->r3, kh x kw r3->r4, 1x1 r4->T.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from .tucker2 import tucker2_params  # noqa: F401  (re-exported: P_T2 = S*r3 + r3*r4*K + r4*T)

__all__ = [
    "LayerSpec",
    "tucker2_params",
    "tucker2_macs",
    "conv_params",
    "conv_macs",
    "conv_cost",
    "tucker2_cost",
    "proportional_ranks",
    "candidate_ranks",
    "allocate_later_first",
    "allocate_sensitivity",
    "uniform_ranks",
    "total_cost",
    "DEFAULT_RATIOS",
]

DEFAULT_RATIOS: tuple[float, ...] = (1.5, 2, 3, 4, 6, 8)
_TARGETS = ("params", "macs")


@dataclass
class LayerSpec:
    """Descriptor of one decomposable conv. ``index`` = topological position."""

    name: str
    T: int
    S: int
    kh: int
    kw: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    index: int

    @property
    def K(self) -> int:
        return self.kh * self.kw


def _check_target(target: str) -> None:
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")


# ----------------------------------------------------------------------------------------------
# Cost formulas (ALGORITHMS §1.4)
# ----------------------------------------------------------------------------------------------
def tucker2_macs(spec: LayerSpec, r3: int, r4: int) -> int:
    """F_T2 = S*r3*h_in*w_in + r3*r4*K*h_out*w_out + r4*T*h_out*w_out (conv1 runs at input resolution)."""
    hw_in = spec.h_in * spec.w_in
    hw_out = spec.h_out * spec.w_out
    return int(spec.S * r3 * hw_in + r3 * r4 * spec.K * hw_out + r4 * spec.T * hw_out)


def conv_params(spec: LayerSpec) -> int:
    """P_0 = T*S*K (no bias)."""
    return int(spec.T * spec.S * spec.K)


def conv_macs(spec: LayerSpec) -> int:
    """F_0 = T*S*K*h_out*w_out."""
    return int(spec.T * spec.S * spec.K * spec.h_out * spec.w_out)


def conv_cost(spec: LayerSpec, target: str = "params") -> int:
    _check_target(target)
    return conv_params(spec) if target == "params" else conv_macs(spec)


def tucker2_cost(spec: LayerSpec, r3: int, r4: int, target: str = "params") -> int:
    _check_target(target)
    if target == "params":
        return tucker2_params(spec.T, spec.S, spec.K, r3, r4)
    return tucker2_macs(spec, r3, r4)


def total_cost(specs: Sequence[LayerSpec], alloc: Mapping[str, Any], target: str = "params") -> int:
    """Sum over ``specs`` of the chain cost (alloc[name] = (r3, r4)) or the original cost (None/missing)."""
    tot = 0
    for sp in specs:
        rr = alloc.get(sp.name)
        tot += conv_cost(sp, target) if rr is None else tucker2_cost(sp, rr[0], rr[1], target)
    return tot


# ----------------------------------------------------------------------------------------------
# Per-layer ranks (ALGORITHMS §1.5)
# ----------------------------------------------------------------------------------------------
def _kappa(spec: LayerSpec, rho: float, target: str) -> float:
    """Positive root of a k^2 + b k - c = 0 for R3 = k S, R4 = k T.

    params: a = S T K,           b = S^2 + T^2,                       c = rho S T K
    macs:   a = S T K H'W',      b = S^2 H W + T^2 H'W',              c = rho S T K H'W'
    """
    S, T, K = spec.S, spec.T, spec.K
    if target == "params":
        a = S * T * K
        b = S * S + T * T
    else:
        hw_in = spec.h_in * spec.w_in
        hw_out = spec.h_out * spec.w_out
        a = S * T * K * hw_out
        b = S * S * hw_in + T * T * hw_out
    c = rho * a
    a, b, c = float(a), float(b), float(c)
    # numerically stable positive root: 2c / (b + sqrt(b^2 + 4ac))
    return 2.0 * c / (b + math.sqrt(b * b + 4.0 * a * c))


def proportional_ranks(spec: LayerSpec, ratio: float, target: str = "params") -> tuple[int, int] | None:
    """Proportional ranks (r3, r4) ~ (kappa S, kappa T) whose chain cost is ~ cost0 / ratio.

    kappa solves the §1.5 quadratic (for ``macs`` with the spatial weights:
    kappa^2 S T K H'W' + kappa (S^2 H W + T^2 H'W') = rho S T K H'W').
    Rounding: among floor/ceil of kappa*S and kappa*T (clamped to 1..S, 1..T)
    whose chain is strictly cheaper than the original conv in the ``target``
    metric, the pair whose cost is closest to cost0/ratio is taken (ties -> the
    plain-rounded pair, then the cheaper).  Returns None when no such pair
    exists (tiny layers) or when ``ratio <= 1`` (no compression asked for).
    """
    _check_target(target)
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    if ratio <= 1:
        return None
    S, T = spec.S, spec.T
    rho = 1.0 / ratio
    kap = _kappa(spec, rho, target)
    x3, x4 = kap * S, kap * T
    goal = conv_cost(spec, target) * rho

    def clamp(v: int, hi: int) -> int:
        return max(1, min(hi, v))

    rounded = (clamp(int(math.floor(x3 + 0.5)), S), clamp(int(math.floor(x4 + 0.5)), T))
    cands = {(clamp(a, S), clamp(b, T)) for a in (math.floor(x3), math.ceil(x3))
             for b in (math.floor(x4), math.ceil(x4))}
    cands.add(rounded)

    c0 = conv_cost(spec, target)
    cost = {rr: tucker2_cost(spec, rr[0], rr[1], target) for rr in cands}
    ok = [rr for rr in sorted(cands) if cost[rr] < c0]
    if not ok:
        return None
    return min(ok, key=lambda rr: (abs(cost[rr] - goal), rr != rounded, cost[rr]))


def candidate_ranks(spec: LayerSpec, ratios: Sequence[float] = DEFAULT_RATIOS,
                    target: str = "params") -> list[tuple[float, int, int, int, int]]:
    """[(ratio, r3, r4, params, macs)] for each ratio whose proportional ranks exist.

    Ordered as ``ratios`` (normally increasing aggressiveness); a rank pair that
    repeats an earlier one (tiny layers) is dropped.
    """
    out: list[tuple[float, int, int, int, int]] = []
    seen: set[tuple[int, int]] = set()
    for rt in ratios:
        rr = proportional_ranks(spec, rt, target)
        if rr is None or rr in seen:
            continue
        seen.add(rr)
        out.append((rt, rr[0], rr[1], tucker2_params(spec.T, spec.S, spec.K, *rr), tucker2_macs(spec, *rr)))
    return out


def uniform_ranks(specs: Sequence[LayerSpec], ratio: float, target: str = "params") -> dict[str, tuple[int, int] | None]:
    """Every layer at the same per-layer ratio (proportional ranks); None where not worth it."""
    _check_target(target)
    return {sp.name: proportional_ranks(sp, ratio, target) for sp in specs}


# ----------------------------------------------------------------------------------------------
# Global allocation: later layers first
# ----------------------------------------------------------------------------------------------
def allocate_later_first(specs: Sequence[LayerSpec], ratio: float,
                         per_layer_ratio: float | Sequence[float] | None = None,
                         target: str = "params") -> dict[str, tuple[int, int] | None]:
    """Decompose later layers first until sum(cost) over ALL ``specs`` <= sum(cost0) / ratio.

    Layers are visited by decreasing ``index`` (ties: later in ``specs`` first).
    Each visited layer is decomposed as follows:

    * ``per_layer_ratio`` is a number: at that fixed ratio (proportional ranks);
    * otherwise it is a ladder of ratios (default :data:`DEFAULT_RATIOS`), tried
      in increasing aggressiveness: the first (least aggressive) candidate whose
      saving alone meets the remaining need is taken; if none does, the most
      aggressive one is taken and the walk continues with the next-earlier layer.

    Stops as soon as the global target is met; unvisited / non-compressible
    layers map to None.  If even all layers cannot meet the target, the
    best-effort allocation is returned with a ``RuntimeWarning``.
    """
    _check_target(target)
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    alloc: dict[str, tuple[int, int] | None] = {sp.name: None for sp in specs}
    before = sum(conv_cost(sp, target) for sp in specs)
    goal = before / ratio
    current = float(before)
    order = sorted(range(len(specs)), key=lambda i: (specs[i].index, i), reverse=True)
    fixed = per_layer_ratio is not None and not isinstance(per_layer_ratio, (list, tuple, np.ndarray))
    ladder = DEFAULT_RATIOS if per_layer_ratio is None or fixed else tuple(per_layer_ratio)
    tcol = 3 if target == "params" else 4
    for i in order:
        if current <= goal:
            break
        sp = specs[i]
        c0 = conv_cost(sp, target)
        need = current - goal
        if fixed:
            rr = proportional_ranks(sp, float(per_layer_ratio), target)
            if rr is None:
                continue
            new = tucker2_cost(sp, rr[0], rr[1], target)
        else:
            cands = candidate_ranks(sp, ladder, target)
            if not cands:
                continue
            pick = next((c for c in cands if c0 - c[tcol] >= need), None)
            if pick is None:
                pick = min(cands, key=lambda c: c[tcol])
            rr = (pick[1], pick[2])
            new = pick[tcol]
        if new >= c0:
            continue
        alloc[sp.name] = rr
        current += new - c0
    if current > goal:
        warnings.warn(f"allocate_later_first: target ratio {ratio} not reached "
                      f"(achieved {before / current:.3f})", RuntimeWarning, stacklevel=2)
    return alloc


# ----------------------------------------------------------------------------------------------
# Global allocation: sensitivity curves (multiple-choice knapsack)
# ----------------------------------------------------------------------------------------------
Option = tuple  # (cost_after, predicted_degradation, payload)


def _validate_curves(curves: Mapping[Hashable, Sequence[Option]]):
    names = list(curves)
    costs, degs, payloads, keep_cost = [], [], [], []
    for n in names:
        opts = list(curves[n])
        if not opts:
            raise ValueError(f"layer {n!r}: empty option list")
        c = np.array([float(o[0]) for o in opts])
        d = np.array([float(o[1]) for o in opts])
        if np.any(c < 0) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(d)):
            raise ValueError(f"layer {n!r}: costs must be finite and >= 0, degradations finite")
        keep = [j for j, o in enumerate(opts) if o[2] is None]
        if not keep:
            raise ValueError(f"layer {n!r}: the 'keep original' option (payload None) is missing")
        costs.append(c)
        degs.append(d)
        payloads.append([o[2] for o in opts])
        keep_cost.append(float(c[keep].max()))
    return names, costs, degs, payloads, keep_cost


def _mck_dp(costs, degs, capacity: float, max_states: int):
    """Exact multiple-choice knapsack by a Pareto-frontier DP over real-valued costs.

    State after layer l = set of non-dominated (partial cost, partial degradation)
    pairs with partial cost <= capacity (costs are >= 0, so an over-budget prefix
    can never become feasible).  Exact unless the frontier exceeds
    ``max_states``; then it is thinned to one state per cost bucket (keeping the
    cheapest state overall), which keeps results feasible but may lose optimality.
    Returns (choice indices, exact) or (None, True) when infeasible.
    """
    fc = np.zeros(1)
    fd = np.zeros(1)
    parents: list[np.ndarray] = []
    opts_idx: list[np.ndarray] = []
    exact = True
    slack = 1e-9 * max(1.0, abs(capacity))
    for c, d in zip(costs, degs):
        nc = (fc[:, None] + c[None, :]).ravel()
        nd = (fd[:, None] + d[None, :]).ravel()
        par = np.repeat(np.arange(fc.size), c.size)
        opt = np.tile(np.arange(c.size), fc.size)
        ok = nc <= capacity + slack
        if not ok.any():
            return None, True
        nc, nd, par, opt = nc[ok], nd[ok], par[ok], opt[ok]
        o = np.lexsort((nd, nc))  # by cost, then degradation
        nc, nd, par, opt = nc[o], nd[o], par[o], opt[o]
        # keep strictly improving degradation along increasing cost
        prev_min = np.minimum.accumulate(nd)
        keep = np.ones(nd.size, dtype=bool)
        keep[1:] = nd[1:] < prev_min[:-1]
        nc, nd, par, opt = nc[keep], nd[keep], par[keep], opt[keep]
        if nc.size > max_states:
            exact = False
            width = (nc[-1] - nc[0]) / max_states if nc[-1] > nc[0] else 1.0
            b = np.floor((nc - nc[0]) / width).astype(np.int64)
            last = np.ones(nc.size, dtype=bool)
            last[:-1] = b[1:] != b[:-1]  # last state of each bucket has the lowest degradation
            last[0] = True  # always keep the cheapest state (feasibility)
            nc, nd, par, opt = nc[last], nd[last], par[last], opt[last]
        fc, fd = nc, nd
        parents.append(par)
        opts_idx.append(opt)
    best = int(np.argmin(fd))  # ties -> first = cheapest
    choice = [0] * len(costs)
    k = best
    for layer in range(len(costs) - 1, -1, -1):
        choice[layer] = int(opts_idx[layer][k])
        k = int(parents[layer][k])
    return choice, exact


def _mck_greedy(costs, degs, capacity: float):
    """Convex-hull greedy (LP relaxation of the multiple-choice knapsack).

    Start each layer at its lowest-degradation option (cheapest among ties), then
    repeatedly take the lower-convex-hull step with the smallest added
    degradation per saved cost until the total fits; finally hill-climb with
    single-layer switches that lower the degradation and still fit.  Not exact
    (integrality gap), but exact for a single layer.
    """
    cur = []
    steps = []  # (slope, layer, seq, to_option)
    for l, (c, d) in enumerate(zip(costs, degs)):
        order = np.lexsort((c, d))  # by degradation, then cost
        start = int(order[0])
        cur.append(start)
        # Pareto set, descending cost / ascending degradation, starting at `start`
        pts = [(c[j], d[j], j) for j in range(c.size) if c[j] < c[start]]
        pts.sort(key=lambda p: (-p[0], p[1]))
        pareto = [(c[start], d[start], start)]
        for p in pts:
            # a cheaper point is useful only if it is strictly cheaper than the last kept one
            if p[0] < pareto[-1][0]:
                pareto.append(p)
        # lower convex hull of (saved cost, degradation) walking to cheaper options
        hull = [pareto[0]]
        for p in pareto[1:]:
            while len(hull) >= 2:
                (c1, d1, _), (c2, d2, _) = hull[-2], hull[-1]
                # slope(h1->h2) >= slope(h1->p)  => h2 not on lower hull
                if (d2 - d1) * (c1 - p[0]) >= (p[1] - d1) * (c1 - c2):
                    hull.pop()
                else:
                    break
            hull.append(p)
        for s in range(1, len(hull)):
            slope = (hull[s][1] - hull[s - 1][1]) / (hull[s - 1][0] - hull[s][0])
            steps.append((slope, l, s, hull[s][2]))
    total = sum(float(c[j]) for c, j in zip(costs, cur))
    steps.sort(key=lambda t: (t[0], t[1], t[2]))
    for slope, l, s, j in steps:  # per-layer steps have increasing slopes -> taken in order
        if total <= capacity:
            break
        total += float(costs[l][j]) - float(costs[l][cur[l]])
        cur[l] = j
    if total > capacity:
        return None
    # Local improvement (the last hull step usually overshoots the budget): repeatedly apply the
    # single-layer switch with the largest degradation decrease that still fits.
    while True:
        best = None
        for l, (c, d) in enumerate(zip(costs, degs)):
            nt = total - c[cur[l]] + c
            gain = d[cur[l]] - d
            gain[nt > capacity] = 0.0
            j = int(np.argmax(gain))
            if gain[j] > 0 and (best is None or gain[j] > best[0]):
                best = (float(gain[j]), l, j, float(nt[j]))
        if best is None:
            return cur
        _, l, j, total = best
        cur[l] = j


def allocate_sensitivity(curves: Mapping[str, Sequence[Option]], budget_total: float, baseline_total: float,
                         target: str = "params", method: str = "dp",
                         max_states: int = 200_000) -> dict[str, Any]:
    """Pick one option per layer minimising total predicted degradation under a cost budget.

    ``curves[name]`` lists options ``(cost_after, predicted_degradation, payload)``
    (cost in the ``target`` metric, which is otherwise informational).  Each
    list must contain the "keep original" option, marked by ``payload is None``
    (degradation normally 0); its cost is the layer's original cost.

    ``baseline_total`` is the model's total cost with every layer kept; the part
    not covered by ``curves`` (baseline_total - sum of keep costs) is fixed.  The
    constraint is ``fixed + sum(chosen cost) <= budget_total``.

    Returns {name: payload of the chosen option} (None = keep original).

    ``method="dp"`` (default): exact Pareto-frontier DP over real costs (no
    discretisation); it stays exact while the frontier has <= ``max_states``
    states, otherwise it thins the frontier by cost buckets (feasible,
    near-optimal) and warns.  ``method="greedy"``: convex-hull greedy by
    marginal degradation per saved cost plus single-switch hill climbing
    (fast, heuristic; never better than "dp").
    If no choice fits the budget, the cheapest choice per layer is returned
    with a ``RuntimeWarning``.
    """
    _check_target(target)
    names, costs, degs, payloads, keep_cost = _validate_curves(curves)
    fixed = float(baseline_total) - sum(keep_cost)
    if fixed < -1e-9 * max(1.0, abs(float(baseline_total))):
        raise ValueError("baseline_total is smaller than the sum of the layers' keep-original costs")
    capacity = float(budget_total) - max(fixed, 0.0)
    if method == "dp":
        choice, exact = _mck_dp(costs, degs, capacity, max_states)
        if not exact:
            warnings.warn("allocate_sensitivity: frontier thinned (max_states reached); result may be "
                          "slightly suboptimal", RuntimeWarning, stacklevel=2)
    elif method == "greedy":
        choice = _mck_greedy(costs, degs, capacity)
    else:
        raise ValueError(f"method must be 'dp' or 'greedy', got {method!r}")
    if choice is None:
        warnings.warn("allocate_sensitivity: budget infeasible; returning the cheapest option per layer",
                      RuntimeWarning, stacklevel=2)
        choice = [int(np.lexsort((d, c))[0]) for c, d in zip(costs, degs)]
    return {n: payloads[i][choice[i]] for i, n in enumerate(names)}
