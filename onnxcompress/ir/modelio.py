"""Loading and saving models safely: clear errors for bad files, atomic writes, external data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import UserError

_TWO_GB = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with its external data) or raise a one-line UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no such file: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a folder, not an ONNX file")
    if p.stat().st_size == 0:
        raise UserError(f"{p} is empty")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as e:
        raise UserError(f"{p} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:  # protobuf raises various things on garbage
        raise UserError(f"{p} is not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{p} is not an ONNX model (empty graph; truncated or another format?)")
    _check_external_locations(model, p.parent)
    _EXTERNAL[_file_key(p)] = _uses_external_data(model)
    if _uses_external_data(model):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise UserError(f"{p}: cannot load its external data ({_first_line(e)})") from e
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model)
    )


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data locations that escape the model's folder (absolute paths, '..')."""
    base = base.resolve()
    for t in _all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise UserError(f"refusing external data location {loc!r} of tensor {t.name!r}: it escapes the model folder")
        if not (base / loc).resolve().is_relative_to(base):
            raise UserError(f"refusing external data location {loc!r} of tensor {t.name!r}: it escapes the model folder")


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Validate an output path before any work: not an input, folder exists and is writable."""
    o = Path(out)
    for i in inputs:
        ip = Path(i)
        if ip.exists() and (o.resolve() == ip.resolve()):
            raise UserError(f"output path {o} is the input model: refusing to overwrite it")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} is not a folder")
    try:  # probe for real: os.access says yes to root even where the filesystem refuses
        fd, probe = tempfile.mkstemp(prefix=".onnxcompress-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output folder {parent} is not writable ({e.strerror})") from None
    if o.is_dir():
        raise UserError(f"output path {o} is a folder")
    return o


def stored_bytes(path: str | os.PathLike) -> int:
    """Bytes the model at `path` takes on disk: the .onnx file plus every external-data file it references
    (each counted once)."""
    p = Path(path)
    total = p.stat().st_size
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:   # noqa: BLE001 - unreadable: the file size is all there is
        return total
    seen = set()
    for t in _all_tensors(m):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        f = (p.parent / loc) if loc else None
        if f is not None and loc not in seen and f.is_file():
            seen.add(loc)
            total += f.stat().st_size
    return total


def create_temp(parent: str | os.PathLike, name: str) -> tuple[int, str]:
    """A new, empty temp file `.<name>.<random>.tmp` in `parent`, opened for writing: (fd, path).

    Created like any file the user writes (``open(..., 'w')``: mode 0666 less the umask, the folder's default
    ACL), not 0600 as ``tempfile.mkstemp`` makes it: the mode survives the rename into place, so outputs
    would otherwise be private whatever the umask."""
    import secrets

    for _ in range(100):
        path = os.path.join(os.fspath(parent), f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {parent}")


#: what load_model found out about the files it read: (path, mtime, size) -> keeps tensors in external files
_EXTERNAL: dict[tuple, bool] = {}


def _file_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at `path` keeps tensors in external data files (remembered from load_model when it
    read that file: parsing a large model again only to ask costs as much memory as the model)."""
    try:
        hit = _EXTERNAL.get(_file_key(Path(path)))
    except OSError:
        hit = None
    if hit is not None:
        return hit
    try:
        return _uses_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:
        return False


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike, external: bool | None = None) -> Path:
    """Write `model` to `out` through a temp file in the same folder and an atomic rename.

    With external data (`external=True`, or automatically for models over 2 GB) the tensors go to
    `<name>.data` next to the output.
    """
    o = Path(out)
    parent = o.parent if str(o.parent) else Path(".")
    big = model.ByteSize() > _TWO_GB if _fits_bytesize(model) else True
    big = big or bool(external)
    fd, tmp = create_temp(parent, o.name)
    os.close(fd)
    tmp_data = None
    try:
        if big:   # tensor by tensor into a temp data file (no copy of the model), renamed into place
            data_name = o.name + ".data"
            fd_data, tmp_data = create_temp(parent, data_name)   # onnx would create it 0600
            os.close(fd_data)
            tmp_data = Path(tmp_data)
            write_external(model, tmp, data_name=data_name, data_path=tmp_data, align=1)   # as compact as before
            os.replace(tmp_data, parent / data_name)
            tmp_data = None
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, o)
    except BaseException:
        for p in (tmp, tmp_data):
            if p is not None and os.path.exists(p):
                os.unlink(p)
        raise
    return o


def _fits_bytesize(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:
        return False


def write_text_atomic(text: str, out: str | os.PathLike) -> Path:
    o = Path(out)
    parent = o.parent if str(o.parent) else Path(".")
    fd, tmp = create_temp(parent, o.name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, o)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return o


# ------------------------------------------------------------------------------------------ without copies
#: external-data offsets on page boundaries: ORT maps such tensors from the file instead of copying them
PAGE = 4096
#: initializer types shape inference may need the values of (shape tensors, indices): kept by `keep_small`
_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL, onnx.TensorProto.INT16,
                onnx.TensorProto.UINT16)


