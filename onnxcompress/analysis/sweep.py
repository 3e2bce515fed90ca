"""`onnxcompress analyze`: per-layer sensitivity of a model to factorization (any registered method) and INT8,
measured on ONNX Runtime.

One task = one model variant, evaluated against the original on the same data:

* ``td``       one layer factorized (its method: Tucker2, CP4, CP3 or SVD) at the ranks of a grid ratio;
* ``int8``     one layer's nodes INT8-quantized (QDQ, calibrated on the data), everything else float;
* ``td+int8``  that layer factorized, then only its chain quantized;
* global rows (``scope = "global"``): every swept layer factorized at the same ratio (``td``), all nodes
  quantized (``int8``), or both (``td+int8``).

Metrics against the original's outputs (computed once): top-1/top-5 agreement, SQNR, cosine, accuracy when
labels are known (ort.fidelity.FidelityAccumulator). The sum of the per-layer drops is compared with the
measured combined drop (additivity, ALGORITHMS §5).

Execution: BatchNorm is folded once; tasks run in a process pool (``jobs``) or on Ray (``executor="ray"``),
see analysis.executors. Each finished task is written at once to a JSON file in the cache, keyed by the model,
the data, the settings and the code (analysis.cache), so re-runs are incremental and an interrupted run resumes.
"""
from __future__ import annotations

import json
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from .._json import json_clean
from ..errors import UserError
from .additivity import additivity
from .cache import Cache, FactorCache, code_fingerprint, sha256
from .executors import Bar, execute, ray_available

ANALYZE_FORMAT = 2          # bump when a measurement's meaning changes: it invalidates cached results
DEFAULT_GRID: tuple[float, ...] = (1.5, 2, 3, 4, 6, 8)
DEFAULT_SAMPLES = 64


# ------------------------------------------------------------------------------------------ layers
@dataclass
class Layer:
    """One layer of the analysed (BN-folded) model and the method that sweeps it (None: not swept)."""
    name: str
    index: int
    T: int
    S: int
    kernel: tuple[int, ...]
    params: int                  # weights only (no bias): the allocation convention
    macs: int | None
    method: str | None           # the first method that sweeps it (the global curve's); None: not swept
    skipped: str | None
    info: Any = None             # ir.layers facts
    methods: list = field(default_factory=list)   # every method that sweeps it

    @property
    def decomposable(self) -> bool:
        return self.method is not None

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "T": self.T, "S": self.S, "kernel": list(self.kernel),
                "params": self.params, "macs": self.macs, "method": self.method,
                "decomposable": self.decomposable, "skipped": self.skipped}


def model_layers(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 methods: Mapping[str, Sequence[str] | None] | None = None) -> list[Layer]:
    """Every compute layer of a (BN-folded) model. `methods`: {method: layer names (None = every layer it can
    take)}; a layer is swept by every listed method that takes it and names it. Default: Tucker2 for every
    layer it takes."""
    from ..ir.layers import collect_layers, layer_kernel
    from ..passes.registry import METHODS

    methods = dict(methods) if methods else {"tucker2": None}
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"analyze --method {unknown[0]}: choose from {', '.join(METHODS)}")
    out = []
    for info in collect_layers(model, shapes):
        ok, why = [], None
        for m, names in methods.items():
            w = METHODS[m].cost.takes(info)
            if w is None and (names is None or info.name in names):
                ok.append(m)
            else:
                why = why or w or "not selected"
        cost = METHODS[ok[0]].cost if ok else None
        out.append(Layer(info.name, info.index, info.T, info.S, layer_kernel(info),
                         cost.weights(info, None) if cost else int(info.params), info.macs, ok[0] if ok else None,
                         None if ok else why, info, ok))
    return out


