"""Cost models: what a factorization method costs as a function of its ranks — the vocabulary the planner
speaks for every method alike (ALGORITHMS.md §1.4, §2.1, §6). Numbers only (no ONNX).

A method's cost model (each pass module defines one, subclassing `CostModel`) answers, for one layer:
whether the method can take it, the chain's parameters and MACs at given ranks, the ranks for a target ratio
(in parameters or MACs), EVBMF ranks, the aligned rank options around planned ranks, and the shapes of the
convs of its chain (for the latency guard). Ranks are tuples of ints: Tucker2 (r3, r4), CP (R,), SVD (r,).
Layers are the facts objects of `ir.layers` (duck-typed: name, index, T, S, kernel, in_shape, out_shape,
params, macs, has_bias ...)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

Ranks = tuple[int, ...]
TARGETS = ("params", "macs")


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


class CostModel:
    """Base class; subclasses set `method` and `family` and implement the abstract methods."""
    method: str = ""
    #: which layers the method competes for: "kxk" (convs with a spatial kernel) or "linear" (1×1 convs, Gemm,
    #: MatMul)
    family: str = ""

    # ---------------------------------------------------------------- per method
    def takes(self, layer) -> str | None:
        """Why the method cannot rewrite this layer (None when it can)."""
        raise NotImplementedError

    def full_ranks(self, layer) -> Ranks:
        raise NotImplementedError

    def weights(self, layer, ranks: Ranks | None) -> int:
        """Weights of the chain at `ranks` (None: of the original layer), bias excluded: ratios count weights,
        the bias is the same before and after."""
        raise NotImplementedError

    def macs(self, layer, ranks: Ranks | None) -> int | None:
        """MACs of the chain at `ranks` (None: of the original layer); None when shapes are unknown."""
        raise NotImplementedError

    def params(self, layer, ranks: Ranks | None) -> int:
        """Parameters as the report counts them: weights plus the bias."""
        return self.weights(layer, ranks) + (layer.T if layer.has_bias else 0)

    def ranks_for_ratio(self, layer, ratio: float, target: str = "params") -> Ranks | None:
        """Ranks whose chain costs about original / ratio in `target`; None when no rank shrinks the layer."""
        raise NotImplementedError

    def vbmf_ranks(self, layer, weakening: float) -> Ranks:
        raise NotImplementedError

    def original(self, layer) -> list[ConvSpec]:
        """The layer as convs (for one-layer timing); [] where it is not a conv."""
        return []

    def chain(self, layer, ranks: Ranks) -> list[ConvSpec]:
        """The convs that replace the layer (for one-layer timing); [] where the chain is not convs."""
        return []

    def check_ranks(self, layer, ranks: Sequence[int]) -> Ranks:
        """Explicit ranks (a recipe's per-layer `ranks`) validated: ValueError with the reason when malformed."""
        full = self.full_ranks(layer)
        if len(ranks) != len(full):
            raise ValueError(f"{self.method} ranks must be {len(full)} integer(s), got {list(ranks)}")
        r = tuple(int(x) for x in ranks)
        if any(x < 1 for x in r):
            raise ValueError(f"{self.method} ranks must be >= 1, got {list(r)}")
        if any(x > f for x, f in zip(r, self.rank_limits(layer))):
            raise ValueError(f"{self.method} ranks {list(r)} exceed the layer's limits {list(self.rank_limits(layer))}")
        return r

    def rank_limits(self, layer) -> Ranks:
        """Largest meaningful value of each rank."""
        return self.full_ranks(layer)

    # ---------------------------------------------------------------- generic
    def cost(self, layer, ranks: Ranks | None, target: str = "params") -> float:
        """The layer's cost in `target` with `ranks` (None: the original layer)."""
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        v = self.weights(layer, ranks) if target == "params" else self.macs(layer, ranks)
        if v is None:
            raise ValueError(f"layer {layer.name}: {target} unknown (static shapes needed)")
        return float(v)

    def cost_known(self, layer, target: str) -> bool:
        return target == "params" or self.macs(layer, None) is not None

    def shrinks(self, layer, ranks: Ranks, target: str = "params") -> bool:
        return self.cost(layer, ranks, target) < self.cost(layer, None, target)

    def candidates(self, layer, ratios: Sequence[float], target: str = "params") -> list[Ranks]:
        """Ranks for each ratio of a ladder (least aggressive first), repeats dropped."""
        out: list[Ranks] = []
        for rt in ratios:
            r = self.ranks_for_ratio(layer, rt, target)
            if r is not None and r not in out:
                out.append(r)
        return out

    def aligned_options(self, layer, ranks: Ranks, multiple: int) -> list[Ranks]:
        """Rank tuples near `ranks` with every rank a multiple of `multiple`: for each rank the multiple just
        below and just above, both in [1, limit); a rank with neither keeps its value. Never more than one
        alignment step below a planned rank."""
        if multiple <= 1:
            return [tuple(ranks)]
        per = []
        for r, lim in zip(ranks, self.rank_limits(layer)):
            lo, hi = (r // multiple) * multiple, -(-r // multiple) * multiple
            opts = sorted({v for v in (lo, hi) if 0 < v < lim})
            per.append(opts or [r])
        return [tuple(p) for p in itertools.product(*per)]

    def clamp(self, layer, ranks: Sequence[int]) -> Ranks:
        return tuple(max(1, min(int(r), lim)) for r, lim in zip(ranks, self.rank_limits(layer)))


def closest_by_cost(model: CostModel, layer, options: Sequence[Ranks], goal: float, target: str,
                    ok=lambda r: True) -> Ranks | None:
    """The option whose cost is closest to `goal` among those `ok` accepts (ties: the larger ranks)."""
    good = [r for r in options if ok(r)]
    if not good:
        return None
    return min(good, key=lambda r: (abs(model.cost(layer, r, target) - goal), -sum(r)))


#: how far past the asked ratio a layer may end (rank rounding on small layers, alignment): 1.25x
MAX_OVERSHOOT = 1.25


def linear_rank_for_ratio(model: CostModel, layer, ratio: float, target: str, limit: int) -> Ranks | None:
    """For methods with one rank R whose cost is affine in R: the largest R with cost(R) ≤ cost0 / ratio —
    unless that small a rank would end beyond MAX_OVERSHOOT x the ratio and R + 1 still shrinks the layer;
    None when even R = 1 costs more than cost0 / ratio, or `ratio` ≤ 1."""
    if not ratio > 1:
        return None
    c0 = model.cost(layer, None, target)
    c1, c2 = model.cost(layer, (1,), target), model.cost(layer, (2,), target)
    per, fixed = c2 - c1, 2 * c1 - c2
    r = int(math.floor((c0 / ratio - fixed) / per + 1e-9)) if per > 0 else 1
    if r < 1:
        return None
    r = min(r, limit)
    if c0 / model.cost(layer, (r,), target) > MAX_OVERSHOOT * ratio and r + 1 <= limit and \
            model.cost(layer, (r + 1,), target) < c0:
        r += 1
    return (r,) if model.cost(layer, (r,), target) < c0 else None


def as_ranks(x: Any) -> Ranks:
    return tuple(int(v) for v in (x if isinstance(x, (list, tuple)) else [x]))