def weightless_copy(model: onnx.ModelProto, keep_small: bool = False, small_bytes: int = 4096) -> onnx.ModelProto:
    """`model` without its initializers' data (each keeps its name, type and dims): what shape inference, MAC
    counts and graph facts need, at the cost of the graph, not of the weights. `keep_small`: initializers of an
    integer type or of at most `small_bytes` keep their data (shape inference with data propagation reads
    Reshape targets and the like)."""
    m = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(m, f, getattr(model, f))
    m.opset_import.extend(model.opset_import)
    m.metadata_props.extend(model.metadata_props)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name, g.doc_string = src.name, src.doc_string
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    g.quantization_annotation.extend(src.quantization_annotation)
    for t in src.initializer:
        nt = g.initializer.add()
        if keep_small and (t.data_type in _SHAPE_TYPES or t.ByteSize() <= small_bytes):
            nt.CopyFrom(t)
            continue
        nt.name, nt.data_type = t.name, t.data_type
        nt.dims.extend(t.dims)
    return m


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def write_external(model: onnx.ModelProto, path: str | os.PathLike, data_name: str | None = None,
                   min_bytes: int = 1024, data_path: str | os.PathLike | None = None, align: int = PAGE) -> Path:
    """`model` written as a graph file at `path` plus one external data file beside it (`data_name`, default
    `<name>.data`) holding every initializer of at least `min_bytes` at page-aligned offsets (ORT then maps
    them). Tensor by tensor: no serialised copy of the whole model is made, any size works (> 2 GB), and
    `model` is not modified (onnx.save_model(save_as_external_data=True) clears the caller's raw_data).
    Tensors already external (a model loaded without its weights) are refused. `data_path`: write the data
    there instead (e.g. a temp file renamed to `data_name` later); the graph still names `data_name`. `align`:
    the offsets' alignment (1: packed, the smallest file)."""
    path = Path(path)
    data_name = data_name or path.name + ".data"
    m = weightless_copy(model)
    off = 0
    with open(data_path or (path.parent / data_name), "wb") as f:
        for t, nt in zip(model.graph.initializer, m.graph.initializer):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name!r} is external data not loaded into memory")
            b = _raw_bytes(t)
            if len(b) < min_bytes:
                nt.CopyFrom(t)
                continue
            pad = (-off) % max(int(align), 1)
            if pad:
                f.write(b"\0" * pad)
                off += pad
            f.write(b)
            nt.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(off)), ("length", str(len(b)))):
                e = nt.external_data.add()
                e.key, e.value = k, v
            off += len(b)
            del b
    onnx.save_model(m, str(path))
    return path


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path` without its external weights (initializers stored inside the file are read)."""
    return onnx.load(str(path), load_external_data=False)


class ModelFiles:
    """The latest ModelProto written to a temporary graph + external-data file (:func:`write_external`), so that
    the checker, the verification session and the INT8 pass read one file instead of each making a serialised
    copy (and so that models over 2 GB work at all). Keyed by the object's identity and its node and initializer
    counts; `close()` (or a new model) removes the file."""

    def __init__(self, prefix: str = "onnxcompress-m-"):
        self.prefix = prefix
        self.key = None
        self.dir: str | None = None
        self.path: Path | None = None
        self._model = None    # the keyed object stays referenced so that its id cannot be reused meanwhile

    def file_for(self, model: onnx.ModelProto) -> Path:
        key = (id(model), len(model.graph.node), len(model.graph.initializer))
        if key == self.key and self._model is model and self.path is not None and self.path.exists():
            return self.path
        self.close()
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        self.path = write_external(model, Path(self.dir) / "m.onnx")
        self.key, self._model = key, model
        return self.path

    def holds(self, model: onnx.ModelProto) -> Path | None:
        """The file of `model` when it is the one written last (None otherwise)."""
        ok = self._model is model and self.path is not None and self.path.exists()
        return self.path if ok else None

    def take(self) -> tuple[str | None, Path | None]:
        """Hand the current file over to the caller: (its folder, its path); the caller removes the folder. The
        next `file_for` then writes a new file instead of replacing this one."""
        out = (self.dir, self.path)
        self.key = self.dir = self.path = self._model = None
        return out

    def forget_model(self) -> None:
        """Keep the file, drop the reference to the ModelProto (its memory can go; the file stays valid)."""
        self._model = None
        self.key = None

    def close(self) -> None:
        if self.dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
        self.key = self.dir = self.path = self._model = None

    def __enter__(self) -> "ModelFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
