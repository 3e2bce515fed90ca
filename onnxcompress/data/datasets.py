"""Streaming datasets for calibration and evaluation.

``open_dataset(source, ...)`` turns whatever the user pointed ``--calibration`` / ``--eval-data`` at into a
:class:`Dataset` that yields ``(inputs, labels)`` batch by batch and never holds the whole dataset in memory:

* a folder of images: flat (unlabelled, or labelled by a labels file), or ImageNet-style class sub-folders
  (labels are the indices of the sorted folder names, torchvision's ``ImageFolder`` convention);
* a ``cifar-10-batches-py`` folder (the pickled ``data_batch_*`` / ``test_batch`` files) or one batch file;
* a ``.npy`` file of shape (N, C, H, W), opened with ``mmap_mode="r"``;
* a ``.npz`` file (inputs under ``x`` / ``inputs`` / the model's input name, optional labels under ``y`` /
  ``labels``), read member by member, row block by row block, straight out of the zip archive;
* the literal ``random``: seeded N(0, 1) inputs of the model's input shape (not real data).

Inputs are yielded as one ``float32`` NCHW array per batch (all built-in sources feed single-input models);
labels, when the source has them, as an ``int64`` array of the same length, else ``None``.

Only numpy is needed at import time; Pillow is imported when an image folder is opened.
"""

from __future__ import annotations

import csv
import os
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Batch",
    "DataError",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "Preprocess",
    "open_dataset",
    "preprocess_for_shape",
]

Batch = tuple["np.ndarray | dict[str, np.ndarray]", "np.ndarray | None"]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_RANDOM_SAMPLES = 16


class DataError(ValueError):
    """A user-facing problem with the data (one line, no traceback needed)."""


