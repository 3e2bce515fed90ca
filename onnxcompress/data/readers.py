"""Feed a :class:`~onnxcompress.data.Dataset` to ONNX Runtime.

* :class:`CalibrationReader` is an ``onnxruntime.quantization.CalibrationDataReader`` for ``quantize_static``:
  ``get_next()`` returns ``{input_name: batch}`` until the data runs out (then ``None``), ``rewind()`` starts
  over, ``len()`` counts batches and ``set_range()`` serves ORT's ``CalibStridedMinMax`` option.
* :func:`model_inputs` reads a model's real inputs (name, shape, numpy dtype) from a path, a ModelProto or an
  ``InferenceSession``; :func:`inputs_for_model` yields ``(feeds, labels)`` for evaluation.

Batch size: 1 by default; when the model's batch dimension is fixed at N, batches of exactly N (a trailing
partial batch is dropped, fewer than N samples is an error).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..errors import UserError
from .datasets import DataError, RandomDataset, open_dataset

__all__ = ["CalibrationReader", "ModelInput", "feeds_factory", "inputs_for_model", "model_inputs", "open_for_model"]


@dataclass(frozen=True)
class ModelInput:
    name: str
    shape: tuple  # ints for fixed dims, str or None for symbolic ones
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            return self.shape[0]
        return None


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def model_inputs(model) -> list[ModelInput]:
    """The graph inputs a caller must feed (initializers listed as inputs are left out)."""
    import onnx

    if hasattr(model, "get_inputs"):  # an onnxruntime.InferenceSession
        out = []
        for i in model.get_inputs():
            shape = tuple(d if isinstance(d, int) else (d or None) for d in i.shape)
            out.append(ModelInput(i.name, shape, np.dtype(_ORT_TYPES.get(i.type, np.float32))))
        return out
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected a path, ModelProto or InferenceSession, got {type(model).__name__}")
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:  # noqa: BLE001 - unknown / undefined element type
            dtype = np.dtype(np.float32)
        out.append(ModelInput(vi.name, dims, dtype))
    return out


def _as_feeds(batch, names: Sequence[str], dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise DataError(f"the data has no values for model input(s) {', '.join(missing)}")
        feeds = {n: np.asarray(batch[n]) for n in names}
    else:
        if len(names) != 1:
            raise DataError(f"the model has {len(names)} inputs ({', '.join(names)}) but the data feeds one")
        feeds = {names[0]: np.asarray(batch)}
    for n, a in feeds.items():
        want = dtypes.get(n)
        if want is not None and a.dtype != want:
            feeds[n] = a.astype(want)
        elif not a.flags.c_contiguous:
            feeds[n] = np.ascontiguousarray(a)
    return feeds


class CalibrationReader(CalibrationDataReader):
    """A Dataset as ORT calibration data: ``get_next() -> {name: batch}`` or ``None`` at the end."""

    def __init__(self, dataset, input_names: str | Sequence[str], *, batch_size: int = 1,
                 fixed_batch: bool = False, input_dtypes: Mapping[str, np.dtype] | None = None):
        """``fixed_batch``: the model's batch dim is fixed at ``batch_size``: every batch has exactly that
        many samples (a trailing partial batch is dropped)."""
        self.dataset = dataset
        self.input_names = [input_names] if isinstance(input_names, str) else list(input_names)
        if not self.input_names:
            raise ValueError("CalibrationReader needs at least one input name")
        if batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {batch_size}")
        self.batch_size = int(batch_size)
        self.fixed_batch = fixed_batch
        self.input_dtypes = {k: np.dtype(v) for k, v in (input_dtypes or {}).items()}
        n = len(dataset)
        if fixed_batch and n < self.batch_size:
            raise DataError(f"the model's batch size is fixed at {self.batch_size} but the data has only "
                            f"{n} sample{'s' if n != 1 else ''}")
        self._n_batches = n // self.batch_size if fixed_batch else -(-n // self.batch_size)
        self._start, self._stop = 0, self._n_batches
        self._it: Iterator | None = None
        self._pos = 0

    @classmethod
    def from_model(cls, model, data, *, batch_size: int | None = None, limit: int | None = None,
                   preprocess=None, labels=None, seed: int = 0) -> CalibrationReader:
        """A reader for ``model`` (path, ModelProto or InferenceSession) over ``data`` (a Dataset or a
        source for :func:`~onnxcompress.data.open_dataset`). Batch size: the model's fixed batch dim, else
        ``batch_size`` (default 1)."""
        inputs = model_inputs(model)
        if not inputs:
            raise DataError("the model has no inputs to feed")
        if isinstance(data, (str, os.PathLike)):
            data = open_dataset(data, input_shape=inputs[0].shape, input_name=inputs[0].name,
                                preprocess=preprocess, labels=labels, limit=limit, seed=seed)
        fixed = inputs[0].fixed_batch
        bs = fixed or batch_size or 1
        return cls(data, [i.name for i in inputs], batch_size=bs, fixed_batch=fixed is not None,
                   input_dtypes={i.name: i.dtype for i in inputs})

    # ---- CalibrationDataReader interface
    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._iterate()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return self._n_batches

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only batches [start_index, end_index) from now on (ORT's CalibStridedMinMax)."""
        self._start = max(0, int(start_index))
        self._stop = min(self._n_batches, int(end_index))
        self._it = None

    def __deepcopy__(self, memo):  # ORT's SmoothQuant deep-copies the reader; share the dataset, restart
        new = type(self)(self.dataset, self.input_names, batch_size=self.batch_size,
                         fixed_batch=self.fixed_batch, input_dtypes=self.input_dtypes)
        new._start, new._stop = self._start, self._stop
        return new

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for i, (batch, _labels) in enumerate(self.dataset.batches(self.batch_size)):
            if i >= self._stop:
                return
            if i < self._start:
                continue
            size = len(batch) if not isinstance(batch, Mapping) else len(next(iter(batch.values())))
            if self.fixed_batch and size != self.batch_size:
                return  # trailing partial batch
            yield _as_feeds(batch, self.input_names, self.input_dtypes)


