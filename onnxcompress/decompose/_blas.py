"""BLAS thread control for the numerics."""
from __future__ import annotations

import contextlib

_CONTROLLER = None


def one_blas_thread():
    """A context limiting BLAS to one thread (no-op without threadpoolctl).

    OpenBLAS threads make mid-size eigh/SVD/GEMM calls 10-40x *slower* as soon as another process competes
    for the cores (measured on 2 busy cores: 128x128 eigh 6 ms with 1 thread vs 240 ms with 2;
    256x256x3x3 Tucker2 0.4 s vs 6 s)."""
    global _CONTROLLER
    try:
        if _CONTROLLER is None:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER = ThreadpoolController()
        return _CONTROLLER.limit(limits=1, user_api="blas")
    except Exception:
        return contextlib.nullcontext()