# --------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize, center crop, scale to [0, 1], normalize; NCHW float32.

    ``resize``: the shorter side is resized to this many pixels (bilinear) before the center crop of
    ``size`` = (H, W). ``None`` means: resize only as much as needed for the crop to fit (the shorter side
    to the crop's, keeping the aspect ratio), nothing at all when the image already has the crop's size.
    ``mean`` / ``std`` are per channel on the [0, 1] scale; ``channels`` is 1 (grayscale, Pillow's "L") or 3
    (RGB).
    """

    size: tuple[int, int]
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise DataError(f"preprocess size must be (H, W) with positive values, got {self.size}")
        if self.channels not in (1, 3):
            raise DataError(f"preprocess channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"preprocess mean/std need {self.channels} value(s) each")
        if any(s <= 0 for s in self.std):
            raise DataError("preprocess std values must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def describe(self) -> str:
        resize = f"resize {self.resize}, " if self.resize else ""
        return f"{resize}crop {self.size[0]}x{self.size[1]}, {'RGB' if self.channels == 3 else 'gray'}"

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) or (C, H, W) values on the 0..255 scale -> normalized float32."""
        x = np.asarray(x, dtype=np.float32) / np.float32(255.0)
        shape = (self.channels, 1, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.float32, copy=False)

    def apply(self, image) -> np.ndarray:
        """A PIL image -> (C, H, W) float32."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        image = _resize_and_crop(image, self)
        arr = np.asarray(image, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return self.normalize(arr)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
# sklearn's load_digits scaled to [0, 1] (x / 16) and upsampled to 16x16: measured mean 0.305, std 0.319.
# White ink on black, as in the dataset: an 8-bit image folder for the default model must use 255 for ink.
_DIGITS_MEAN = (0.305,)
_DIGITS_STD = (0.319,)

PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(size=(224, 224), resize=256, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, channels=3),
    "cifar10": Preprocess(size=(32, 32), resize=None, mean=_CIFAR_MEAN, std=_CIFAR_STD, channels=3),
    "digits": Preprocess(size=(16, 16), resize=None, mean=_DIGITS_MEAN, std=_DIGITS_STD, channels=1),
}


def _resize_and_crop(image, pp: Preprocess):
    """torchvision's Resize(shorter side) + CenterCrop, with Pillow's bilinear filter."""
    from PIL import Image

    w, h = image.size
    ch, cw = pp.size
    if pp.resize:
        short, long_ = (w, h) if w <= h else (h, w)
        new_short, new_long = pp.resize, int(pp.resize * long_ / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    elif (w, h) != (cw, ch):
        scale = max(ch / h, cw / w)
        nw, nh = round(w * scale), round(h * scale)
    else:
        nw, nh = w, h
    nw, nh = max(nw, cw), max(nh, ch)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BILINEAR)
    if (nw, nh) != (cw, ch):
        left, top = int(round((nw - cw) / 2.0)), int(round((nh - ch) / 2.0))
        image = image.crop((left, top, left + cw, top + ch))
    return image


def _norm_shape(input_shape: Sequence | None) -> tuple[int | None, ...] | None:
    """(N, C, H, W) or (C, H, W), dims possibly symbolic -> (C, H, W) with None for unknown dims."""
    if input_shape is None:
        return None
    dims = []
    for d in input_shape:
        if isinstance(d, (int, np.integer)) and int(d) > 0:
            dims.append(int(d))
        elif isinstance(d, str) and d.isdigit() and int(d) > 0:
            dims.append(int(d))
        else:
            dims.append(None)
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) != 3:
        raise DataError(f"expected an input shape (C,H,W) or (N,C,H,W), got {_fmt(input_shape)}")
    return tuple(dims)


def _batch_dim(input_shape: Sequence | None) -> int | None:
    if input_shape is not None and len(input_shape) == 4:
        d = input_shape[0]
        if isinstance(d, (int, np.integer)) and int(d) > 0:
            return int(d)
    return None


def _fmt(shape) -> str:
    return "x".join("?" if d is None or (isinstance(d, int) and d <= 0) else str(d) for d in shape)


def preprocess_for_shape(input_shape: Sequence) -> Preprocess:
    """Default preprocessing for a model input (C, H, W) when no preset is named.

    Exact preset shapes map to the preset (3x224x224 -> imagenet, 3x32x32 -> cifar10, 1x16x16 -> digits);
    otherwise 1 channel uses the digits statistics, 3 channels the CIFAR-10 statistics up to 64 pixels and
    the ImageNet statistics (resize shorter side to H*256/224, center crop) above.
    """
    c, h, w = _norm_shape(input_shape) or (None, None, None)
    if c is None or h is None or w is None:
        raise DataError(f"cannot derive image preprocessing from input shape {_fmt(input_shape)}: "
                        "pass a preset (imagenet, cifar10, digits) or a fixed input shape")
    for pp in PRESETS.values():
        if pp.shape == (c, h, w):
            return pp
    if c == 1:
        return Preprocess(size=(h, w), resize=None, mean=_DIGITS_MEAN, std=_DIGITS_STD, channels=1)
    if c != 3:
        raise DataError(f"image folders need a 1- or 3-channel model input, the model input is {_fmt((c, h, w))}")
    if max(h, w) <= 64:
        return Preprocess(size=(h, w), resize=None, mean=_CIFAR_MEAN, std=_CIFAR_STD, channels=3)
    return Preprocess(size=(h, w), resize=int(round(min(h, w) * 256 / 224)), mean=_IMAGENET_MEAN,
                      std=_IMAGENET_STD, channels=3)


def _resolve_preprocess(preprocess: str | Preprocess | None, shape, default: str | None) -> Preprocess | None:
    if isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        try:
            return PRESETS[preprocess]
        except KeyError:
            raise DataError(f"unknown preprocess preset {preprocess!r} (choose from {', '.join(PRESETS)})") from None
    if preprocess is not None:
        raise DataError(f"preprocess must be a preset name or a Preprocess, got {type(preprocess).__name__}")
    if shape is not None and all(d is not None for d in shape):
        return preprocess_for_shape(shape)
    return PRESETS[default] if default else None


def _check_shape(what: str, got: tuple, want: tuple | None, *, model_shape=None) -> None:
    """Raise DataError when per-sample shape `got` (C,H,W) disagrees with the model's `want` (None = any)."""
    if want is None:
        return
    ok = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))
    if ok:
        return
    shown = _fmt(model_shape) if model_shape is not None else _fmt(want)
    hint = ""
    if len(got) == 3 and len(want) == 3 and all(w is None or g == w for g, w in zip((got[2], got[0], got[1]), want)):
        hint = " (it looks like NHWC: transpose it to NCHW)"
    raise DataError(f"{what} but the model input is {shown}{hint}")


# --------------------------------------------------------------------------------------------- datasets


