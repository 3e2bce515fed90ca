"""Rank planning for the CP passes (`--method cp4|cp3`), mirroring planning.Tucker2Planner.

Per layer, in order: the recipe's `[layers."glob"]` override (`skip`, `method`, `ranks = [R]`, `ratio`),
then `--include/--exclude`, `skip_first`, then the global `--ratio` (default 2) through
cp4/cp3_rank_for_ratio. The planner returns `R` (an int) or the reason to leave the layer alone."""
from __future__ import annotations

import numpy as np

from .decompose.cp import cp3_rank_for_ratio, cp4_rank_for_ratio, cp_params
from .errors import UserError
from .graph import ConvInfo
from .recipe import Recipe

DEFAULT_RATIO = 2.0


def kernel_hw(info: ConvInfo) -> tuple[int, int]:
    """(Kh, Kw) of a 2-D kernel; other kernels are flattened to (prod, 1) (only CP3 accepts them)."""
    k = info.kernel
    return (int(k[0]), int(k[1])) if len(k) == 2 else (int(np.prod(k)), 1)


def cp_chain_params(info: ConvInfo, rank: int, variant: str) -> int:
    """Weights of the CP chain, bias included."""
    kh, kw = kernel_hw(info)
    p = cp_params(info.T, info.S, kh, kw, rank, variant if len(info.kernel) == 2 else "cp3")
    return p + (info.T if info.has_bias else 0)


def rank_for_ratio(info: ConvInfo, ratio: float, variant: str) -> int:
    kh, kw = kernel_hw(info)
    fn = cp4_rank_for_ratio if variant == "cp4" else cp3_rank_for_ratio
    return fn(info.T, info.S, kh, kw, ratio)


class CPPlanner:
    """CP rank R per layer from the recipe (see the module doc)."""

    def __init__(self, recipe: Recipe, variant: str = "cp4", problem=None):
        if variant not in ("cp4", "cp3"):
            raise ValueError(f"unknown CP variant {variant!r}")
        self.recipe = recipe
        self.method = variant
        self.problem = problem          # fn(ConvInfo) -> reason | None
        self.plan: dict[str, int | str] = {}
        self.notes: list[str] = []
        r = recipe
        if r.rank is not None:
            raise UserError(f"--rank {r.rank} (EVBMF) selects Tucker2 ranks; for --method {variant} use --ratio "
                            f"or per-layer `ranks = [R]` in the recipe")
        if r.target_macs is not None:
            raise UserError(f"--target-macs is not supported with --method {variant}: use --ratio")
        if r.allocation != "uniform":
            raise UserError(f"--allocation {r.allocation} is not supported with --method {variant} "
                            f"(uniform --ratio or per-layer ranks only)")

    def _decide(self, info: ConvInfo):
        r = self.recipe
        o, why = r.layer_rule(info.name, info.index, (self.method,))
        if why:
            return why
        if o is not None:
            if o.ranks is not None:
                if len(o.ranks) != 1:
                    raise UserError(f"layer {info.name}: {self.method} ranks must be [R], got {o.ranks}")
                return int(o.ranks[0])   # explicit: honoured even when the chain does not shrink
            if o.ratio is not None:
                return self._check(info, rank_for_ratio(info, o.ratio, self.method), f"ratio {o.ratio:g}")
        why = r.selected(info.name)
        if why:
            return why
        if r.skip_first and info.index == 0:
            return "first conv (skip_first)"
        ratio = r.ratio or DEFAULT_RATIO
        return self._check(info, rank_for_ratio(info, ratio, self.method), f"ratio {ratio:g}")

    def _check(self, info: ConvInfo, rank: int, what: str):
        p = cp_chain_params(info, rank, self.method)
        if p >= info.params:
            return f"{self.method} chain would not shrink ({what}: R={rank}, {p} >= {info.params} params)"
        return rank

    def prepare(self, infos: list[ConvInfo]) -> None:
        for info in infos:
            why = self.problem(info) if self.problem else None
            self.plan[info.name] = why or self._decide(info)

    def __call__(self, info: ConvInfo):
        if info.name not in self.plan:
            self.prepare([info])
        return self.plan[info.name]