def _materialize(ds, batch: int, model) -> tuple[list[dict], list[np.ndarray | None]]:
    """The data as ORT feed dicts (one per batch, every model input) and labels."""
    from ..data import inputs_for_model

    xs, ys = [], []
    for feed, y in inputs_for_model(model, ds, batch_size=batch):
        xs.append({k: np.ascontiguousarray(v) for k, v in feed.items()})
        ys.append(None if y is None else np.asarray(y))
    if not xs:
        raise UserError("the data holds no samples")
    return xs, ys


def _batch_len(feed: dict) -> int:
    return len(next(iter(feed.values())))


def _fingerprint(xs, ys) -> str:
    return sha256(*[f[k].tobytes() for f in xs for k in sorted(f)],
                  *[(b"" if y is None else np.asarray(y, np.int64).tobytes()) for y in ys])


# ------------------------------------------------------------------------------------------ suffix evaluation
def _descendants(graph: onnx.GraphProto, node_name: str) -> set[int] | None:
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    start = next((i for i, n in enumerate(graph.node) if n.name == node_name), None)
    if start is None:
        return None
    seen, todo = {start}, [start]
    while todo:
        for t in graph.node[todo.pop()].output:
            for j in consumers.get(t, []):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
    return seen


def suffix_boundaries(model: onnx.ModelProto, layers: Sequence[str]) -> dict[str, list[str]]:
    """For each layer: the tensors its downstream part (the layer and every node that depends on it) reads
    from upstream. A one-layer variant then only needs that part evaluated, fed with the original's values
    (which do not change upstream of the layer). Layers whose part misses the first output are left out."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {t: n for n in g.node for t in n.output}
    out0 = g.output[0].name
    res = {}
    for layer in layers:
        desc = _descendants(g, layer)
        if desc is None:
            continue
        names = {t for i in desc for t in g.node[i].output}
        if out0 not in names:
            continue
        b = []
        for i in sorted(desc):
            for t in g.node[i].input:
                if not t or t in inits or t in names or t in b:
                    continue
                p = producer.get(t)
                if p is not None and p.op_type == "Constant":
                    continue
                b.append(t)
        res[layer] = b
    return res


def suffix_model(model: onnx.ModelProto, layer: str, boundary: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The part of `model` downstream of `layer` as a model whose inputs are the `boundary` tensors
    (example values give their dtype and shape) and whose output is the model's first output."""
    from onnx import helper

    g = model.graph
    desc = _descendants(g, layer)
    producer = {t: n for n in g.node for t in n.output}
    nodes = [g.node[i] for i in sorted(desc)]
    used = {t for n in nodes for t in n.input}
    consts = [producer[t] for t in sorted(used) if t in producer and producer[t].op_type == "Constant"
              and producer[t] not in nodes]
    nodes = consts + nodes
    used |= {t for n in consts for t in n.input}
    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for t, v in boundary.items()]
    graph = helper.make_graph(nodes, f"{g.name}_suffix", inputs, [g.output[0]],
                              [t for t in g.initializer if t.name in used])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.producer_name = model.producer_name
    return m


# ------------------------------------------------------------------------------------------ worker side
class _Context:
    """What a worker needs, built once per process from the pickled payload."""

    def __init__(self, payload: dict):
        self.key = payload["key"]
        self.model = onnx.load_model_from_string(payload["model"])
        self.shapes = payload["shapes"]
        self.xs = payload["xs"]
        self.ys = payload["ys"]
        self.refs = payload["refs"]
        self.calib = payload["calib"]
        self.fmt = payload["fmt"]
        self.qranges = payload.get("qranges")   # activation ranges: per-layer INT8 simulated, not calibrated
        self.threads = payload["threads"]
        self.input_names = list(self.shapes)
        self.suffix: dict[str, list[str]] = payload.get("suffix") or {}   # layer -> boundary tensors
        self.act_dir = payload.get("act_dir")
        self.factors = FactorCache(payload.get("factor_root"), payload.get("code", ""))
        self._acts: dict[str, np.ndarray] = {}
        self._suffix_models: dict[str, onnx.ModelProto] = {}

    def activation(self, name: str) -> np.ndarray:
        """(batches, *batch_shape) values of a tensor of the BN-folded model on the data (memory-mapped)."""
        if name in self.input_names:
            return [f[name] for f in self.xs]
        if name not in self._acts:
            with open(Path(self.act_dir) / "manifest.json") as f:
                files = json.load(f)
            self._acts[name] = np.load(Path(self.act_dir) / files[name], mmap_mode="r")
        return self._acts[name]

    def suffix_model(self, layer: str) -> onnx.ModelProto:
        if layer not in self._suffix_models:
            b = self.suffix[layer]
            self._suffix_models[layer] = suffix_model(self.model, layer, {t: self.activation(t)[0] for t in b})
        return self._suffix_models[layer]


