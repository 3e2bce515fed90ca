"""Rank planning: turns a Recipe into per-layer ranks for the decomposition passes.

A planner sees every conv of the (BN-folded) model once (`prepare`), so global targets — later-first
allocation, MAC budgets — can be met across layers; then the pass asks it layer by layer (`__call__`),
receiving ranks or the reason to leave the layer alone."""
from __future__ import annotations

import warnings

import numpy as np

from .decompose import allocate as al
from .decompose.vbmf import tucker2_vbmf_ranks
from .errors import UserError
from .graph import ConvInfo
from .recipe import Recipe, parse_rank

DEFAULT_RATIO = 2.0


def layer_spec(info: ConvInfo) -> al.LayerSpec:
    """Allocation descriptor of a conv; kernels of any dimension are flattened to kh = prod(kernel)."""
    k = info.kernel
    kh, kw = (k[0], k[1]) if len(k) == 2 else (int(np.prod(k)), 1)
    hin = info.in_shape[2:] if info.in_shape else (1,)
    hout = info.out_shape[2:] if info.out_shape else (1,)
    sp_in = (hin[0], int(np.prod(hin[1:]))) if len(hin) >= 2 else (int(np.prod(hin)), 1)
    sp_out = (hout[0], int(np.prod(hout[1:]))) if len(hout) >= 2 else (int(np.prod(hout)), 1)
    return al.LayerSpec(info.name, info.T, info.S, kh, kw, sp_in[0], sp_in[1], sp_out[0], sp_out[1], info.index)


class Tucker2Planner:
    """Ranks per layer from the recipe: per-layer overrides, then `--rank vbmf[:w]`, `--target-macs`,
    `--ratio` under `--allocation uniform|later-first|sensitivity` (curves: onnxcompress.sensitivity)."""

    method = "tucker2"

    def __init__(self, recipe: Recipe, problem=None):
        self.recipe = recipe
        self.problem = problem        # fn(ConvInfo) -> reason | None: what the pass cannot handle at all
        self.plan: dict[str, tuple[int, int] | str] = {}
        self.notes: list[str] = []
        self.sensitivity: dict | None = None   # analyze result for --allocation sensitivity

    # ---------------------------------------------------------------- per-layer decisions
    def _fixed(self, info: ConvInfo):
        """Override or selection decision for one layer; None = the global policy decides."""
        r = self.recipe
        o, why = r.layer_rule(info.name, info.index, (self.method,))
        if why:
            return why
        if o is not None:
            if o.ranks is not None:
                if len(o.ranks) != 2:
                    raise UserError(f"layer {info.name}: tucker2 ranks must be [r3, r4], got {o.ranks}")
                r3, r4 = int(o.ranks[0]), int(o.ranks[1])
                if r3 > info.S or r4 > info.T:
                    raise UserError(f"layer {info.name}: ranks [{r3}, {r4}] exceed its channels "
                                    f"(S={info.S}, T={info.T})")
                return r3, r4
            if o.ratio is not None:
                rr = al.proportional_ranks(layer_spec(info), o.ratio, "params")
                return rr if rr is not None else f"chain would not shrink at ratio {o.ratio:g}"
        why = r.selected(info.name)
        if why:
            return why
        if r.skip_first and info.index == 0:
            return "first conv (skip_first)"
        return None

    def prepare(self, infos: list[ConvInfo]) -> None:
        r = self.recipe
        free: list[ConvInfo] = []
        for info in infos:
            why = self.problem(info) if self.problem else None
            d = why or self._fixed(info)
            if d is None:
                free.append(info)
            else:
                self.plan[info.name] = d
        if not free:
            return
        specs = [layer_spec(i) for i in free]
        target = "macs" if r.target_macs is not None else "params"
        ratio = (1.0 / r.target_macs) if r.target_macs is not None else (r.ratio or DEFAULT_RATIO)
        if target == "macs" and any(i.in_shape is None or i.out_shape is None for i in free):
            raise UserError("--target-macs needs static shapes for every layer: pass --input-shape")
        if r.rank is not None:
            w = parse_rank(r.rank)
            for info, sp in zip(free, specs):
                rr = tucker2_vbmf_ranks(info.weight, weakening=w)
                if r.ratio is not None or r.target_macs is not None:   # budget caps the VBMF ranks
                    cap = al.proportional_ranks(sp, ratio, target)
                    if cap is not None:
                        rr = (min(rr[0], cap[0]), min(rr[1], cap[1]))
                self.plan[info.name] = self._check_shrinks(info, sp, rr, f"EVBMF (w={w:g})")
            return
        if r.allocation == "uniform":
            alloc = al.uniform_ranks(specs, ratio, target)
        elif r.allocation == "later-first":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                alloc = al.allocate_later_first(specs, ratio, target=target)
            self.notes += [str(c.message) for c in caught]
        else:  # sensitivity: curves from --sensitivity FILE or measured by the pipeline (sensitivity.attach)
            from .sensitivity import allocate_by_sensitivity, load_analysis

            curves = self.sensitivity or (load_analysis(r.sensitivity) if r.sensitivity else None)
            if curves is None:
                raise UserError("--allocation sensitivity needs per-layer sensitivity curves: pass --sensitivity "
                                "FILE (analyze.json from `onnxcompress analyze`)")
            alloc, notes = allocate_by_sensitivity(curves, free, specs, ratio, target, r.quantize,
                                                   r.sensitivity_metric)
            self.notes += notes
        for info, sp in zip(free, specs):
            rr = alloc.get(sp.name)
            if rr is None:
                self.plan[info.name] = ("left for the global target (later-first)" if r.allocation == "later-first"
                                        else "kept by the sensitivity allocation" if r.allocation == "sensitivity"
                                        else f"chain would not shrink at ratio {ratio:g}")
            else:
                self.plan[info.name] = rr

    @staticmethod
    def _check_shrinks(info: ConvInfo, sp: al.LayerSpec, rr, what: str):
        if al.tucker2_params(sp.T, sp.S, sp.K, rr[0], rr[1]) >= al.conv_params(sp) and \
                (rr[0], rr[1]) != (info.S, info.T):
            return f"{what} ranks {rr[0]},{rr[1]} would not shrink the layer"
        if (rr[0], rr[1]) == (info.S, info.T):
            return f"{what} keeps full rank"
        return rr

    def __call__(self, info: ConvInfo):
        if info.name not in self.plan:   # a conv the pass saw without prepare(): decide alone
            self.prepare([info])
        return self.plan[info.name]
