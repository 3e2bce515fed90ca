"""`--method auto` inside optimize(): measure the options of every layer, run the budgeted search, and hand the
pipeline the model it writes (never a worse one than the input) with the plan, the budget and the frontier."""
from __future__ import annotations

import hashlib
import time

import numpy as np

from ..ir.counts import model_bytes
from ..passes import registry
from ..planning.planner import LayerPlan, Plan, Planner
from .budget import Budget, budget_for
from .candidates import GRID, SENSITIVITY_SAMPLES, enumerate_options, measure_latency, predicted_noise
from .search import Search

#: without data, a factorization must keep the output this close on synthetic inputs (dB)
SYNTHETIC_FLOOR_DB = 40.0


class MemoryFactorCache:
    """Factorizations memoized in memory for the search's rounds (the same layer at the same ranks is
    factorized once per run)."""

    def __init__(self):
        self.memo: dict = {}

    def __call__(self, method, array, params, compute):
        a = np.ascontiguousarray(array)
        key = (method, hashlib.sha256(a.tobytes()).hexdigest(), a.shape, repr(params))
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def optimize_auto(run, original, clean, layers, quant: str):
    """(model, plan, PassManager of the model's build or None, report extras)."""
    r = run.recipe
    t0 = time.perf_counter()
    precisions = precisions_for(quant, r.objective)
    base_precision = "int8" if precisions == ["int8"] else "float"
    methods = registry.cost_models()
    planner = Planner(r, methods)
    cand, why_not = {}, {}
    for info in layers:
        cand[info.name], why = planner.candidate_methods(info)
        if why:
            why_not[info.name] = why
    options = enumerate_options(layers, cand, methods, precisions, GRID, planner.multiple)
    run.note(f"auto: {sum(len(o) for o in options.values())} options over {len(options)} layers; timing them on "
             f"{r.providers[0]}")
    facts = {"latency": measure_latency(layers, options, methods, r.providers[0], run.progress)}
    if r.objective == "latency":
        _prune_slower(options)
    q4 = None
    if "int4" in precisions:
        from .int4 import drop_unavailable, int4_noise

        q4, facts["int4_sensitivity"] = int4_noise(run, clean, layers, SENSITIVITY_SAMPLES)
        drop_unavailable(options, q4)
    facts["sensitivity"] = _sensitivity(run, clean, options, "int8" in precisions, q4)
    budget = _budget(run, original)
    run.factor_cache = MemoryFactorCache()

    def build(selection):
        plan = plan_of(selection, layers, why_not)
        fl = [n for n, o in selection.items() if o.precision == "float"]
        i4 = [n for n, o in selection.items() if o.precision == "int4"]
        q = "int8" if any(o.precision == "int8" for o in selection.values()) else "int4" if i4 else (
            quant if quant == "fp16" else "none")
        # mixed precision: only the INT8 layers are quantized (their neighbours — Add, Clip, pooling — stay float:
        # the one-layer sensitivities measured exactly that); all layers INT8: the whole graph, as INT8 alone
        only = [n for n, o in selection.items() if o.precision == "int8"] if q == "int8" and fl and not i4 else None
        return run.build(clean, plan, q, fl if q in ("int8", "int4") else (), int4_layers=i4 if q == "int8" else (),
                         int8_layers=only)

    def measure(model):
        return run.fidelity(original, model), run.whole_latency(original, model), model_bytes(model)

    search = Search(options, budget, r.objective, base_precision, build, measure,
                    input_bytes=run.bytes_before or model_bytes(original), progress=run.progress,
                    int8_allowed="int8" in precisions)
    run.note(f"auto: budget {budget.describe()} on {run.holdout.description}")
    best = search.run()
    chosen, note = best, None
    if best is None:
        tried = ", ".join(f"{v.label}: {v.why_not}" for v in search.verified[:4])
        if r.allow_worse and search.verified:
            chosen = max(search.verified, key=lambda v: (v.met, v.measured if budget.kind != "accuracy"
                                                         else -(v.measured or 1e9)))
            note = f"auto: no candidate qualified ({tried}); --allow-worse: wrote {chosen.label}"
        else:
            note = (f"auto: no candidate met the budget ({budget.describe()}) without being slower or larger "
                    f"than the input ({tried}): wrote the lossless clean-up of the input")
    extra = {"budget": {**budget.to_dict(), "description": budget.describe(),
                        "data": run.holdout.description, "synthetic": run.synthetic,
                        "predicted": chosen.predicted if chosen else None,
                        "measured": chosen.measured if chosen else None,
                        "rounds": len(search.verified)},
             "frontier": search.frontier(),
             "auto": {**facts, "objective": r.objective, "precisions": precisions,
                      "options": {n: [o.to_dict() for o in opts] for n, opts in options.items()},
                      "chosen": chosen.label if chosen else "lossless clean-up",
                      "seconds": round(time.perf_counter() - t0, 2)}}
    if note:
        run.report.warnings.append(note)
    if chosen is None:
        return clean, plan_of({}, layers, why_not, reason="auto: nothing qualified (see the budget)"), None, extra
    return chosen.model, plan_of(chosen.selection, layers, why_not), chosen.build_info, extra


def precisions_for(quant: str, objective: str) -> list[str]:
    """The precisions the search may give a layer. INT4 is a size format on ORT CPU (slower than FP32): an
    option only under `--objective size` (or when `--quantize int4` asks for it), never a latency candidate."""
    out = {"auto": ["float", "int8"], "int8": ["int8"], "int4": ["float", "int4"]}.get(quant, ["float"])
    return out + ["int4"] if quant == "auto" and objective == "size" else out


