"""Rank planning for the SVD pass (1×1 Conv, Gemm, MatMul), mirroring planning.Tucker2Planner.

Per layer, in order: the recipe's `[layers."glob"]` override (`skip`, `method`, `ranks = [r]` — honoured as
written —, `ratio`), then `--include/--exclude`, `skip_first` (the graph's first Conv), `svd_skip_last` (the
graph's last Gemm/MatMul: a CNN's classifier), then `--rank vbmf[:w]` (EVBMF of W, capped by `--ratio` when
given), else `--ratio` (default 2; `--target-macs f` means ratio 1/f: an SVD chain's MACs shrink like its
weights) through svd_rank_for_ratio. A rank with r·(in+out) ≥ in·out would not shrink the layer: skipped.
Ranks from the global policy are rounded to `rank_multiple` (8 for the CPU provider) when that still
shrinks the layer."""
from __future__ import annotations

from .decompose.svd import svd_rank_for_ratio
from .decompose.vbmf import svd_vbmf_rank
from .errors import UserError
from .passes.svd import LinearInfo
from .recipe import Recipe, parse_rank

DEFAULT_RATIO = 2.0


def shrinks(info: LinearInfo, r: int) -> bool:
    return r * (info.S + info.T) < info.S * info.T


class SVDPlanner:
    def __init__(self, recipe: Recipe, accept_methods: tuple[str, ...] = ("svd",)):
        self.recipe = recipe
        self.accept = accept_methods     # a per-layer `method` override other than these skips the layer
        self.plan: dict[str, int | str] = {}
        m = recipe.rank_multiple
        if m is None:
            m = 8 if (recipe.providers or ["cpu"])[0] == "cpu" else 1
        self.multiple = int(m)
        if recipe.method == "svd" and recipe.allocation != "uniform":
            raise UserError(f"--allocation {recipe.allocation} is not supported with --method svd "
                            f"(uniform --ratio, --rank vbmf or per-layer ranks)")

    def _ratio(self, o=None) -> float:
        r = self.recipe
        if o is not None and o.ratio is not None:
            return float(o.ratio)
        if r.ratio is not None:
            return float(r.ratio)
        if r.target_macs is not None:
            return 1.0 / float(r.target_macs)
        return DEFAULT_RATIO

    def _decide(self, info: LinearInfo):
        r = self.recipe
        o, why = r.layer_rule(info.name, info.index, self.accept)
        if why:
            return why
        if o is not None:
            if o.ranks is not None:
                if len(o.ranks) != 1:
                    raise UserError(f"layer {info.name}: svd ranks must be [r], got {o.ranks}")
                rr = int(o.ranks[0])
                if rr > min(info.S, info.T):
                    raise UserError(f"layer {info.name}: rank {rr} exceeds min(in, out) = {min(info.S, info.T)}")
                return rr
            if o.ratio is not None:
                return self._by_ratio(info, self._ratio(o))
        why = r.selected(info.name)
        if why:
            return why
        if info.kind == "conv" and r.skip_first and info.index == 0:
            return "first conv (skip_first)"
        if info.kind != "conv" and info.last and getattr(r, "svd_skip_last", True):
            return "last Gemm/MatMul (classifier; svd_skip_last)"
        if r.rank is not None:
            w = parse_rank(r.rank)
            rr = svd_vbmf_rank(info.W, weakening=w)
            if r.ratio is not None or r.target_macs is not None:
                cap = svd_rank_for_ratio(info.T, info.S, self._ratio())
                rr = min(rr, cap) if cap is not None else rr
            if rr >= min(info.S, info.T):
                return f"EVBMF (w={w:g}) keeps full rank"
            return rr if shrinks(info, rr) else f"EVBMF (w={w:g}) rank {rr} would not shrink the layer"
        return self._by_ratio(info, self._ratio())

    def _by_ratio(self, info: LinearInfo, ratio: float):
        rr = svd_rank_for_ratio(info.T, info.S, ratio)
        if rr is None or not shrinks(info, rr):
            return f"SVD would not shrink the layer at ratio {ratio:g} ({info.T}x{info.S})"
        m = self.multiple
        if m > 1 and rr >= m:
            up = int(round(rr / m)) * m
            if up >= m and shrinks(info, up):
                rr = up
            elif (rr // m) * m >= m:
                rr = (rr // m) * m
        return rr

    def prepare(self, infos: list[LinearInfo]) -> None:
        for info in infos:
            if info.problem is not None:
                self.plan[info.name] = info.problem
            else:
                self.plan[info.name] = self._decide(info)

    def __call__(self, info: LinearInfo):
        if info.name not in self.plan:
            self.prepare([info])
        return self.plan[info.name]
