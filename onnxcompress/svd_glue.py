"""Builds the SVD pass and the data-aware machinery from a Recipe (kept out of pipeline.py so that the
shared pipeline only gains a few calls).

* `--method svd`: SVD of 1×1 convs, Gemm and MatMul weights (the last Gemm/MatMul — a CNN's classifier —
  is left alone unless `svd_skip_last = false`).
* `--method tucker2`: Tucker2 for k×k convs, then SVD for 1×1 convs (and Gemm/MatMul with `svd_gemm`).
* `--data-aware` (tucker2 | svd; needs calibration data): Σ-Tucker2 / whitened SVD from input statistics
  captured on ORT, then a least-squares refit of each chain's last factor (`data_aware_refit`)."""
from __future__ import annotations

from .data_aware import DataAware, RefitPass, SigmaTucker2, SVDStatistics
from .errors import UserError
from .passes.svd import SVDPass
from .planning_svd import SVDPlanner
from .recipe import Recipe


def data_aware_context(recipe: Recipe, model, shapes: dict, calibration, open_data, progress=None
                       ) -> tuple[DataAware | None, list[str]]:
    """The shared data-aware state for a recipe with `data_aware` (else None), and warnings."""
    if not recipe.data_aware:
        return None, []
    if recipe.method not in ("tucker2", "svd"):
        raise UserError(f"--data-aware works with --method tucker2 or svd (not {recipe.method})")
    src = calibration if calibration is not None else recipe.calibration
    if src is None:
        raise UserError("--data-aware needs calibration data: pass --calibration DIR|FILE "
                        "(or --calibration random, which only makes sense for smoke tests)")
    ds = src if hasattr(src, "batches") else open_data(src)
    warnings = []
    if getattr(ds, "kind", "") == "random":
        warnings.append("--data-aware statistics come from random inputs (not real data): the factorization "
                        "is fitted to noise; pass --calibration DIR|FILE")
    from .evaluate import feeds_for
    from .graph import fixed_batch
    from .pipeline import _batches

    names = list(shapes)
    first = names[0]
    bs = fixed_batch(model, first) or 16
    ctx = DataAware(feeds=lambda: (feeds_for(x, names) for x, _ in _batches(ds, model, first)), shapes=shapes,
                    method=recipe.data_aware_method, n_samples=len(ds), batch_size=bs, seed=recipe.seed,
                    progress=progress)
    ctx.facts["calibration"] = {"kind": getattr(ds, "kind", "?"), "samples": len(ds),
                                "description": getattr(ds, "description", "")}
    return ctx, warnings


def tucker2_factorizer(ctx: DataAware | None):
    return SigmaTucker2(ctx) if ctx is not None else None


def svd_passes(recipe: Recipe, shapes: dict, ctx: DataAware | None) -> list:
    """The SVD pass the recipe asks for, then (data-aware) the refit pass."""
    kinds = ("conv", "gemm", "matmul") if recipe.method == "svd" or recipe.svd_gemm else ("conv",)
    planner = SVDPlanner(recipe, accept_methods=("svd",) if recipe.method == "svd" else ("svd", "tucker2"))
    out = [SVDPass(planner, shapes, kinds=kinds, sigma_provider=SVDStatistics(ctx) if ctx is not None else None)]
    if ctx is not None and recipe.data_aware_refit:
        out.append(RefitPass(ctx))
    return out


def merge_layer_records(records: list) -> list:
    """Drop a pass's 'skipped' record for a layer another pass rewrote (Tucker2 skips 1×1 convs that the
    SVD pass then factorizes), keeping one record per layer."""
    best: dict = {}
    for r in records:
        cur = best.get(r.name)
        if cur is None or cur.skipped is not None:   # a rewrite wins; a later reason replaces an earlier one
            best[r.name] = r
    return list(best.values())


def summary(ctx: DataAware | None, factorizer=None) -> dict | None:
    if ctx is None:
        return None
    s = dict(ctx.facts)
    s["method"] = ctx.method
    if factorizer is not None:
        s["tucker2_seconds"] = round(factorizer.seconds, 3)
    return s
