"""Builds the CP pass from a Recipe and wires it to the pipeline's calibration data and INT8 pass
(kept out of pipeline.py so that the shared pipeline only gains two calls)."""
from __future__ import annotations

import onnx

from .passes.cp import CPPass, cp_problem, float_node_globs
from .planning_cp import CPPlanner
from .recipe import Recipe


def build_cp_pass(recipe: Recipe, shapes: dict[str, tuple[int, ...]]) -> CPPass:
    variant = recipe.method
    planner = CPPlanner(recipe, variant, lambda info: cp_problem(info, variant))
    int8 = recipe.quantize == "int8"
    return CPPass(planner, shapes, variant=variant,
                  use_epc=recipe.cp_epc if recipe.cp_epc is not None else int8,
                  balance=recipe.cp_balance, equalize=recipe.cp_equalize or "data-free", int8=int8,
                  fallback=recipe.cp_fallback, kappa_max=recipe.cp_kappa_max, seed=recipe.seed)


def wire_cp_pass(cp_pass: CPPass, recipe: Recipe, calib_ds, passes: list, model: onnx.ModelProto,
                 shapes: dict, calibration=None, open_data=None) -> list[str]:
    """Give the CP pass calibration feeds (measured activation ranges; data-driven equalisation unless the
    recipe says otherwise) and let it hand unstable layers to the INT8 pass. Without an INT8 pass the
    `calibration` argument of optimize() or the recipe's source is opened with `open_data(src)`.
    Returns warnings for the report."""
    from .evaluate import feeds_for
    from .passes.quantize import QuantizeInt8
    from .pipeline import _batches

    warnings: list[str] = []
    src = calibration if calibration is not None else recipe.calibration
    if calib_ds is None and src is not None:
        calib_ds = src if hasattr(src, "batches") else open_data(src) if open_data is not None else None
    if calib_ds is not None:
        names = list(shapes)
        first = names[0]
        cp_pass.calibration = lambda: (feeds_for(x, names) for x, _ in _batches(calib_ds, model, first))
        real = getattr(calib_ds, "kind", "") != "random"
        if recipe.cp_equalize is None and real:
            cp_pass.equalize = "data"
    elif recipe.cp_equalize == "data":
        warnings.append("--cp-equalize data needs --calibration data: used data-free equalisation")
    q = next((p for p in passes if isinstance(p, QuantizeInt8)), None)
    if q is not None:
        def handoff(float_nodes: list[str], int16_tensors: list[str]) -> None:
            q.exclude_globs.extend(float_node_globs(float_nodes))
            q.int16_tensors = list(getattr(q, "int16_tensors", [])) + list(int16_tensors)

        cp_pass.on_quantize_handoff = handoff
    return warnings
