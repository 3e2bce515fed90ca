"""`onnxcompress analyze`: per-layer sensitivity of a model to Tucker2 (and INT8), measured on ONNX Runtime.

One task = one model variant, evaluated against the original on the same data:

* ``td``       one layer Tucker2-decomposed at the proportional ranks of a grid ratio (ALGORITHMS §1.5);
* ``int8``     one layer's nodes INT8-quantized (QDQ, calibrated on the data), everything else float;
* ``td+int8``  that layer decomposed, then only its chain quantized;
* global rows (``scope = "global"``): every decomposable layer decomposed at the same ratio (``td``), all
  nodes quantized (``int8``), or both (``td+int8``).

Metrics against the original's outputs (computed once): top-1/top-5 agreement, SQNR, cosine, accuracy when
labels are known (:class:`~onnxcompress.evaluate.FidelityAccumulator`). The sum of the per-layer drops is
compared with the measured combined drop (additivity, ALGORITHMS §5).

Execution: BatchNorm is folded once; tasks run in a process pool (``jobs``; the model, the data and the
reference outputs are shipped once per worker through the pool initializer) or on Ray (``executor="ray"``:
one ``ray.put`` of the same payload). Each finished task is written at once to a JSON file in the cache,
keyed by sha256(model bytes) + settings, so re-runs are incremental and an interrupted run resumes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from .errors import UserError
from .report import json_clean

ANALYZE_FORMAT = 1          # bump when a measurement's meaning changes: it invalidates cached results
DEFAULT_GRID: tuple[float, ...] = (1.5, 2, 3, 4, 6, 8)
DEFAULT_SAMPLES = 64
CSV_FIELDS = ("kind", "scope", "layer", "ratio", "r3", "r4", "layers_decomposed", "params_before", "params_after",
              "macs_before", "macs_after", "weight_rel_error", "samples", "top1_agreement", "top5_agreement",
              "sqnr_db", "noise", "cosine", "max_abs_diff", "accuracy_before", "accuracy_after", "accuracy_drop",
              "skipped", "seconds", "cpu_seconds", "cached")


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Layer:
    name: str
    index: int
    T: int
    S: int
    kernel: tuple[int, ...]
    params: int                  # weight only (no bias): the allocation convention
    macs: int | None
    decomposable: bool
    skipped: str | None
    spec: Any = None             # decompose.allocate.LayerSpec

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "T": self.T, "S": self.S, "kernel": list(self.kernel),
                "params": self.params, "macs": self.macs, "decomposable": self.decomposable,
                "skipped": self.skipped}


def model_layers(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[Layer]:
    """Every Conv of a (BN-folded) model, with its allocation spec and whether Tucker2 can rewrite it."""
    from .graph import conv_info, infer_value_shapes
    from .passes._gs import import_graph
    from .passes.tucker2 import tucker2_problem
    from .planning import layer_spec

    vs = infer_value_shapes(model, shapes)
    g = import_graph(model)
    out = []
    for idx, node in enumerate(n for n in g.nodes if n.op == "Conv"):
        info = conv_info(node, idx, vs)
        why = tucker2_problem(info)
        spec = layer_spec(info) if why is None else None
        out.append(Layer(info.name, idx, info.T, info.S, info.kernel, int(np.prod(info.weight_shape)),
                         info.macs, why is None, why, spec))
    return out


def _sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _materialize(ds, batch: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    xs, ys = [], []
    for x, y in ds.batches(batch):
        if isinstance(x, dict):
            raise UserError("analyze supports single-input models only")
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(None if y is None else np.asarray(y))
    if not xs:
        raise UserError("the data holds no samples")
    return xs, ys


def _fingerprint(xs, ys) -> str:
    return _sha256(*[x.tobytes() for x in xs], *[(b"" if y is None else np.asarray(y, np.int64).tobytes()) for y in ys])


def _open(source, model, shapes, preprocess, labels, limit, seed):
    from .data import DataError, open_dataset
    from .graph import open_batch_shape

    name = next(iter(shapes))
    try:
        return open_dataset(str(source), input_shape=open_batch_shape(model, name, shapes[name]), input_name=name,
                            preprocess=preprocess, labels=labels, limit=limit, seed=seed)
    except DataError as e:
        raise UserError(str(e)) from e


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


def code_fingerprint() -> str:
    """Versions and the source of the whole package: any change to the code that produces a measurement
    (the factorization, a pass, the quantization, this module — wherever it lives) invalidates cached results
    and cached factors. Every .py file under the package is hashed with its relative path, so moving or
    renaming a module changes the key as well; an unreadable source file is an error, never skipped."""
    import onnxruntime

    from . import __version__
    here = Path(__file__).resolve().parent
    parts = [__version__.encode(), onnxruntime.__version__.encode(), onnx.__version__.encode()]
    files = sorted(here.rglob("*.py"))
    if not files:
        raise RuntimeError(f"no source files found under {here}: cannot fingerprint the code")
    for f in files:
        parts += [f.relative_to(here).as_posix().encode(), f.read_bytes()]
    return _sha256(*parts)[:16]


class _FactorCache:
    """Memoizes decompose.tucker2.tucker2 on disk (`root/factors`): the global curve and later runs reuse
    the factors of the one-layer tasks (same kernel, ranks and iterations give the same factors)."""

    def __init__(self, root: str | None, code: str):
        self.root = Path(root) / "factors" if root else None
        self.code = code

    def __call__(self, kernel, r3, r4, *, n_iter_max=5, **kw):
        from .decompose.tucker2 import Tucker2Result, tucker2

        if self.root is None:
            return tucker2(kernel, r3, r4, n_iter_max=n_iter_max, **kw)
        k = np.ascontiguousarray(kernel)
        key = _sha256(k.tobytes(), str((k.shape, str(k.dtype), r3, r4, n_iter_max, sorted(kw.items()),
                                        self.code)).encode())
        p = self.root / f"{key}.npz"
        try:
            with np.load(p) as z:
                return Tucker2Result(core=z["core"], U_T=z["U_T"], U_S=z["U_S"], rel_error=float(z["rel_error"]),
                                     n_iter=int(z["n_iter"]))
        except (OSError, ValueError, KeyError):
            pass
        res = tucker2(kernel, r3, r4, n_iter_max=n_iter_max, **kw)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, core=res.core, U_T=res.U_T, U_S=res.U_S, rel_error=res.rel_error, n_iter=res.n_iter)
        os.replace(tmp, p)
        return res


class _memoized_factors:
    """Within a task, route the Tucker2 pass's factorization through the factor cache (worker-local)."""

    def __init__(self, cache: _FactorCache):
        self.cache = cache

    def __enter__(self):
        from .passes import tucker2 as tp
        self.saved = tp.tucker2
        tp.tucker2 = self.cache

    def __exit__(self, *exc):
        from .passes import tucker2 as tp
        tp.tucker2 = self.saved


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
        self.threads = payload["threads"]
        self.input_name = next(iter(self.shapes))
        self.suffix: dict[str, list[str]] = payload.get("suffix") or {}   # layer -> boundary tensors
        self.act_dir = payload.get("act_dir")
        self.factors = _FactorCache(payload.get("factor_root"), payload.get("code", ""))
        self._acts: dict[str, np.ndarray] = {}
        self._suffix_models: dict[str, onnx.ModelProto] = {}

    def activation(self, name: str) -> np.ndarray:
        """(batches, *batch_shape) values of a tensor of the BN-folded model on the data (memory-mapped)."""
        if name == self.input_name:
            return self.xs
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