_CTX: _Context | None = None


def worker_init(payload: bytes) -> None:
    global _CTX
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, "blas")
    except Exception:  # noqa: BLE001 - optional
        pass
    _CTX = _Context(pickle.loads(payload))


def worker_run(task: dict) -> dict:
    assert _CTX is not None, "worker not initialised"
    return run_task(_CTX, task)


def ray_run(payload_ref_box: list, task: dict) -> dict:
    """Ray task body: the payload arrives once per worker process (object-store reference in a list so Ray
    does not resolve it per call); later tasks in the same worker reuse the parsed context."""
    global _CTX
    import ray

    key = task["payload_key"]
    if _CTX is None or getattr(_CTX, "ray_key", None) != key:
        worker_init(ray.get(payload_ref_box[0]))
        _CTX.ray_key = key
    return run_task(_CTX, task)


def _build(method: str, plan: dict, shapes, factors, quantized: str):
    """The method's pass for a variant: `plan` = {layer: ranks}."""
    from ..passes.base import Wiring
    from ..passes.registry import METHODS
    from ..recipe import Recipe

    def policy(info):
        return plan.get(info.name, "not in this variant")
    return METHODS[method].build(policy, Wiring(recipe=Recipe(), shapes=shapes, factor_cache=factors,
                                                quantized=quantized))