def inputs_for_model(model, data, *, batch_size: int | None = None, limit: int | None = None,
                     preprocess=None, labels=None, seed: int = 0
                     ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """Yield ``(feeds, labels)`` for evaluating ``model`` on ``data`` (a Dataset or a source path).

    The batch size follows the model's fixed batch dim when it has one; otherwise ``batch_size`` (default
    32). A trailing partial batch is kept for dynamic-batch models and dropped for fixed-batch ones (later
    batches still follow: a short batch in the middle of the data is skipped).
    """
    inputs = model_inputs(model)
    if isinstance(data, (str, os.PathLike, Path)):
        data = open_dataset(data, input_shape=inputs[0].shape, input_name=inputs[0].name,
                            preprocess=preprocess, labels=labels, limit=limit, seed=seed)
    fixed = inputs[0].fixed_batch if inputs else None
    bs = fixed or batch_size or 32
    names = [i.name for i in inputs]
    dtypes = {i.name: i.dtype for i in inputs}
    for batch, y in data.batches(bs):
        size = len(batch) if not isinstance(batch, Mapping) else len(next(iter(batch.values())))
        if fixed and size != fixed:
            continue
        yield _as_feeds(batch, names, dtypes), y


def feeds_factory(model, data, batch_size: int = 16):
    """A callable returning a fresh iterator of ORT feed dicts over `data` (labels dropped): what capture,
    equalisation and refit stream."""
    return lambda: (f for f, _ in inputs_for_model(model, data, batch_size=batch_size))


def open_for_model(source, model, shapes: Mapping[str, Sequence[int]], *, preprocess=None, labels=None,
                   limit: int | None = None, seed: int = 0):
    """`source` (a path, 'random', or an already opened Dataset) as a Dataset for `model`: shaped for its
    first input (the batch dim left open when the model's is dynamic); 'random' feeds every input. Data
    problems are one-line UserErrors."""
    if hasattr(source, "batches"):
        return source
    if isinstance(source, str) and source.strip().lower() == "random":
        return RandomDataset.for_model(model, shapes, n=limit or 16, seed=seed)
    from ..ir.shapes import open_batch_shape

    name = next(iter(shapes))
    try:
        return open_dataset(str(source), input_shape=open_batch_shape(model, name, tuple(shapes[name])),
                            input_name=name, preprocess=preprocess, labels=labels, limit=limit, seed=seed)
    except DataError as e:
        raise UserError(str(e)) from e
