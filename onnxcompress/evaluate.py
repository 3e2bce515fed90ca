"""ONNX Runtime sessions per provider, and fidelity of an optimized model against its original:
top-1/top-5 agreement, SQNR, cosine similarity, max abs diff, accuracy when labels are known."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

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


def make_session(model: onnx.ModelProto | str, provider: str = "cpu", threads: int | None = None,
                 optimize: bool = True, lean: bool = False):
    """An ORT session. `lean`: for one-off checks (verification, fidelity), not timing: no weight
    pre-packing and no memory arena, which keeps peak memory near one copy of the weights."""
    import onnxruntime as ort

    why = provider_status(provider)
    if why:
        raise ProviderUnavailable(why)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if lean:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    data = model if isinstance(model, str) else model.SerializeToString()
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(data, so, providers=providers)


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
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
        else:
            feeds[vi.name] = np.zeros(shp, dtype=dt)
    return feeds


class RandomInputs:
    """Seeded random inputs for every model input, any rank and dtype (N(0,1) floats, zeros for integer
    inputs): the `random` data source. Sample i is the same whatever the batch size."""
    kind = "random"
    source = "random"
    has_labels = False

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], n: int = 16, seed: int = 0):
        inits = {i.name for i in model.graph.initializer}
        self.specs = {}
        for vi in model.graph.input:
            if vi.name in inits or vi.name not in shapes:
                continue
            self.specs[vi.name] = (tuple(shapes[vi.name][1:]),
                                   onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        self.n, self.seed = int(n), seed
        shown = ", ".join(f"{k}: {'x'.join(map(str, s))}" for k, (s, _) in self.specs.items())
        self.description = f"random N(0,1) inputs (not real data): {self.n} samples of {shown}, seed {seed}"

    def __len__(self) -> int:
        return self.n

    def _sample(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        return {k: (rng.standard_normal(s).astype(dt) if np.issubdtype(dt, np.floating) else np.zeros(s, dt))
                for k, (s, dt) in self.specs.items()}

    def batches(self, batch_size: int = 1):
        for start in range(0, self.n, batch_size):
            samples = [self._sample(i) for i in range(start, min(start + batch_size, self.n))]
            yield {k: np.stack([s[k] for s in samples]) for k in self.specs}, None


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(a64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den > 0 else num


@dataclass
class Fidelity:
    samples: int = 0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_diff: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_drop: float | None = None
    provider: str = "cpu"
    data: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class FidelityAccumulator:
    """Streams output pairs (reference, candidate) and labels into fidelity metrics."""

    def __init__(self):
        self.n = 0
        self.sig = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.agree1 = 0
        self.agree5 = 0
        self.cos_sum = 0.0
        self.classes = True
        self.correct_ref = 0
        self.correct_new = 0
        self.labelled = 0

    def update(self, ref: np.ndarray, new: np.ndarray, labels: np.ndarray | None = None) -> None:
        ref = np.asarray(ref, np.float64)
        new = np.asarray(new, np.float64)
        n = ref.shape[0] if ref.ndim else 1
        self.n += n
        self.sig += float(np.sum(ref * ref))
        self.noise += float(np.sum((ref - new) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - new))) if ref.size else 0.0)
        r2, n2 = ref.reshape(n, -1), new.reshape(n, -1)
        den = np.linalg.norm(r2, axis=1) * np.linalg.norm(n2, axis=1)
        self.cos_sum += float(np.sum(np.where(den > 0, np.sum(r2 * n2, axis=1) / np.maximum(den, 1e-300), 1.0)))
        if ref.ndim != 2 or ref.shape[1] < 2:
            self.classes = False
            return
        t1r, t1n = ref.argmax(1), new.argmax(1)
        self.agree1 += int(np.sum(t1r == t1n))
        k = min(5, ref.shape[1])
        top5n = np.argpartition(-new, k - 1, axis=1)[:, :k]
        self.agree5 += int(np.sum(np.any(top5n == t1r[:, None], axis=1)))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            self.labelled += n
            self.correct_ref += int(np.sum(t1r == labels))
            self.correct_new += int(np.sum(t1n == labels))

    def result(self, provider: str = "cpu", data: str = "") -> Fidelity:
        f = Fidelity(samples=self.n, provider=provider, data=data)
        if self.n == 0:
            return f
        f.sqnr_db = (math.inf if self.noise == 0 else 10 * math.log10(self.sig / self.noise)) if self.sig > 0 else None
        if f.sqnr_db == math.inf:
            f.sqnr_db = 999.0
        f.max_abs_diff = self.max_abs
        f.cosine = self.cos_sum / self.n
        if self.classes:
            f.top1_agreement = self.agree1 / self.n
            f.top5_agreement = self.agree5 / self.n
        if self.labelled:
            f.accuracy_before = self.correct_ref / self.labelled
            f.accuracy_after = self.correct_new / self.labelled
            f.accuracy_drop = f.accuracy_before - f.accuracy_after
        return f


def feeds_for(batch_inputs, input_names: list[str]) -> dict:
    if isinstance(batch_inputs, dict):
        return batch_inputs
    return {input_names[0]: np.ascontiguousarray(batch_inputs, dtype=np.float32)}


def fidelity(reference, candidate, batches: Iterable, provider: str = "cpu", data: str = "",
             output_index: int = 0) -> Fidelity:
    """Compare two sessions (or models) on streamed (inputs, labels) batches; `output_index` picks the
    output compared (the first by default)."""
    ref = reference if hasattr(reference, "run") else make_session(reference, provider)
    new = candidate if hasattr(candidate, "run") else make_session(candidate, provider)
    names = [i.name for i in ref.get_inputs()]
    acc = FidelityAccumulator()
    for inputs, labels in batches:
        feeds = feeds_for(inputs, names)
        a = ref.run(None, feeds)[output_index]
        b = new.run(None, feeds)[output_index]
        acc.update(a, b, labels)
    return acc.result(provider, data)
