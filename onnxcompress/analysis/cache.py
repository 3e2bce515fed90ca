"""The sensitivity sweep's disk cache: one JSON file per finished task, reference outputs, memoized
factorizations; keys cover the model, the data, the settings and the code (every module of the package)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import onnx


def sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def code_fingerprint() -> str:
    """Versions and the source of the whole package: any change to the code that produces a measurement
    (the factorization, a pass, the quantization, this module — wherever it lives) invalidates cached results
    and cached factors. Every .py file under the package is hashed with its relative path, so moving or
    renaming a module changes the key as well; an unreadable source file is an error, never skipped."""
    import onnxruntime

    from .._version import __version__
    here = Path(__file__).resolve().parent.parent
    parts = [__version__.encode(), onnxruntime.__version__.encode(), onnx.__version__.encode()]
    files = sorted(here.rglob("*.py"))
    if not files:
        raise RuntimeError(f"no source files found under {here}: cannot fingerprint the code")
    for f in files:
        parts += [f.relative_to(here).as_posix().encode(), f.read_bytes()]
    return sha256(*parts)[:16]


class FactorCache:
    """Memoizes factorizations on disk (`root/factors`): the global curve and later runs reuse the factors of
    the one-layer tasks (same method, kernel and settings give the same factors). A pass calls
    `cache(method, array, params, compute)`; without a root it just computes."""

    def __init__(self, root: str | None, code: str):
        self.root = Path(root) / "factors" if root else None
        self.code = code

    def __call__(self, method: str, array, params, compute):
        if self.root is None:
            return compute()
        a = np.ascontiguousarray(array)
        key = sha256(a.tobytes(), repr((method, a.shape, str(a.dtype), params, self.code)).encode())
        p = self.root / f"{key}.pkl"
        try:
            with open(p, "rb") as f:
                return pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            pass
        res = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(res, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, p)
        return res


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