def plan_of(selection: dict, layers, why_not: dict, reason: str | None = None) -> Plan:
    """The plan of a selection: factorized layers with their ranks (used as written: chosen among measured
    options, no alignment), the others kept with the reason."""
    plan = Plan()
    for info in layers:
        o = selection.get(info.name)
        lp = LayerPlan(info.name, getattr(info, "op", "Conv"), o.method if o else None)
        if o is not None and o.method is not None:
            lp.ranks = lp.planned = tuple(o.ranks)
            lp.explicit = True
        else:
            lp.keep(reason or why_not.get(info.name) or
                    (f"auto: kept ({o.precision})" if o is not None else "auto: kept"))
        if o is not None:
            lp.predicted_degradation = o.noise
            lp.extra["saved_ms"] = round(1e3 * o.saved_s, 4) if o.seconds is not None else None
            lp.extra["option"] = {"precision": o.precision, **o.extra}
            if o.extra.get("measured"):
                lp.extra["measured_degradation"] = o.extra["measured"]
        plan.layers[info.name] = lp
    return plan


#: a CP chain is tried only where it runs this much faster than Tucker2 at the same ratio (at equal size Tucker2
#: fits a kernel at least as well: CP is worth its larger error only for speed)
CP_SPEED_EDGE = 0.9


def _prune_slower(options: dict) -> None:
    """Under the latency objective a factorization that is not faster than keeping the layer in the same
    precision can only cost accuracy, and a CP chain not clearly faster than the Tucker2 chain of the same
    ratio only adds error: both dropped before any sensitivity is measured for them."""
    for name, opts in options.items():
        keep = {o.precision: o for o in opts if o.method is None}
        t2 = {(o.extra.get("ratio"), o.precision): o.seconds for o in opts if o.method == "tucker2"}

        def useful(o):
            if o.method is None:
                return True
            if o.seconds is None or keep[o.precision].seconds is None or o.seconds >= keep[o.precision].seconds:
                return False
            rival = t2.get((o.extra.get("ratio"), o.precision))
            return o.method not in ("cp4", "cp3") or rival is None or o.seconds < CP_SPEED_EDGE * rival
        options[name] = [o for o in opts if useful(o)]


def _sensitivity(run, clean, options: dict, int8: bool, int4: dict | None = None) -> dict:
    """One-layer sensitivities of the remaining options (the analyze sweep, cached on disk) → noise per option."""
    from ..analysis.sweep import analyze

    r = run.recipe
    only, by_method = set(), {}
    for name, opts in options.items():
        for o in opts:
            if o.method is not None:
                only.add((name, o.method, o.extra["ratio"]))
                by_method.setdefault(o.method, set()).add(name)
    layers_q = [n for n in options]
    if not only and not int8:
        predicted_noise(options, {}, {}, int4)
        return {"variants": 0}
    src = run.calib if run.calib is not None else "random"
    methods = {m: sorted(v) for m, v in by_method.items()} or {"tucker2": []}
    t0 = time.perf_counter()
    n_tasks = len(only) + (len(layers_q) if int8 else 0)
    run.note(f"auto: sensitivity of {len(only)} factorizations" + (f" and {len(layers_q)} INT8 layers" if int8
                                                                    else "") + f" ({n_tasks} variants, cached)")
    done = [0]

    def tick(_):
        done[0] += 1
        el = time.perf_counter() - t0
        if run.progress and (done[0] % 5 == 0 or done[0] == n_tasks):
            eta = el / done[0] * max(n_tasks - done[0], 0)
            run.progress(f"auto: sensitivity {done[0]}/{n_tasks} (eta {eta:.0f}s)")

    res = analyze(clean, src, grid=GRID, methods=methods, samples=SENSITIVITY_SAMPLES,
                  preprocess=r.preprocess, labels=r.labels, input_shape=r.input_shape or None,
                  quantize="int8" if int8 else None, td_int8=False, only=only, global_curve=False,
                  progress=False, seed=r.seed, fold_bn=False, jobs=r.resolved_jobs(), executor=r.executor,
                  on_result=tick,
                  layers=layers_q if int8 else sorted({n for n, _, _ in only}))
    td, q = {}, {}
    for row in res["measurements"]:
        if row["scope"] != "layer" or row.get("noise") is None:
            continue
        if row["kind"] == "td" and row.get("ranks"):
            td[(row["layer"], row["method"], tuple(row["ranks"]))] = row["noise"]
        elif row["kind"] == "int8":
            q[row["layer"]] = row["noise"]
    predicted_noise(options, td, q, int4)
    st = res["stats"]
    return {"variants": st["tasks"], "evaluated": st["evaluated"], "cached": st["cached"],
            "samples": res["settings"]["samples"], "data": res["settings"]["data"],
            "seconds": round(time.perf_counter() - t0, 2)}


def _budget(run, original) -> Budget:
    r = run.recipe
    if run.synthetic:
        return Budget("sqnr", r.min_sqnr if r.min_sqnr is not None else SYNTHETIC_FLOOR_DB)
    return budget_for(r, bool(getattr(run.holdout, "has_labels", False)), _classifier(original, run.shapes))


def _classifier(model, shapes) -> bool:
    """Whether the first output is (batch, classes ≥ 2) — top-1 agreement then means something."""
    from ..ort.session import make_session, random_feeds

    s = make_session(model, "cpu", lean=True)
    y = s.run([s.get_outputs()[0].name], random_feeds(model, shapes))[0]
    return y.ndim == 2 and y.shape[1] >= 2
