"""ONNX Runtime sessions per provider (the one place sessions are made), provider availability, and random
feeds for verification and timing."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot run here; the message says why."""


def provider_status(provider: str) -> str | None:
    """None when `provider` can run here, else the reason it cannot."""
    import onnxruntime as ort

    ep = PROVIDERS.get(provider)
    if ep is None:
        return f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})"
    if ep not in ort.get_available_providers():
        pkg = "onnxruntime-gpu" if provider in ("cuda", "tensorrt") else "onnxruntime"
        return f"{ep} is not available in this onnxruntime build (install {pkg} on a machine with a GPU)"
    return None


#: ModelProtos above this size reach ORT as a graph file + page-aligned external data (ORT maps the weights)
#: instead of a serialised copy (bytes in Python + ORT's own copy); over 2 GB there is no other way
FILE_SESSION_BYTES = 8 * 2**20


def make_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 optimize: bool = True, lean: bool = False):
    """An ORT session, from a path or a ModelProto. `lean`: for one-off checks (verification, fidelity), not
    timing: no weight pre-packing and no memory arena, which keeps peak memory near one copy of the weights.
    Multi-thread sessions do not spin their pool between runs: sessions timed in turn would otherwise steal
    the cores from each other (at 2 threads on 2 cores, models timed right after another came out up to 1.4x
    slower, in list order)."""
    import onnxruntime as ort

    why = provider_status(provider)
    if why:
        raise ProviderUnavailable(why)
    so = session_options(threads, optimize, lean)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), so, providers=providers)
    if _proto_bytes(model) <= FILE_SESSION_BYTES:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    from ..ir.modelio import write_external

    with tempfile.TemporaryDirectory(prefix="onnxcompress-s-") as td:   # the weights are mapped or read by now
        return ort.InferenceSession(str(write_external(model, Path(td) / "m.onnx")), so, providers=providers)


def session_options(threads: int | None = None, optimize: bool = True, lean: bool = False):
    """The SessionOptions of :func:`make_session`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if threads != 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if lean:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """The bytes a tensor's data takes in memory, from its shape and type (0 for external data)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    n = 1
    for d in t.dims:
        n *= d
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:   # noqa: BLE001 - an undefined or exotic type: count 4 bytes an element
        return n * 4


def _proto_bytes(model: onnx.ModelProto) -> int:
    """The model's size in memory, from its initializers' and Constant nodes' shapes: ByteSize() serialises the
    whole model to answer (+1 model at the peak, and twice the work where the bytes are serialised next)."""
    total = sum(_tensor_bytes(t) for t in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            total += sum(_tensor_bytes(a.t) for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


#: below this many bytes of model, release_memory(nbytes) does nothing: a full gc.collect costs 50-100 ms in a
#: large Python heap (the PassManager called it ~4 times per pass: 9 of the 12 s of a run of the fuzz corpus of
#: tiny models), and there is nothing worth giving back
RELEASE_MIN_BYTES = 32 * 2**20


def model_nbytes(model) -> int:
    """What `release_memory` weighs: the proto's size, or 2**31 when its weights live in external data (the
    ORT sessions and copies of it are then large whatever the proto says)."""
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model) and os.path.getsize(model) < RELEASE_MIN_BYTES:
        model = onnx.load(str(model), load_external_data=False)    # small file: are its weights beside it?
    if not isinstance(model, onnx.ModelProto):
        return 2**31
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return 2**31
    return _proto_bytes(model)


def release_memory(nbytes: int | None = None) -> None:
    """Give freed heap back to the OS after dropping a large object (an ORT session, a model copy): glibc
    keeps it otherwise, and peak RSS then grows with every stage. `nbytes`: the size of the model being
    worked on (`model_nbytes`); under RELEASE_MIN_BYTES nothing is done."""
    import ctypes
    import gc

    if nbytes is not None and nbytes < RELEASE_MIN_BYTES:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                 integers: str = "zeros") -> dict:
    """Seeded inputs for every graph input at `shapes`: N(0, 1) floats; integer inputs zeros
    (`integers="zeros"`, safe for index-like inputs) or uniform in the int8/uint8 range (`"random"`, for
    quantized inputs being timed)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shp = shapes[vi.name]
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(shp).astype(dt)
        elif integers == "random" and np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            lo, hi = max(int(info.min), -128), min(int(info.max), 255)
            feeds[vi.name] = rng.integers(lo, hi + 1, size=shp).astype(dt)
        else:
            feeds[vi.name] = np.zeros(shp, dtype=dt)
    return feeds