def run_task(ctx: _Context, task: dict) -> dict:
    """Build one variant, evaluate it against the cached reference outputs; returns the metrics."""
    from ..ort.fidelity import FidelityAccumulator
    from ..ort.quantize import quantize_qdq
    from ..ort.session import make_session

    t0, c0 = time.perf_counter(), time.process_time()
    kind = task["kind"]
    model = ctx.model
    row: dict[str, Any] = {}
    nodes: list[str] | None = None
    feeds = None
    shapes = ctx.shapes
    one_layer = task["scope"] == "layer" and (kind == "td" or (kind == "int8" and ctx.qranges is not None))
    if one_layer and task["layer"] in ctx.suffix:
        # only the layer's downstream part runs, fed with the original's upstream values
        model = ctx.suffix_model(task["layer"])
        bnames = ctx.suffix[task["layer"]]
        shapes = {t: tuple(ctx.activation(t)[0].shape) for t in bnames}
        feeds = [{t: np.asarray(ctx.activation(t)[i]) for t in bnames} for i in range(len(ctx.xs))]
    if kind == "int8" and task["scope"] == "layer" and ctx.qranges is not None:
        from ..ort.quantize import simulate_int8
        model = simulate_int8(model, [task["layer"]], ctx.qranges, ctx.fmt)
        row["int8"] = "simulated (QDQ on the layer's weights and inputs, MinMax ranges of the calibration data)"
    elif kind in ("td", "td+int8"):
        by_method: dict[str, dict] = {}
        for layer, (m, ranks) in task["ranks"].items():
            by_method.setdefault(m, {})[layer] = tuple(ranks)
        done = []
        for m, plan in by_method.items():
            res = _build(m, plan, shapes, ctx.factors, "int8" if kind == "td+int8" else "none").run(model)
            model = res.model
            done += [l for l in res.layers if l.skipped is None]
        if not done:
            return {"skipped": "no layer rewritten", "seconds": time.perf_counter() - t0}
        row["weight_rel_error"] = float(np.sqrt(np.mean([l.weight_rel_error ** 2 for l in done])))
        nodes = [n for l in done for n in l.new_nodes]
    if kind in ("int8", "td+int8") and "int8" not in row:
        if task["scope"] == "global":
            nodes = None
        elif kind == "int8":
            nodes = [task["layer"]]
        model, _ = quantize_qdq(model, _ArrayReader(ctx.calib), ctx.fmt, nodes_to_quantize=nodes)
    sess = make_session(model, "cpu", threads=ctx.threads)
    out_name = sess.get_outputs()[0].name
    acc = FidelityAccumulator()
    if feeds is None:
        feeds = ctx.xs
    for fd, y, ref in zip(feeds, ctx.ys, ctx.refs):
        acc.update(ref, sess.run([out_name], fd)[0], y)
    f = acc.result()
    row.update({"samples": f.samples, "top1_agreement": f.top1_agreement, "top5_agreement": f.top5_agreement,
                "sqnr_db": f.sqnr_db, "cosine": f.cosine, "max_abs_diff": f.max_abs_diff,
                "accuracy_before": f.accuracy_before, "accuracy_after": f.accuracy_after,
                "accuracy_drop": f.accuracy_drop, "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0})
    return row


class _ArrayReader:
    """In-memory calibration batches as an ORT CalibrationDataReader."""

    def __init__(self, xs: list[dict]):
        self.xs, self.i = xs, 0

    def get_next(self):
        if self.i >= len(self.xs):
            return None
        self.i += 1
        return self.xs[self.i - 1]

    def rewind(self):
        self.i = 0


def _activations(base, bounds, input_names, xs, root: Path, model_sha, data_fp, threads) -> str:
    """Values of every boundary tensor on the data, one .npy per tensor (batches stacked), computed once."""
    from ..ort.capture import Tap

    tensors = sorted({t for b in bounds.values() for t in b} - set(input_names))
    key = sha256(model_sha.encode(), data_fp.encode(), json.dumps(tensors).encode(), b"act")
    d = root / f"act-{key[:20]}"
    if (d / "manifest.json").is_file():
        return str(d)
    d.mkdir(parents=True, exist_ok=True)
    tap = Tap(base, tensors, threads=threads)
    vals: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for x in xs:
        for t, v in tap(x).items():
            vals[t].append(v)
    files = {}
    for i, t in enumerate(tensors):
        files[t] = f"t{i}.npy"
        np.save(d / files[t], np.stack(vals[t]))
        vals[t] = []
    (d / "manifest.json").write_text(json.dumps(files))
    return str(d)


def _qranges(st, calib_xs, calib_fp) -> dict:
    """MinMax ranges of every compute layer's activation inputs and outputs on the calibration batches
    (cached)."""
    from ..ort.capture import tensor_ranges

    key = sha256(st["model_sha"].encode(), calib_fp.encode(), b"qranges")
    p = st["root"] / f"qranges-{key[:20]}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(p.read_text()).items()}
    except (OSError, ValueError):
        pass
    inits = {t.name for t in st["base"].graph.initializer}
    tensors = sorted({x for n in st["base"].graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                      for x in list(n.input) + list(n.output[:1]) if x and x not in inits})
    ranges = tensor_ranges(st["base"], tensors, lambda: iter(calib_xs))
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(ranges))
    tmp.replace(p)
    return ranges


def _noise(sqnr_db):
    return None if sqnr_db is None else 10 ** (-float(sqnr_db) / 10)


# ------------------------------------------------------------------------------------------ analyze
def analyze(model, data, *, grid: Sequence[float] = DEFAULT_GRID, method: str = "tucker2",
            methods: Mapping[str, Sequence[str] | None] | None = None,
            samples: int | None = DEFAULT_SAMPLES, labels=None, preprocess: str | None = None,
            input_shape: dict[str, Sequence[int]] | None = None, quantize: str | None = None,
            calibration=None, calibration_samples: int | None = None, jobs: int = 1, executor: str = "local",
            out_dir=None, cache_dir=None, threads: int = 1, seed: int = 0, layers: Sequence[str] | None = None,
            global_curve: bool = True, progress: bool | None = None, suffix: bool | None = None,
            fold_bn: bool = True, on_result: Callable[[dict], None] | None = None, td_int8: bool = True,
            only: set | None = None) -> dict:
    """Run the sensitivity sweep and return the analysis (the content of analyze.json). `method`: the method
    swept on every layer it can take; `methods`: {method: layer names or None} to sweep several (the
    pipeline's on-the-fly curves). With `out_dir`, writes analyze.json, analyze.csv and the PNG plots there;
    the cache defaults to `out_dir/cache`. `layers`: restrict the per-layer sweep to these layer names.
    `td_int8=False` skips the factorized+INT8 variants (INT8 rows are then one per layer); `only`: the
    (layer, method, ratio) factorizations to measure (all when None). `on_result` is called after each task
    is stored (tests use it to interrupt a run)."""
    t_start = time.perf_counter()
    grid = _check_args(grid, quantize, executor, jobs, samples)
    quantize = None if quantize in (None, "none") else quantize
    st = _setup(model, data, methods or {method: None}, samples, labels, preprocess, input_shape, fold_bn, seed,
                layers, cache_dir, out_dir, threads, quantize)
    calib_xs, calib_fp, fmt = _calibration(st, quantize, calibration, calibration_samples, preprocess, seed)
    tasks = _tasks(st, grid, quantize, global_curve, calib_fp, fmt, td_int8, only)
    results, n_cached = _from_cache(st["cache"], tasks)
    todo = list({t["key"]: (t["key"], t) for t in tasks if t["key"] not in results}.values())
    show = (sys.stderr.isatty() if progress is None else progress) and sys.stderr.isatty()
    bar = Bar(len(tasks), bool(show))
    counters = {"evaluated": 0}

    def on_done(key: str, metrics: dict) -> None:
        st["cache"].put(key, metrics)
        results[key] = {**metrics, "cached": False}
        counters["evaluated"] += 1
        bar.update(len(results), n_cached)
        if on_result is not None:
            on_result(metrics)

    # one-layer TD variants: evaluate only the layer's downstream part (local executor: the upstream values
    # are computed once and memory-mapped from the cache folder by the workers)
    bounds, act_dir = {}, None
    qranges = _qranges(st, calib_xs, calib_fp) if quantize and any(
        t["kind"] == "int8" and t["scope"] == "layer" for _, t in todo) else None
    if (executor == "local" if suffix is None else suffix) and any(
            t["kind"] in ("td", "int8") and t["scope"] == "layer" for _, t in todo):
        bounds = suffix_boundaries(st["base"], [l.name for l in st["sweep"]])
        act_dir = _activations(st["base"], bounds, list(st["shapes"]), st["xs"], st["root"], st["model_sha"],
                               st["data_fp"], threads)
    payload = pickle.dumps({"key": st["model_sha"] + st["data_fp"], "model": st["base"].SerializeToString(),
                            "shapes": st["shapes"], "xs": st["xs"], "ys": st["ys"], "refs": st["refs"],
                            "calib": calib_xs, "fmt": fmt, "threads": threads, "suffix": bounds, "qranges": qranges,
                            "act_dir": act_dir, "code": st["code"],
                            "factor_root": str(st["root"]) if executor == "local" else None},
                           protocol=pickle.HIGHEST_PROTOCOL)
    bar.update(len(results), n_cached)
    t_run = time.perf_counter()
    try:
        execute(todo, payload, jobs, executor, on_done, worker_init, worker_run, ray_run)
    finally:
        bar.close()
    run_seconds = time.perf_counter() - t_run
    result = _result(st, tasks, results, grid, quantize, calibration, fmt, data, n_cached, counters["evaluated"],
                     jobs, executor, run_seconds, t_start)
    result = json_clean(result)
    if out_dir is not None:
        from .outputs import write_outputs
        write_outputs(result, out_dir)
    return result


def _result(st, tasks, results, grid, quantize, calibration, fmt, data, n_cached, evaluated, jobs, executor,
            run_seconds, t_start) -> dict:
    """The content of analyze.json."""
    rows = _rows(st, tasks, results)
    ref_acc = None
    if st["has_labels"]:
        correct = sum(int(np.sum(r.argmax(1) == y)) for r, y in zip(st["refs"], st["ys"]) if r.ndim == 2)
        ref_acc = correct / st["n_samples"]
    dec = [l for l in st["layers"] if l.decomposable]
    swept_methods = sorted({l.method for l in dec})
    return {
        "format": ANALYZE_FORMAT,
        "tool": "onnxcompress analyze",
        "model": {"path": st["path"], "sha256": st["model_sha"],
                  "input_shapes": {k: list(v) for k, v in st["shapes"].items()},
                  "decomposable_params": sum(l.params for l in dec),
                  "decomposable_macs": sum(l.macs or 0 for l in dec)},
        "settings": {"method": swept_methods[0] if len(swept_methods) == 1 else "+".join(swept_methods),
                     "methods": swept_methods, "grid": grid, "samples": st["n_samples"],
                     "quantize": quantize or "none", "int8": fmt.to_dict() if fmt else None,
                     "data": getattr(st["ds"], "description", str(data)), "data_fingerprint": st["data_fp"],
                     "labels": st["has_labels"],
                     "calibration": "the analyzed data" if quantize and calibration is None
                     else (str(calibration) if quantize else None),
                     "ratio_meaning": "per-layer weight ratio (each method's ranks for that ratio)"},
        "reference": {"samples": st["n_samples"], "accuracy": ref_acc},
        "layers": [l.to_dict() for l in st["layers"]],
        "measurements": rows,
        "additivity": additivity(rows),
        "stats": {"tasks": len(tasks), "evaluated": evaluated, "cached": n_cached,
                  "skipped": sum(1 for t in tasks if results[t["key"]].get("skipped")),
                  "evaluated_cpu_seconds": round(sum(results[k].get("cpu_seconds") or 0 for k in
                                                     {t["key"] for t in tasks} if not results[k].get("cached")), 3),
                  "jobs": jobs, "executor": executor, "run_seconds": round(run_seconds, 3),
                  "seconds": round(time.perf_counter() - t_start, 3),
                  "seconds_per_evaluation": round(run_seconds / evaluated, 4) if evaluated else None,
                  "cache": str(st["root"])},
    }


def _check_args(grid, quantize, executor, jobs, samples) -> list[float]:
    if quantize not in (None, "none", "int8"):
        raise UserError(f"analyze --quantize {quantize}: use int8 or none")
    if executor not in ("local", "ray"):
        raise UserError(f"invalid --executor {executor!r}: choose local or ray")
    if executor == "ray" and ray_available():
        raise UserError(ray_available())
    grid = sorted({float(r) for r in grid})
    if not grid or any(not r > 1 for r in grid):
        raise UserError("--grid ratios must be > 1, e.g. 1.5,2,3,4,6,8")
    if jobs < 1:
        raise UserError("--jobs must be >= 1")
    if samples is not None and samples < 1:
        raise UserError("--samples must be >= 1")
    return grid


def _setup(model, data, methods, samples, labels, preprocess, input_shape, fold_bn, seed, layers, cache_dir,
           out_dir, threads, quantize=None) -> dict:
    """The BN-folded model, its layers, the data (materialized), the reference outputs (cached), the cache."""
    from ..data import open_for_model
    from ..ir.modelio import load_model
    from ..ir.shapes import fixed_batch, input_shapes
    from ..ort.session import make_session
    from ..passes.fold_bn import FoldBatchNorm

    path = None
    if isinstance(model, (str, Path)):
        path = str(model)
        model = load_model(model)
    model_sha = sha256(model.SerializeToString())
    shapes = input_shapes(model, {k: tuple(v) for k, v in (input_shape or {}).items()})
    name = next(iter(shapes))
    base = FoldBatchNorm().run(model).model if fold_bn else model
    lays = model_layers(base, shapes, methods)
    if layers is not None:   # names or globs (`--layers "/layer4/*"`)
        import fnmatch

        unknown = [g for g in layers if not any(fnmatch.fnmatchcase(l.name, g) for l in lays)]
        if unknown:
            raise UserError(f"--layers: no layer named {', '.join(unknown)}")
        layers = [l.name for l in lays if any(fnmatch.fnmatchcase(l.name, g) for g in layers)]
    dec = [l for l in lays if l.decomposable]
    if not dec and not quantize:
        raise UserError(f"the model has no layer that {', '.join(methods)} can rewrite")
    # the per-layer sweep: the decomposable layers, and with INT8 every layer (its INT8-only sensitivity)
    sweep = [l for l in (lays if quantize else dec) if layers is None or l.name in layers]
    ds = open_for_model(data, model, shapes, preprocess=preprocess, labels=labels, limit=samples, seed=seed)
    batch = fixed_batch(model, name) or 16
    xs, ys = _materialize(ds, batch, model)
    data_fp = _fingerprint(xs, ys)
    root = Path(cache_dir) if cache_dir else (Path(out_dir) / "cache" if out_dir else None)
    if root is None:
        from .._cachedir import cache_dir as _home
        root = _home() / "analyze"
    cache = Cache(root)
    ref_key = sha256(model_sha.encode(), data_fp.encode(), b"ref", str(ANALYZE_FORMAT).encode())
    refs = cache.get_array(ref_key)
    if refs is None or len(refs) != len(xs):
        sess = make_session(model, "cpu", threads=threads)
        out0 = sess.get_outputs()[0].name
        refs = [sess.run([out0], x)[0] for x in xs]
        cache.put_array(ref_key, refs)
    return {"path": path, "model": model, "model_sha": model_sha, "shapes": shapes, "name": name, "base": base,
            "layers": lays, "dec": dec, "sweep": sweep, "ds": ds, "xs": xs, "ys": ys, "data_fp": data_fp,
            "n_samples": sum(_batch_len(x) for x in xs), "has_labels": all(y is not None for y in ys), "root": root,
            "cache": cache, "refs": refs, "batch": batch, "code": code_fingerprint()}


def _calibration(st, quantize, calibration, calibration_samples, preprocess, seed):
    if not quantize:
        return None, None, None
    from ..data import open_for_model
    from ..ort.quantize import int8_format_for

    if calibration is None:
        calib_xs, calib_fp = st["xs"], st["data_fp"]
    else:
        cds = open_for_model(calibration, st["model"], st["shapes"], preprocess=preprocess,
                             limit=calibration_samples or 64, seed=seed)
        calib_xs, _ = _materialize(cds, st["batch"], st["model"])
        calib_fp = _fingerprint(calib_xs, [None] * len(calib_xs))
    return calib_xs, calib_fp, int8_format_for("cpu")


def _tasks(st, grid, quantize, global_curve, calib_fp, fmt, td_int8: bool = True, only=None) -> list[dict]:
    """The variants to evaluate, each with a key over everything its measurement depends on."""
    from ..passes.registry import METHODS

    common = {"v": ANALYZE_FORMAT, "code": st["code"], "model": st["model_sha"], "data": st["data_fp"],
              "samples": st["n_samples"]}
    tasks: list[dict] = []

    def add(kind, scope, layer, ratio, ranks, method):
        t = {"kind": kind, "scope": scope, "layer": layer, "ratio": ratio, "method": method,
             "ranks": {k: [m, list(v)] for k, (m, v) in ranks.items()}}
        ident = {**common, "kind": kind, "scope": scope, "layer": layer, "ratio": ratio, "method": method}
        if "int8" in kind:
            ident.update(int8=fmt.to_dict(), calib=calib_fp)
        t["key"] = sha256(json.dumps(ident, sort_keys=True).encode())
        tasks.append(t)

    prop = {(l.name, m, r): METHODS[m].cost.ranks_for_ratio(l.info, r, "params")
            for l in st["dec"] for m in l.methods for r in grid}
    for l in st["sweep"]:
        for m in l.methods:
            for r in grid:
                if only is not None and (l.name, m, r) not in only:
                    continue
                rr = prop[(l.name, m, r)]
                one = {l.name: (m, rr)} if rr else {}
                add("td", "layer", l.name, r, one, m)
                if quantize and td_int8:
                    add("td+int8", "layer", l.name, r, one, m)
        if quantize:
            add("int8", "layer", l.name, None, {}, None)
    if global_curve:
        gm = "+".join(sorted({l.method for l in st["dec"]}))
        for r in grid:
            rrs = {l.name: (l.method, prop[(l.name, l.method, r)]) for l in st["dec"] if prop[(l.name, l.method, r)]}
            add("td", "global", None, r, rrs, gm)
            if quantize:
                add("td+int8", "global", None, r, rrs, gm)
        if quantize:
            add("int8", "global", None, None, {}, None)
    return tasks


def _from_cache(cache: Cache, tasks) -> tuple[dict, int]:
    results: dict[str, dict] = {}
    n_cached = 0
    for t in tasks:
        if t["kind"].startswith("td") and not t["ranks"]:
            results[t["key"]] = {"skipped": f"chain would not shrink at ratio {t['ratio']:g}", "seconds": 0.0}
            continue
        hit = cache.get(t["key"])
        if hit is not None:
            results[t["key"]] = {**hit, "cached": True}
            n_cached += 1
    return results, n_cached


def _rows(st, tasks, results) -> list[dict]:
    from ..passes.registry import METHODS

    by_name = {l.name: l for l in st["layers"]}

    def cost(l: Layer, ranks, target, method=None):
        c = METHODS[method or l.method].cost
        return c.cost(l.info, ranks, target) if l.macs is not None or target == "params" else None

    rows = []
    for t in tasks:
        m = results[t["key"]]
        row: dict[str, Any] = {"kind": t["kind"], "scope": t["scope"], "layer": t["layer"], "ratio": t["ratio"],
                               "method": t["method"]}
        ranks = {k: (mm, tuple(v)) for k, (mm, v) in t["ranks"].items()}
        if t["scope"] == "layer":
            l = by_name[t["layer"]]
            rr = ranks.get(l.name, (None, None))[1]
            row.update(ranks=list(rr) if rr else None, layers_decomposed=1 if rr else 0,
                       r3=rr[0] if rr and t["method"] == "tucker2" else None,
                       r4=rr[1] if rr and t["method"] == "tucker2" else None,
                       params_before=l.params, macs_before=l.macs,
                       params_after=int(cost(l, rr, "params", t["method"])) if rr else l.params,
                       macs_after=(cost(l, rr, "macs", t["method"]) if rr else l.macs))
        else:
            row.update(ranks={k: list(v) for k, (_, v) in ranks.items()}, r3=None, r4=None,
                       layers_decomposed=len(ranks),
                       params_before=sum(l.params for l in st["dec"]),
                       params_after=sum(int(cost(l, ranks[l.name][1], "params")) if l.name in ranks else l.params
                                        for l in st["dec"]),
                       macs_before=sum(l.macs or 0 for l in st["dec"]),
                       macs_after=sum((cost(l, ranks[l.name][1], "macs") or 0) if l.name in ranks else (l.macs or 0)
                                      for l in st["dec"]))
        row.update({k: m.get(k) for k in ("weight_rel_error", "samples", "top1_agreement", "top5_agreement",
                                          "sqnr_db", "cosine", "max_abs_diff", "accuracy_before",
                                          "accuracy_after", "accuracy_drop", "skipped", "seconds", "cpu_seconds",
                                          "cached")})
        row["noise"] = _noise(row["sqnr_db"])
        rows.append(row)
    return rows