@runtime_checkable
class Dataset(Protocol):
    """What every source returned by :func:`open_dataset` provides."""

    kind: str  # "images" | "npy" | "npz" | "cifar10" | "random"
    description: str  # one line for reports
    has_labels: bool
    source: str  # what open_dataset was given ("random" for random data)
    sample_shape: tuple[int, ...]  # (C, H, W) of one sample

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[Batch]: ...


class _Base:
    kind = ""
    description = ""
    has_labels = False
    sample_shape: tuple[int, ...] = ()  # (C, H, W) of one sample
    source: str = ""  # what open_dataset was given

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(1)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}: {self.description}>"

    @staticmethod
    def _check_batch_size(batch_size: int) -> int:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
        return int(batch_size)


class ImageFolderDataset(_Base):
    """Images decoded lazily, one batch at a time."""

    kind = "images"

    def __init__(self, root: Path, files: list[Path], labels: list[int] | None, preprocess: Preprocess,
                 classes: list[str] | None, detail: str):
        self.root = root
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.has_labels = labels is not None
        self.preprocess = preprocess
        self.classes = classes
        self.sample_shape = preprocess.shape
        self.description = f"image folder {root}: {len(files)} images{detail}, {preprocess.describe()}"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as im:
                return self.preprocess.apply(im)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        for start in range(0, len(self.files), bs):
            idx = range(start, min(start + bs, len(self.files)))
            x = np.stack([self.load(i) for i in idx])
            y = self.labels[start:start + len(idx)] if self.labels is not None else None
            yield x, y


class NpyDataset(_Base):
    """A (N, ...) array on disk, memory-mapped: only the rows of the current batch are read."""

    kind = "npy"

    def __init__(self, path: Path, array: np.ndarray, labels: np.ndarray | None, n: int):
        self.path = path
        self.array = array  # np.memmap
        self.labels = labels
        self.has_labels = labels is not None
        self.n = n
        self.sample_shape = tuple(array.shape[1:])
        lab = ", labelled" if labels is not None else ""
        self.description = f"{path.name}: {n} samples of {_fmt(self.sample_shape)} {array.dtype}{lab}"

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        for start in range(0, self.n, bs):
            stop = min(start + bs, self.n)
            x = _as_model_array(np.array(self.array[start:stop]))
            yield x, (self.labels[start:stop] if self.labels is not None else None)


class NpzDataset(_Base):
    """An array inside a .npz archive, streamed in row blocks (deflated or stored members alike)."""

    kind = "npz"

    def __init__(self, path: Path, member: str, shape: tuple, dtype: np.dtype, fortran: bool,
                 labels: np.ndarray | None, n: int, key: str):
        self.path = path
        self.member = member
        self.shape = shape
        self.dtype = dtype
        self.fortran = fortran
        self.labels = labels
        self.has_labels = labels is not None
        self.n = n
        self.key = key
        self.sample_shape = tuple(shape[1:])
        lab = ", labelled" if labels is not None else ""
        self.description = f"{path.name}[{key}]: {n} samples of {_fmt(self.sample_shape)} {dtype}{lab}"

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        if self.fortran:  # column-major rows are not contiguous: load this one array (rare; numpy writes C order)
            with np.load(self.path, allow_pickle=False) as z:
                data = z[self.key][: self.n]
            for start in range(0, self.n, bs):
                stop = min(start + bs, self.n)
                yield _as_model_array(np.ascontiguousarray(data[start:stop])), (
                    self.labels[start:stop] if self.labels is not None else None)
            return
        row = int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            _read_npy_header(f)
            for start in range(0, self.n, bs):
                stop = min(start + bs, self.n)
                buf = f.read(row * (stop - start))
                if len(buf) != row * (stop - start):
                    raise DataError(f"{self.path.name}: member {self.key!r} is truncated")
                x = np.frombuffer(buf, dtype=self.dtype).reshape((stop - start, *self.sample_shape))
                yield _as_model_array(x.copy()), (self.labels[start:stop] if self.labels is not None else None)