def _worker_init(payload: bytes) -> None:
    global _CTX
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, "blas")
    except Exception:  # noqa: BLE001 - optional
        pass
    _CTX = _Context(pickle.loads(payload))


def _worker_run(task: dict) -> dict:
    assert _CTX is not None, "worker not initialised"
    return run_task(_CTX, task)


def _ray_run(payload_ref_box: list, task: dict) -> dict:
    """Ray task body: the payload arrives once per worker process (object-store reference in a list so Ray
    does not resolve it per call); later tasks in the same worker reuse the parsed context."""
    global _CTX
    import ray

    key = task["payload_key"]
    if _CTX is None or getattr(_CTX, "ray_key", None) != key:
        _worker_init(ray.get(payload_ref_box[0]))
        _CTX.ray_key = key
    return run_task(_CTX, task)


class _ArrayData:
    """In-memory batches as a Dataset for the calibration reader."""

    def __init__(self, xs):
        self.xs = xs

    def __len__(self):
        return sum(len(x) for x in self.xs)

    def batches(self, batch_size: int = 1):
        for x in self.xs:
            for s in range(0, len(x), batch_size):
                yield x[s:s + batch_size], None


def quantize_nodes(model: onnx.ModelProto, calib_xs, input_name: str, fmt: dict,
                   nodes: Sequence[str] | None = None) -> onnx.ModelProto:
    """INT8 QDQ of `nodes` only (all quantizable nodes when None), calibrated (MinMax) on `calib_xs`;
    the same ORT calls and format as the QuantizeInt8 pass."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .calibration import CalibrationReader

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="onnxcompress-a-") as td:
        src, pre, dst = Path(td) / "in.onnx", Path(td) / "pre.onnx", Path(td) / "out.onnx"
        onnx.save_model(model, src)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if nodes is not None:
            have = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
            nodes = [n for n in nodes if n in have]
            if not nodes:
                raise RuntimeError("the layer's nodes disappeared in quantization pre-processing")
        batch = max(len(x) for x in calib_xs)
        reader = CalibrationReader(_ArrayData(calib_xs), input_name, batch_size=batch)
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                        per_channel=fmt["per_channel"], activation_type=qt[fmt["activations"]],
                        weight_type=qt[fmt["weights"]], calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_quantize=list(nodes) if nodes is not None else None,
                        extra_options={"ActivationSymmetric": fmt["symmetric_activations"],
                                       "WeightSymmetric": True})
        return onnx.load(str(dst))


def run_task(ctx: _Context, task: dict) -> dict:
    """Build one variant, evaluate it against the cached reference outputs; returns the metrics."""
    from .evaluate import FidelityAccumulator, make_session
    from .passes.tucker2 import Tucker2Pass

    t0, c0 = time.perf_counter(), time.process_time()
    kind = task["kind"]
    model = ctx.model
    row: dict[str, Any] = {}
    nodes: list[str] | None = None
    feeds = None
    if kind in ("td", "td+int8"):
        plan = {k: tuple(v) for k, v in task["ranks"].items()}
        policy = lambda info: plan.get(info.name, "not in this variant")   # noqa: E731
        shapes = ctx.shapes
        if kind == "td" and task["scope"] == "layer" and task["layer"] in ctx.suffix:
            # only the layer's downstream part runs, fed with the original's upstream values
            model = ctx.suffix_model(task["layer"])
            bnames = ctx.suffix[task["layer"]]
            shapes = {t: tuple(ctx.activation(t)[0].shape) for t in bnames}
            feeds = [{t: np.asarray(ctx.activation(t)[i]) for t in bnames} for i in range(len(ctx.xs))]
        with _memoized_factors(ctx.factors):
            res = Tucker2Pass(policy, shapes).run(model)
        done = [l for l in res.layers if l.skipped is None]
        if not done:
            return {"skipped": "no layer rewritten", "seconds": time.perf_counter() - t0}
        model = res.model
        row["weight_rel_error"] = float(np.sqrt(np.mean([l.weight_rel_error ** 2 for l in done])))
        nodes = [n for l in done for n in l.new_nodes]
    if kind in ("int8", "td+int8"):
        if task["scope"] == "global":
            nodes = None
        elif kind == "int8":
            nodes = [task["layer"]]
        model = quantize_nodes(model, ctx.calib, ctx.input_name, ctx.fmt, nodes)
    sess = make_session(model, "cpu", threads=ctx.threads)
    out_name = sess.get_outputs()[0].name
    acc = FidelityAccumulator()
    if feeds is None:
        feeds = [{ctx.input_name: x} for x in ctx.xs]
    for fd, y, ref in zip(feeds, ctx.ys, ctx.refs):
        acc.update(ref, sess.run([out_name], fd)[0], y)
    f = acc.result()
    row.update({"samples": f.samples, "top1_agreement": f.top1_agreement, "top5_agreement": f.top5_agreement,
                "sqnr_db": f.sqnr_db, "cosine": f.cosine, "max_abs_diff": f.max_abs_diff,
                "accuracy_before": f.accuracy_before, "accuracy_after": f.accuracy_after,
                "accuracy_drop": f.accuracy_drop, "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0})
    return row


# ------------------------------------------------------------------------------------------ cache
class Cache:
    """One JSON file per finished task under `root`, written atomically (a killed run loses nothing)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        p = self._path(key)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, p)

    def get_array(self, key: str) -> list[np.ndarray] | None:
        p = self.root / f"ref-{key}.npz"
        try:
            with np.load(p) as z:
                return [z[f"o{i}"] for i in range(len(z.files))]
        except (OSError, ValueError, KeyError):
            return None

    def put_array(self, key: str, arrays: list[np.ndarray]) -> None:
        p = self.root / f"ref-{key}.npz"
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{f"o{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, p)


# ------------------------------------------------------------------------------------------ progress
class _Bar:
    """A one-line progress bar on stderr (TTY only), no dependency."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

    def update(self, done: int, cached: int) -> None:
        if not self.enabled or not self.total:
            return
        frac = done / self.total
        n = int(30 * frac)
        el = time.perf_counter() - self.t0
        run = done - cached
        eta = (el / run * (self.total - done)) if run > 0 else 0.0
        sys.stderr.write(f"\r  analyze [{'#' * n}{'.' * (30 - n)}] {done}/{self.total} tasks "
                         f"({cached} cached)  {el:5.0f}s elapsed, eta {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------------ executors
def _execute(todo: list[tuple[str, dict]], payload: bytes, jobs: int, executor: str,
             on_done: Callable[[str, dict], None]) -> None:
    if not todo:
        return
    if executor == "ray":
        _execute_ray(todo, payload, jobs, on_done)
    elif jobs <= 1:
        _worker_init(payload)
        for key, task in todo:
            on_done(key, _worker_run(task))
    else:
        _execute_pool(todo, payload, jobs, on_done)


def _execute_pool(todo, payload, jobs, on_done) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ex = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(payload,))
    try:
        pending = {ex.submit(_worker_run, task): key for key, task in todo}
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                on_done(pending.pop(fut), fut.result())
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        for p in list(getattr(ex, "_processes", {}).values()):   # our own workers only
            p.terminate()
        raise
    ex.shutdown(wait=True)


def ray_available() -> str | None:
    """None when Ray can be imported, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "--executor ray needs Ray, which is not installed: pip install 'ray>=2' (or use --executor local)"
    return None


def _execute_ray(todo, payload, jobs, on_done) -> None:
    why = ray_available()
    if why:
        raise UserError(why)
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, jobs), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
        started = True
    try:
        ref = ray.put(payload)                  # the model bytes travel once, through the object store
        remote = ray.remote(num_cpus=1)(_ray_run)
        pkey = _sha256(payload)
        pending = {remote.remote([ref], {**task, "payload_key": pkey}): key for key, task in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                on_done(pending.pop(r), ray.get(r))
    except BaseException:
        for r in list(locals().get("pending", {})):
            ray.cancel(r, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------ analyze
def _activations(base, bounds, input_name, xs, root: Path, model_sha, data_fp, threads) -> str:
    """Values of every boundary tensor on the data, one .npy per tensor (batches stacked), computed once."""
    from .evaluate import make_session

    tensors = sorted({t for b in bounds.values() for t in b} - {input_name})
    key = _sha256(model_sha.encode(), data_fp.encode(), json.dumps(tensors).encode(), b"act")
    d = root / f"act-{key[:20]}"
    if (d / "manifest.json").is_file():
        return str(d)
    d.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(base)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    sess = make_session(m, "cpu", threads=threads)
    vals: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for x in xs:
        outs = sess.run(tensors, {input_name: x})
        for t, v in zip(tensors, outs):
            vals[t].append(v)
    files = {}
    for i, t in enumerate(tensors):
        files[t] = f"t{i}.npy"
        np.save(d / files[t], np.stack(vals[t]))
        vals[t] = []
    (d / "manifest.json").write_text(json.dumps(files))
    return str(d)


def _noise(sqnr_db):
    return None if sqnr_db is None else 10 ** (-float(sqnr_db) / 10)


def analyze(model, data, *, grid: Sequence[float] = DEFAULT_GRID, method: str = "tucker2",
            samples: int | None = DEFAULT_SAMPLES, labels=None, preprocess: str | None = None,
            input_shape: dict[str, Sequence[int]] | None = None, quantize: str | None = None,
            calibration=None, calibration_samples: int | None = None, jobs: int = 1, executor: str = "local",
            out_dir=None, cache_dir=None, threads: int = 1, seed: int = 0, layers: Sequence[str] | None = None,
            global_curve: bool = True, progress: bool | None = None, suffix: bool | None = None,
            on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the sensitivity sweep and return the analysis (the content of analyze.json). With `out_dir`,
    writes analyze.json, analyze.csv and the PNG plots there; the cache defaults to `out_dir/cache`.
    `layers`: restrict the per-layer sweep to these layer names. `on_result` is called after each task
    is stored (tests use it to interrupt a run)."""
    from .evaluate import make_session
    from .graph import input_shapes
    from .modelio import load_model
    from .passes.fold_bn import FoldBatchNorm
    from .passes.quantize import int8_format_for
    from .graph import fixed_batch

    t_start = time.perf_counter()
    if method != "tucker2":
        raise UserError(f"analyze --method {method}: only tucker2 is available in this version")
    if quantize not in (None, "none", "int8"):
        raise UserError(f"analyze --quantize {quantize}: use int8 or none")
    quantize = None if quantize == "none" else quantize
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

    path = None
    if isinstance(model, (str, Path)):
        path = str(model)
        model = load_model(model)
    original_bytes = model.SerializeToString()
    model_sha = _sha256(original_bytes)
    shapes = input_shapes(model, {k: tuple(v) for k, v in (input_shape or {}).items()})
    if len(shapes) != 1:
        raise UserError(f"analyze supports single-input models (this one has {len(shapes)})")
    name = next(iter(shapes))
    base = FoldBatchNorm().run(model).model
    lays = model_layers(base, shapes)
    dec = [l for l in lays if l.decomposable]
    if layers is not None:
        unknown = sorted(set(layers) - {l.name for l in lays})
        if unknown:
            raise UserError(f"--layers: no conv named {', '.join(unknown)}")
    sweep = [l for l in dec if layers is None or l.name in layers]
    if not dec:
        raise UserError("the model has no conv that Tucker2 can rewrite")

    # data, reference outputs (once, cached)
    ds = data if hasattr(data, "batches") else _open(data, model, shapes, preprocess, labels, samples, seed)
    batch = fixed_batch(model, name) or 16
    xs, ys = _materialize(ds, batch)
    if fixed_batch(model, name):
        keep = [i for i, x in enumerate(xs) if len(x) == batch]
        xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
    data_fp = _fingerprint(xs, ys)
    n_samples = sum(len(x) for x in xs)
    has_labels = all(y is not None for y in ys)
    root = Path(cache_dir) if cache_dir else (Path(out_dir) / "cache" if out_dir else None)
    if root is None:
        from .zoo import cache_dir as _home
        root = _home() / "analyze"
    cache = Cache(root)
    ref_key = _sha256(model_sha.encode(), data_fp.encode(), b"ref", str(ANALYZE_FORMAT).encode())
    refs = cache.get_array(ref_key)
    if refs is None or len(refs) != len(xs):
        sess = make_session(model, "cpu", threads=threads)
        out0 = sess.get_outputs()[0].name
        refs = [sess.run([out0], {name: x})[0] for x in xs]
        cache.put_array(ref_key, refs)
    calib_xs, calib_fp, fmt = None, None, None
    if quantize:
        if calibration is None:
            calib_xs, calib_fp = xs, data_fp
        else:
            cds = calibration if hasattr(calibration, "batches") else _open(
                calibration, model, shapes, preprocess, None, calibration_samples or 64, seed)
            calib_xs, _ = _materialize(cds, batch)
            calib_fp = _fingerprint(calib_xs, [None] * len(calib_xs))
        fmt = int8_format_for("cpu").to_dict()

    # tasks
    from .decompose import allocate as al

    code = code_fingerprint()
    common = {"v": ANALYZE_FORMAT, "code": code, "model": model_sha, "data": data_fp, "samples": n_samples, "method": method}
    tasks: list[dict] = []

    def add(kind, scope, layer, ratio, ranks):
        t = {"kind": kind, "scope": scope, "layer": layer, "ratio": ratio,
             "ranks": {k: list(v) for k, v in ranks.items()}}
        ident = {**common, "kind": kind, "scope": scope, "layer": layer, "ratio": ratio}
        if "int8" in kind:
            ident.update(int8=fmt, calib=calib_fp)
        t["key"] = _sha256(json.dumps(ident, sort_keys=True).encode())
        tasks.append(t)

    prop = {(l.name, r): al.proportional_ranks(l.spec, r, "params") for l in dec for r in grid}
    for l in sweep:
        for r in grid:
            rr = prop[(l.name, r)]
            add("td", "layer", l.name, r, {l.name: rr} if rr else {})
            if quantize:
                add("td+int8", "layer", l.name, r, {l.name: rr} if rr else {})
        if quantize:
            add("int8", "layer", l.name, None, {})
    if global_curve:
        for r in grid:
            rrs = {l.name: prop[(l.name, r)] for l in dec if prop[(l.name, r)]}
            add("td", "global", None, r, rrs)
            if quantize:
                add("td+int8", "global", None, r, rrs)
        if quantize:
            add("int8", "global", None, None, {})

    # run what the cache lacks
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
    todo = [(t["key"], t) for t in tasks if t["key"] not in results]
    seen = set()
    todo = [(k, t) for k, t in todo if not (k in seen or seen.add(k))]
    show = (sys.stderr.isatty() if progress is None else progress) and sys.stderr.isatty()
    bar = _Bar(len(tasks), bool(show))
    counters = {"evaluated": 0}

    def on_done(key: str, metrics: dict) -> None:
        cache.put(key, metrics)
        results[key] = {**metrics, "cached": False}
        counters["evaluated"] += 1
        bar.update(len(results), n_cached)
        if on_result is not None:
            on_result(metrics)

    # one-layer TD variants: evaluate only the layer's downstream part (local executor: the upstream values
    # are computed once and memory-mapped from the cache folder by the workers)
    bounds, act_dir = {}, None
    if (executor == "local" if suffix is None else suffix) and any(
            t["kind"] == "td" and t["scope"] == "layer" for _, t in todo):
        bounds = suffix_boundaries(base, [l.name for l in sweep])
        act_dir = _activations(base, bounds, name, xs, root, model_sha, data_fp, threads)
    payload = pickle.dumps({"key": model_sha + data_fp, "model": base.SerializeToString(), "shapes": shapes,
                            "xs": xs, "ys": ys, "refs": refs, "calib": calib_xs, "fmt": fmt,
                            "threads": threads, "suffix": bounds, "act_dir": act_dir, "code": code,
                            "factor_root": str(root) if executor == "local" else None},
                           protocol=pickle.HIGHEST_PROTOCOL)
    bar.update(len(results), n_cached)
    t_run = time.perf_counter()
    try:
        _execute(todo, payload, jobs, executor, on_done)
    finally:
        bar.close()
    run_seconds = time.perf_counter() - t_run

    # rows
    by_name = {l.name: l for l in lays}
    rows = []
    for t in tasks:
        m = results[t["key"]]
        row: dict[str, Any] = {"kind": t["kind"], "scope": t["scope"], "layer": t["layer"], "ratio": t["ratio"]}
        ranks = t["ranks"]
        if t["scope"] == "layer":
            l = by_name[t["layer"]]
            rr = ranks.get(l.name)
            row.update(r3=rr[0] if rr else None, r4=rr[1] if rr else None, layers_decomposed=1 if rr else 0,
                       params_before=l.params, macs_before=l.macs,
                       params_after=al.tucker2_params(l.T, l.S, l.spec.K, *rr) if rr else l.params,
                       macs_after=al.tucker2_macs(l.spec, *rr) if rr and l.macs is not None else l.macs)
        else:
            row.update(r3=None, r4=None, layers_decomposed=len(ranks),
                       params_before=sum(l.params for l in dec),
                       params_after=sum(al.tucker2_params(l.T, l.S, l.spec.K, *ranks[l.name]) if l.name in ranks
                                        else l.params for l in dec),
                       macs_before=sum(l.macs or 0 for l in dec),
                       macs_after=sum((al.tucker2_macs(l.spec, *ranks[l.name]) if l.name in ranks else l.macs or 0)
                                      for l in dec),
                       ranks={k: list(v) for k, v in ranks.items()})
        row.update({k: m.get(k) for k in ("weight_rel_error", "samples", "top1_agreement", "top5_agreement",
                                          "sqnr_db", "cosine", "max_abs_diff", "accuracy_before",
                                          "accuracy_after", "accuracy_drop", "skipped", "seconds", "cpu_seconds",
                                          "cached")})
        row["noise"] = _noise(row["sqnr_db"])
        rows.append(row)

    ref_acc = None
    if has_labels:
        correct = sum(int(np.sum(r.argmax(1) == y)) for r, y in zip(refs, ys) if r.ndim == 2)
        ref_acc = correct / n_samples
    evaluated = counters["evaluated"]
    result = {
        "format": ANALYZE_FORMAT,
        "tool": "onnxcompress analyze",
        "model": {"path": path, "sha256": model_sha, "input_shapes": {k: list(v) for k, v in shapes.items()},
                  "decomposable_params": sum(l.params for l in dec),
                  "decomposable_macs": sum(l.macs or 0 for l in dec)},
        "settings": {"method": method, "grid": grid, "samples": n_samples, "quantize": quantize or "none",
                     "int8": fmt, "data": getattr(ds, "description", str(data)), "data_fingerprint": data_fp,
                     "labels": has_labels, "calibration": "the analyzed data" if quantize and calibration is None
                     else (str(calibration) if quantize else None), "ratio_meaning":
                     "per-layer parameter ratio (proportional Tucker2 ranks, ALGORITHMS 1.5)"},
        "reference": {"samples": n_samples, "accuracy": ref_acc},
        "layers": [l.to_dict() for l in lays],
        "measurements": rows,
        "additivity": additivity(rows),
        "stats": {"tasks": len(tasks), "evaluated": evaluated, "cached": n_cached,
                  "skipped": sum(1 for t in tasks if results[t["key"]].get("skipped")),
                  "evaluated_cpu_seconds": round(sum(results[k].get("cpu_seconds") or 0 for k in
                                                     {t["key"] for t in tasks} if not results[k].get("cached")), 3),
                  "jobs": jobs, "executor": executor, "run_seconds": round(run_seconds, 3),
                  "seconds": round(time.perf_counter() - t_start, 3),
                  "seconds_per_evaluation": round(run_seconds / evaluated, 4) if evaluated else None,
                  "cache": str(root)},
    }
    result = json_clean(result)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


# ------------------------------------------------------------------------------------------ additivity
def _drop(row: dict, metric: str) -> float | None:
    if row is None or row.get("skipped"):
        return None
    if metric == "top1":
        v = row.get("top1_agreement")
        return None if v is None else 1.0 - v
    if metric == "accuracy":
        return row.get("accuracy_drop")
    if metric == "noise":
        return row.get("noise")
    raise ValueError(metric)


def _summary(pairs: list[tuple[float, float]]) -> dict:
    """pairs of (predicted = sum of parts, measured)."""
    if not pairs:
        return {"points": 0}
    p = np.array([a for a, _ in pairs], float)
    m = np.array([b for _, b in pairs], float)
    out = {"points": len(pairs), "mean_abs_error": float(np.mean(np.abs(m - p))),
           "max_abs_error": float(np.max(np.abs(m - p)))}
    nz = p > 0
    if nz.any():
        out["median_measured_over_predicted"] = float(np.median(m[nz] / p[nz]))
    if len(pairs) >= 3 and np.std(p) > 0 and np.std(m) > 0:
        out["pearson_r"] = float(np.corrcoef(p, m)[0, 1])
    return out


def additivity(rows: list[dict]) -> dict:
    """How well the sum of individual drops predicts the measured combined drop (ALGORITHMS §5).

    * ``td``: Σ over layers of the one-layer drop at ratio r vs the global (all layers at r) drop;
    * ``int8``: Σ of one-layer INT8 drops vs all-layers INT8;
    * ``td+int8_layer``: per layer and ratio, drop(TD) + drop(INT8) vs the measured drop(TD+INT8);
    * ``td+int8_global``: global drop(TD at r) + global drop(INT8) vs global drop(TD+INT8 at r).
    Metrics: ``top1`` (1 − top-1 agreement), ``accuracy`` (accuracy drop, with labels), ``noise``
    (relative output error energy 10^(−SQNR/10): the quantity §5 predicts to add)."""
    idx = {(r["kind"], r["scope"], r["layer"], r["ratio"]): r for r in rows}
    layers = sorted({r["layer"] for r in rows if r["scope"] == "layer"})
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    metrics = [m for m in ("top1", "accuracy", "noise") if any(_drop(r, m) is not None for r in rows)]
    out: dict[str, Any] = {"metrics": metrics, "td": [], "summary": {}}
    pairs: dict[str, dict[str, list]] = {}

    def note(section, metric, pred, meas):
        if pred is not None and meas is not None:
            pairs.setdefault(section, {}).setdefault(metric, []).append((pred, meas))

    for r in ratios:
        g = idx.get(("td", "global", None, r))
        if g is None or g.get("skipped"):
            continue
        parts = [idx.get(("td", "layer", l, r)) for l in (g.get("ranks") or {})]
        entry = {"ratio": r, "layers": len(parts), "complete": all(p is not None for p in parts)}
        if not entry["complete"]:
            out["td"].append(entry)
            continue
        for m in metrics:
            ds = [_drop(p, m) for p in parts]
            if any(d is None for d in ds):
                continue
            pred, meas = float(sum(ds)), _drop(g, m)
            entry[m] = {"sum_of_layers": pred, "measured": meas}
            note("td", m, pred, meas)
        if "noise" in entry:
            s = entry["noise"]["sum_of_layers"]
            entry["sqnr_db"] = {"predicted": -10 * math.log10(s) if s > 0 else None, "measured": g.get("sqnr_db")}
        out["td"].append(entry)
    gi = idx.get(("int8", "global", None, None))
    if gi is not None:
        parts = [idx.get(("int8", "layer", l, None)) for l in layers]
        if all(p is not None for p in parts):
            e = {}
            for m in metrics:
                ds = [_drop(p, m) for p in parts]
                if all(d is not None for d in ds) and _drop(gi, m) is not None:
                    e[m] = {"sum_of_layers": float(sum(ds)), "measured": _drop(gi, m)}
            out["int8"] = e
    for l in layers:
        q = idx.get(("int8", "layer", l, None))
        for r in ratios:
            t, tq = idx.get(("td", "layer", l, r)), idx.get(("td+int8", "layer", l, r))
            if q is None or t is None or tq is None:
                continue
            for m in metrics:
                a, b, c = _drop(t, m), _drop(q, m), _drop(tq, m)
                if None not in (a, b, c):
                    note("td+int8_layer", m, a + b, c)
    if gi is not None:
        tg = []
        for r in ratios:
            t, tq = idx.get(("td", "global", None, r)), idx.get(("td+int8", "global", None, r))
            if t is None or tq is None:
                continue
            e = {"ratio": r}
            for m in metrics:
                a, b, c = _drop(t, m), _drop(gi, m), _drop(tq, m)
                if None not in (a, b, c):
                    e[m] = {"td_plus_int8": a + b, "measured": c}
                    note("td+int8_global", m, a + b, c)
            tg.append(e)
        out["td+int8_global"] = tg
    out["summary"] = {sec: {m: _summary(v) for m, v in d.items()} for sec, d in pairs.items()}
    return out


# ------------------------------------------------------------------------------------------ outputs
def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in result["measurements"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def write_outputs(result: dict, out_dir) -> list[Path]:
    from .modelio import write_text_atomic

    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"--out {d} is a file")
    d.mkdir(parents=True, exist_ok=True)
    paths = [write_text_atomic(json.dumps(result, indent=1) + "\n", d / "analyze.json"),
             write_text_atomic(to_csv(result), d / "analyze.csv")]
    paths += analyze_plots(result, d)
    return paths


def analyze_plots(result: dict, out_dir) -> list[Path]:
    """sensitivity_<metric>.png: metric vs ratio, one curve per layer (TD; TD+INT8 in a second panel when
    measured) with the global curve in black; global_curve.png: the global measured drop and the sum of the
    per-layer drops vs ratio."""
    from .plots import _plt, _save, _short

    plt = _plt()
    d = Path(out_dir)
    rows = result["measurements"]
    kinds = [k for k in ("td", "td+int8") if any(r["kind"] == k for r in rows)]
    metrics = [("top1_agreement", "top-1 agreement (%)", 100)]
    if result["settings"]["labels"]:
        metrics.append(("accuracy_after", "accuracy (%)", 100))
    metrics.append(("sqnr_db", "SQNR (dB)", 1))
    layers = [l["name"] for l in result["layers"] if l["decomposable"] and any(
        r["layer"] == l["name"] for r in rows)]
    paths = []
    for key, label, scale in metrics:
        if not any(r.get(key) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for name in layers:
                pts = sorted((r["ratio"], r[key]) for r in rows if r["kind"] == kind and r["scope"] == "layer"
                             and r["layer"] == name and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], "o-", ms=3, lw=1, label=_short(name))
            g = sorted((r["ratio"], r[key]) for r in rows if r["kind"] == kind and r["scope"] == "global"
                       and r["ratio"] is not None and r.get(key) is not None)
            if g:
                ax.plot([p[0] for p in g], [scale * p[1] for p in g], "k--", lw=2, label="all layers (global)")
            ax.set_xlabel("per-layer parameter ratio")
            ax.set_ylabel(label)
            ax.set_title(f"{kind.upper()}: one layer at a time")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=6, loc="best")
        paths.append(_save(fig, d / f"sensitivity_{key.split('_')[0]}.png", plt))
    # global curve + additivity
    add = result.get("additivity", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for kind, style in (("td", "o-"), ("td+int8", "s--")):
        g = sorted((r["params_before"] / max(r["params_after"], 1), r) for r in rows
                   if r["kind"] == kind and r["scope"] == "global" and r["ratio"] is not None and not r.get("skipped"))
        for key, lab in (("top1_agreement", "top-1 agreement"), ("accuracy_after", "accuracy")):
            pts = [(x, r[key]) for x, r in g if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=f"{kind} {lab}")
    ax.set_xlabel("overall decomposed-params ratio (all layers, uniform)")
    ax.set_ylabel("%")
    ax.set_title("Global curve")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1]
    for m, style in (("top1", "o"), ("accuracy", "^"), ("noise", "s")):
        pts = [(e[m]["sum_of_layers"], e[m]["measured"]) for e in add.get("td", []) if m in e]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
    lim = ax.get_xlim()[1] if ax.lines else 1
    ax.plot([0, lim], [0, lim], "k:", lw=1, label="y = x")
    ax.set_xlabel("sum of one-layer drops (predicted)")
    ax.set_ylabel("measured drop, all layers")
    ax.set_title("Additivity (TD, per grid ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, d / "global_curve.png", plt))
    return paths


def render_summary(result: dict) -> str:
    """A short table for the terminal: per layer the metric at each ratio, then the additivity check."""
    rows = result["measurements"]
    grid = result["settings"]["grid"]
    key = "top1_agreement" if any(r.get("top1_agreement") is not None for r in rows) else "sqnr_db"
    fmtv = (lambda v: f"{100 * v:6.1f}") if key == "top1_agreement" else (lambda v: f"{v:6.1f}")
    lines = [f"{'layer (' + key + ', TD)':40s}" + "".join(f"{r:>7g}" for r in grid) + "   int8"]
    names = [l["name"] for l in result["layers"] if any(r["layer"] == l["name"] for r in rows)] + [None]
    for n in names:
        cells = []
        for r in grid:
            row = next((x for x in rows if x["kind"] == "td" and x["layer"] == n and x["ratio"] == r), None)
            cells.append(fmtv(row[key]) if row and row.get(key) is not None else "     -")
        q = next((x for x in rows if x["kind"] == "int8" and x["layer"] == n), None)
        lines.append(f"{(n or '(all layers)')[-40:]:40s}" + " ".join(cells) +
                     ("  " + fmtv(q[key]) if q and q.get(key) is not None else ""))
    summ = result["additivity"].get("summary", {})
    for sec, d in summ.items():
        parts = [f"{m}: r={s.get('pearson_r', float('nan')):.3f} measured/sum={s.get('median_measured_over_predicted', float('nan')):.2f}"
                 for m, s in d.items()]
        lines.append(f"additivity {sec}: " + "; ".join(parts))
    st = result["stats"]
    lines.append(f"{st['tasks']} tasks: {st['evaluated']} evaluated, {st['cached']} from the cache, "
                 f"{st['run_seconds']:.1f}s ({st['jobs']} job(s), {st['executor']})")
    return "\n".join(lines)
