"""Where onnxcompress keeps what it measures and exports: $ONNXCOMPRESS_CACHE, else ~/.cache/onnxcompress."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXCOMPRESS_CACHE") or Path.home() / ".cache" / "onnxcompress").expanduser()