class Cifar10Dataset(_Base):
    """CIFAR-10 python batches: one pickled batch file (10,000 images, 30 MB) in memory at a time."""

    kind = "cifar10"

    def __init__(self, files: list[Path], counts: list[int], preprocess: Preprocess, n: int, where: str):
        self.files = files
        self.counts = counts
        self.preprocess = preprocess
        self.n = n
        self.has_labels = True
        self.sample_shape = preprocess.shape
        names = ", ".join(f.name for f in files)
        self.description = f"CIFAR-10 {where} ({names}): {n} images, {preprocess.describe()}"

    def __len__(self) -> int:
        return self.n

    def _samples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (uint8 (k, 3, 32, 32), labels) chunks file by file, up to n samples."""
        left = self.n
        for f in self.files:
            if left <= 0:
                return
            data, labels = _load_cifar_batch(f)
            k = min(left, len(labels))
            yield data[:k], labels[:k]
            left -= k

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        pp = self.preprocess
        if pp.shape == (3, 32, 32) and not pp.resize:
            return pp.normalize(raw)
        from PIL import Image

        out = [pp.apply(Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))) for img in raw]
        return np.stack(out)

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        pend_x: list[np.ndarray] = []
        pend_y: list[np.ndarray] = []
        have = 0
        for data, labels in self._samples():
            pos = 0
            while pos < len(labels):
                take = min(bs - have, len(labels) - pos)
                pend_x.append(data[pos:pos + take])
                pend_y.append(labels[pos:pos + take])
                have += take
                pos += take
                if have == bs:
                    yield self._convert(np.concatenate(pend_x)), np.concatenate(pend_y)
                    pend_x, pend_y, have = [], [], 0
        if have:
            yield self._convert(np.concatenate(pend_x)), np.concatenate(pend_y)


class RandomDataset(_Base):
    """Seeded N(0, 1) inputs (zeros for integer inputs); sample i is the same whatever the batch size. One
    anonymous input (`shape`) yields arrays; named inputs (`specs`, see `for_model`) yield feed dicts."""

    kind = "random"
    source = "random"

    def __init__(self, shape: tuple[int, ...] | None, n: int, seed: int, batch: int | None = None,
                 specs: dict | None = None):
        self.specs = dict(specs) if specs else {None: (tuple(shape), np.dtype(np.float32))}
        self.sample_shape = next(iter(self.specs.values()))[0]
        self.n, self.seed, self.fixed_batch = int(n), seed, batch
        shown = ", ".join((f"{k}: " if k else "") + _fmt(sh) for k, (sh, _) in self.specs.items())
        self.description = f"random N(0,1) inputs (not real data): {self.n} samples of {shown}, seed {seed}"

    @classmethod
    def for_model(cls, model, shapes: dict[str, tuple[int, ...]], n: int = 16, seed: int = 0) -> "RandomDataset":
        """Random inputs for every graph input of `model` at `shapes` (any rank and dtype)."""
        import onnx

        inits = {i.name for i in model.graph.initializer}
        specs = {vi.name: (tuple(shapes[vi.name][1:]),
                           np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))
                 for vi in model.graph.input if vi.name not in inits and vi.name in shapes}
        return cls(None, n, seed, specs=specs)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        return {k: (rng.standard_normal(s, dtype=np.float32).astype(dt) if np.issubdtype(dt, np.floating)
                    else np.zeros(s, dt)) for k, (s, dt) in self.specs.items()}

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        for start in range(0, self.n, bs):
            samples = [self.sample(i) for i in range(start, min(start + bs, self.n))]
            batch = {k: np.stack([x[k] for x in samples]) for k in self.specs}
            yield (batch[None] if None in batch else batch), None


# --------------------------------------------------------------------------------------------- helpers


def _as_model_array(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float64:
        return x.astype(np.float32)
    return x


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:  # pragma: no cover - future format
        raise DataError(f"unsupported .npy format version {version}")
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data problem
        raise DataError(f"{path} is not a CIFAR-10 python batch file ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch file")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 python batch file (no data/labels entries)")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: CIFAR-10 data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_label_array(path: Path) -> np.ndarray:
    """Labels for array sources: .npy, or a text file with one integer per line."""
    if path.suffix == ".npy":
        y = np.load(path, allow_pickle=False)
    else:
        try:
            y = np.array([int(t) for t in path.read_text().split()], dtype=np.int64)
        except ValueError:
            raise DataError(f"labels file {path} must hold one integer per line") from None
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels in {path} must be a 1-D array of integers, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def _parse_labels_file(path: Path) -> tuple[dict[str, int] | None, list[int] | None]:
    """-> ({filename: label}, None) for `name label` / `name,label` lines, or (None, [label...]) for one
    integer per line (in sorted-file order)."""
    if not path.is_file():
        raise DataError(f"labels file {path} not found")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"labels file {path} is empty")
    if all(_is_int(ln) for ln in lines):
        return None, [int(ln) for ln in lines]
    mapping: dict[str, int] = {}
    rows = csv.reader(lines) if "," in lines[0] else (ln.rsplit(None, 1) for ln in lines)
    for lineno, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if len(row) != 2:
            raise DataError(f"labels file {path}, line {lineno}: expected 'filename label'")
        name, label = row
        if not _is_int(label):
            if lineno == 1:  # a CSV header such as "filename,label"
                continue
            raise DataError(f"labels file {path}, line {lineno}: label {label!r} is not an integer")
        mapping[name] = int(label)
    return mapping, None


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if not isinstance(limit, (int, np.integer)) or limit < 1:
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    return int(limit)


# --------------------------------------------------------------------------------------------- openers


def _open_image_folder(root: Path, shape, preprocess, labels, limit, seed, model_shape) -> ImageFolderDataset:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if _is_image(p)]
    class_dirs = [p for p in entries if p.is_dir() and any(_is_image(q) for q in p.iterdir())]
    if loose and class_dirs:
        raise DataError(f"{root} mixes loose images and class sub-folders: use one layout")
    classes = None
    if class_dirs:
        classes = [d.name for d in class_dirs]
        files = [q for i, d in enumerate(class_dirs) for q in sorted(d.iterdir()) if _is_image(q)]
        folder_labels = [i for i, d in enumerate(class_dirs) for q in sorted(d.iterdir()) if _is_image(q)]
    else:
        files, folder_labels = loose, None
    if not files:
        raise DataError(f"no images found in {root}")

    lab: list[int] | None = folder_labels
    if labels is not None:
        lpath = Path(labels)
        mapping, seq = _parse_labels_file(lpath)
        if seq is not None:
            if len(seq) != len(files):
                raise DataError(f"labels file {lpath} has {len(seq)} labels but {root} has {len(files)} images")
            lab = seq
        else:
            lab = []
            for f in files:
                rel = f.relative_to(root).as_posix()
                if rel in mapping:
                    lab.append(mapping[rel])
                elif f.name in mapping:
                    lab.append(mapping[f.name])
                else:
                    raise DataError(f"labels file {lpath} has no entry for {rel}")

    pp = _resolve_preprocess(preprocess, shape, default="imagenet")
    _check_shape(f"preprocessing gives {_fmt(pp.shape)} images", pp.shape, shape, model_shape=model_shape)

    keep = _subset(len(files), limit, seed)
    files = [files[i] for i in keep]
    if lab is not None:
        lab = [lab[i] for i in keep]
    detail = f" in {len(classes)} class folders" if classes else (", labelled" if lab is not None else "")
    return ImageFolderDataset(root, files, lab, pp, classes, detail)


def _open_npy(path: Path, shape, labels, limit, model_shape) -> NpyDataset:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise DataError(f"cannot read {path.name}: {e}") from None
    _check_array(path.name, arr.shape, arr.dtype, shape, model_shape)
    n = arr.shape[0] if limit is None else min(limit, arr.shape[0])
    y = None
    if labels is not None:
        y = _read_label_array(Path(labels))
        if len(y) < arr.shape[0]:
            raise DataError(f"{path.name} has {arr.shape[0]} samples but labels {Path(labels).name} has {len(y)}")
        y = y[:n]
    return NpyDataset(path, arr, y, n)


def _check_array(name: str, ashape: tuple, dtype: np.dtype, shape, model_shape) -> None:
    if dtype.kind not in "fiub":
        raise DataError(f"{name} holds {dtype} values; expected numbers")
    if len(ashape) < 2:
        raise DataError(f"{name} has shape {ashape}; expected (N, C, H, W) with the sample index first")
    if ashape[0] == 0:
        raise DataError(f"{name} holds no samples")
    if shape is not None:
        _check_shape(f"{name} has shape {_fmt(ashape)}", tuple(ashape[1:]), shape, model_shape=model_shape)


_NPZ_X_KEYS = ("x", "inputs", "input", "data", "images")
_NPZ_Y_KEYS = ("y", "labels", "label", "targets")


def _open_npz(path: Path, shape, input_name, labels, limit, model_shape) -> NpzDataset:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read {path.name}: {e}") from None
    with zf:
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        keys = ([input_name] if input_name else []) + list(_NPZ_X_KEYS)
        key = next((k for k in keys if k in members), None)
        if key is None:
            if len(members) == 1:
                key = next(iter(members))
            else:
                want = ", ".join(repr(k) for k in keys)
                raise DataError(f"{path.name} has no inputs array: expected one of {want}; found {sorted(members)}")
        with zf.open(members[key]) as f:
            ashape, fortran, dtype = _read_npy_header(f)
    _check_array(f"{path.name}[{key}]", ashape, dtype, shape, model_shape)
    n = ashape[0] if limit is None else min(limit, ashape[0])
    y = None
    ykey = next((k for k in _NPZ_Y_KEYS if k in members and k != key), None)
    if labels is not None:
        y = _read_label_array(Path(labels))
    elif ykey is not None:
        with np.load(path, allow_pickle=False) as z:
            y = np.asarray(z[ykey])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path.name}[{ykey}] must be a 1-D array of integer labels, got {y.dtype} {y.shape}")
    if y is not None:
        if len(y) < ashape[0]:
            raise DataError(f"{path.name} has {ashape[0]} samples but {len(y)} labels")
        y = y[:n].astype(np.int64)
    return NpzDataset(path, members[key], ashape, dtype, fortran, y, n, key)


def _open_cifar(path: Path, shape, preprocess, limit, split, model_shape) -> Cifar10Dataset:
    if path.is_dir():
        train = sorted(path.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
        test = path / "test_batch"
        if split is None:
            split = "test" if test.is_file() else "train"
        if split == "test":
            if not test.is_file():
                raise DataError(f"{path} has no test_batch file")
            files, where = [test], "test set"
        elif split == "train":
            if not train:
                raise DataError(f"{path} has no data_batch_* files")
            files, where = train, "training set"
        else:
            raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    else:
        files, where = [path], "batch"
    # Counting means unpickling: read the files one at a time, and stop once `limit` is covered.
    counts: list[int] = []
    for f in files:
        if limit is not None and sum(counts) >= limit:
            break
        counts.append(len(_load_cifar_batch(f)[1]))
    files = files[: len(counts)]
    total = sum(counts)
    n = total if limit is None else min(limit, total)
    pp = _resolve_preprocess(preprocess, shape, default="cifar10")
    _check_shape(f"preprocessing gives {_fmt(pp.shape)} images", pp.shape, shape, model_shape=model_shape)
    return Cifar10Dataset(files, counts, pp, n, where)


def _is_cifar_dir(path: Path) -> bool:
    return (path / "test_batch").is_file() or any(path.glob("data_batch_*"))


def _is_cifar_file(path: Path) -> bool:
    return path.name == "test_batch" or path.name.startswith("data_batch_")


def open_dataset(
    source: str | os.PathLike,
    *,
    input_shape: Sequence | None = None,
    input_name: str | None = None,
    preprocess: str | Preprocess | None = None,
    labels: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    split: str | None = None,
) -> _Base:
    """Open a calibration / evaluation data source as a streaming :class:`Dataset`.

    ``input_shape``: the model input, (N, C, H, W) or (C, H, W), symbolic dims as None/str/<=0; when given
    the data is checked against it and image preprocessing derives its size from it. ``input_name`` picks
    the array inside an .npz. ``preprocess``: a preset name (see :data:`PRESETS`) or a :class:`Preprocess`
    for image folders and CIFAR batches. ``labels``: a labels file (images: ``name label`` lines, CSV
    ``name,label``, or one integer per line in sorted-file order; arrays: .npy or one integer per line).
    ``limit``: at most this many samples: the first ones for arrays and CIFAR, a seeded random subset (kept
    in sorted order) for image folders, whose sorted order groups classes together. ``seed``: the random
    source's seed and the image subset's. ``split``: for a cifar-10-batches-py folder, "test" (the default
    when test_batch exists) or "train".
    """
    ds = _open_dataset(source, input_shape=input_shape, input_name=input_name, preprocess=preprocess,
                       labels=labels, limit=limit, seed=seed, split=split)
    ds.source = "random" if ds.kind == "random" else str(source)
    return ds


def _open_dataset(source, *, input_shape, input_name, preprocess, labels, limit, seed, split) -> _Base:
    limit = _check_limit(limit)
    shape = _norm_shape(input_shape)
    model_shape = tuple(input_shape) if input_shape is not None else None
    if isinstance(source, str) and source.strip().lower() == "random":
        if shape is None or any(d is None for d in shape):
            raise DataError("random data needs a fixed input shape: pass --input-shape NAME:1x3x224x224")
        n = limit if limit is not None else DEFAULT_RANDOM_SAMPLES
        return RandomDataset(tuple(shape), n, seed, _batch_dim(input_shape))

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source} not found")
    if labels is not None and not Path(labels).is_file():
        raise DataError(f"labels file {labels} not found")
    if path.is_dir():
        if _is_cifar_dir(path):
            return _open_cifar(path, shape, preprocess, limit, split, model_shape)
        return _open_image_folder(path, shape, preprocess, labels, limit, seed, model_shape)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path, shape, labels, limit, model_shape)
    if suffix == ".npz":
        return _open_npz(path, shape, input_name, labels, limit, model_shape)
    if _is_cifar_file(path):
        return _open_cifar(path, shape, preprocess, limit, split, model_shape)
    if suffix in IMAGE_EXTENSIONS:
        raise DataError(f"{source} is a single image: put calibration/evaluation images in a folder")
    raise DataError(f"cannot read data source {source}: expected an image folder, a cifar-10-batches-py "
                    "folder or batch file, .npy, .npz, or 'random'")


class InterleavedSplit(_Base):
    """Every `every`-th sample of a dataset (offset `offset`), or all the others (`complement=True`): a
    held-apart split that samples the whole source evenly (image folders list their classes in order, so a
    contiguous split would hold whole classes apart). Streams the underlying dataset."""

    def __init__(self, ds, every: int, offset: int = 0, complement: bool = False, role: str = ""):
        self.ds, self.every, self.offset, self.complement = ds, int(every), int(offset), complement
        self.kind = getattr(ds, "kind", "")
        self.has_labels = getattr(ds, "has_labels", False)
        self.sample_shape = getattr(ds, "sample_shape", ())
        self.source = getattr(ds, "source", "")
        n = len(ds)
        self.n = sum(1 for i in range(n) if self._keep(i))
        self.description = f"{role or 'split'}: {self.n} of {getattr(ds, 'description', '')}"

    def _keep(self, i: int) -> bool:
        hit = i % self.every == self.offset
        return not hit if self.complement else hit

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        bs = self._check_batch_size(batch_size)
        pend_x, pend_y, have, i = [], [], 0, 0
        for x, y in self.ds.batches(max(bs, 16)):
            keys = list(x) if isinstance(x, dict) else None
            n = len(x[keys[0]]) if keys else len(x)
            idx = [j for j in range(n) if self._keep(i + j)]
            i += n
            if not idx:
                continue
            pend_x.append({k: x[k][idx] for k in keys} if keys else x[idx])
            pend_y.append(None if y is None else np.asarray(y)[idx])
            have += len(idx)
            while have >= bs:
                bx, by, pend_x, pend_y = _take(pend_x, pend_y, bs)
                have -= bs
                yield bx, by
        if have:
            bx, by, _, _ = _take(pend_x, pend_y, have)
            yield bx, by


def _take(xs: list, ys: list, n: int):
    """The first n samples of pending batches, and what remains."""
    if isinstance(xs[0], dict):
        cat = {k: np.concatenate([x[k] for x in xs]) for k in xs[0]}
        head, tail = {k: v[:n] for k, v in cat.items()}, {k: v[n:] for k, v in cat.items()}
        rest_n = len(next(iter(tail.values())))
    else:
        cat = np.concatenate(xs)
        head, tail, rest_n = cat[:n], cat[n:], len(cat) - n
    if ys[0] is None:
        yh, yt = None, None
    else:
        yc = np.concatenate(ys)
        yh, yt = yc[:n], yc[n:]
    return head, yh, ([tail] if rest_n else []), ([yt] if rest_n else [])


def split_holdout(ds, fraction: float = 0.25, min_holdout: int = 16):
    """(calibration part, held-apart part) of `ds`: every k-th sample held apart (k = round(1 / fraction)),
    the rest for calibration; None as the held-apart part when `ds` is too small to spare `min_holdout`."""
    n = len(ds)
    every = max(2, int(round(1 / fraction)))
    if n // every < min_holdout:
        return ds, None
    return (InterleavedSplit(ds, every, every - 1, complement=True, role="calibration split"),
            InterleavedSplit(ds, every, every - 1, role="held-apart split"))
