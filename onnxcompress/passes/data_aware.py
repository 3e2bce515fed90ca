"""Data-aware factorization hooks of the decomposition passes (ALGORITHMS.md §4, §6): input statistics
captured through ONNX Runtime (ort.capture, streamed, memory-bounded), Σ-Tucker2 for k×k convs (the Tucker2
pass's factorizer) and whitened SVD for 1×1 convs / Gemm / MatMul (the SVD pass's Σ provider). Each batch is
folded into float64 accumulators (decompose.stats: im2col second moments for convs, spatially subsampled;
plain row moments for Gemm/MatMul, rows subsampled) and dropped. The refit of each chain's last factor is its
own pass (passes/refit.py)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from ..decompose._blas import one_blas_thread
from ..decompose.stats import ConvInputStats, RowStats, rows_channels, rows_last, rows_second_last
from ..ort.capture import capture

log = logging.getLogger(__name__)

FeedsFactory = Callable[[], Iterable[dict]]

#: default Σ-Tucker2 solver settings (measured: same error as 20 sweeps / 10 CG steps, 8× faster)
ALS_ITER, ALS_CG = 2, 5



# ------------------------------------------------------------------------------------------ context
@dataclass
class DataAware:
    """Shared state of a data-aware run: the calibration feeds, sampling bounds, and — once the first
    data-aware pass ran — the model it saw (the reference for the output refit)."""
    feeds: FeedsFactory
    shapes: dict[str, tuple[int, ...]] | None = None
    method: str = "als"              # Σ-Tucker2: als | kron
    n_samples: int | None = None     # calibration samples (sizes the per-batch subsampling)
    batch_size: int = 16
    max_rows: int = 16384            # rows (patches) kept per layer over the whole data, about
    ridge: float = 1e-6              # Σ + ridge·tr(Σ)/D·I (shrinks Σ towards the plain objective)
    seed: int = 0
    progress: Callable[[str], None] | None = None
    reference: onnx.ModelProto | None = None
    facts: dict = field(default_factory=dict)

    def rows_per_batch(self, dim: int) -> int:
        """Positions kept per batch: about max(max_rows, 4·dim) over all batches."""
        n_batches = max(1, math.ceil((self.n_samples or 64) / max(self.batch_size, 1)))
        return max(256, math.ceil(max(self.max_rows, 4 * dim) / n_batches))

    def remember(self, model: onnx.ModelProto) -> None:
        if self.reference is None:
            self.reference = model


class SVDStatistics:
    """`sigma_provider` of the SVD pass: Σ = E[x xᵀ] of each layer's input vectors."""

    def __init__(self, ctx: DataAware):
        self.ctx = ctx
        self.acc: dict[str, object] = {}

    def prepare(self, model: onnx.ModelProto, infos) -> None:
        self.ctx.remember(model)
        req: dict[str, list] = {}
        for info in infos:
            a = self._accumulator(info)
            if a is not None:
                self.acc[info.name] = a
                req.setdefault(info.x, []).append(a)
        if req:
            self.ctx.facts["svd_capture"] = capture(model, req, self.ctx.feeds, self.ctx.shapes, label="data-aware: capturing",
                                                    progress=self.ctx.progress)

    def _accumulator(self, info):
        rows = self.ctx.rows_per_batch(info.S)
        seed = self.ctx.seed + info.index
        if info.kind == "conv":
            ci = info.conv
            if len(ci.kernel) != 2:
                return RowStats(rows_channels, rows, seed) if not any(p for p in ci.pads) and \
                    all(s == 1 for s in ci.strides) else None
            return ConvInputStats(1, 1, ci.strides, ci.pads, (1, 1), max_positions=rows, seed=seed)
        if info.kind == "gemm":
            return RowStats(rows_last if not info.attrs.get("transA") else (lambda a: a.T), rows, seed)
        return RowStats(rows_last if info.side == "right" else rows_second_last, rows, seed)

    def __call__(self, info):
        a = self.acc.pop(info.name, None)
        if a is None or a.count == 0:
            return None
        sig = a.sigma
        if self.ctx.ridge > 1e-6:
            sig[np.diag_indices(sig.shape[0])] += (self.ctx.ridge - 1e-6) * float(np.trace(sig)) / sig.shape[0]
        return sig


class SigmaTucker2:
    """Data-aware factorizer hook of the Tucker2 pass: Σ-Tucker2 (`als`: Tucker2-ALS-Σ with the Kronecker
    initialiser, 2 sweeps, ≤ 5 CG steps; `kron`: Kronecker-whitened HOOI) from the im2col second moment
    of each conv's input, captured on `prepare`. Returns None (plain HOOI) for convs it has no Σ for."""

    def __init__(self, ctx: DataAware):
        self.ctx = ctx
        self.acc: dict[str, ConvInputStats] = {}
        self.seconds = 0.0

    def prepare(self, model: onnx.ModelProto, infos) -> None:
        self.ctx.remember(model)
        req: dict[str, list] = {}
        g_inputs = {}
        from ..ir.surgery import import_graph
        g = import_graph(model)
        for n in g.nodes:
            if n.op == "Conv":
                g_inputs[n.name] = n.inputs[0].name
        for info in infos:
            if len(info.kernel) != 2 or info.name not in g_inputs:
                continue
            D = info.S * int(np.prod(info.kernel))
            a = ConvInputStats(info.kernel[0], info.kernel[1], info.strides, info.pads, info.dilations,
                               max_positions=self.ctx.rows_per_batch(D), seed=self.ctx.seed + info.index)
            self.acc[info.name] = a
            req.setdefault(g_inputs[info.name], []).append(a)
        if req:
            self.ctx.facts["tucker2_capture"] = capture(model, req, self.ctx.feeds, self.ctx.shapes, label="data-aware: capturing",
                                                        progress=self.ctx.progress)

    def __call__(self, info, r3: int, r4: int):
        from ..decompose.sigma import tucker2_kron, tucker2_sigma_als

        a = self.acc.pop(info.name, None)
        if a is None or a.count == 0:
            return None
        t0 = time.perf_counter()
        sigma = a.sigma
        del a
        with one_blas_thread():
            if self.ctx.method == "kron":
                res = tucker2_kron(info.weight, r3, r4, sigma, n_iter_max=5)
            else:
                res = tucker2_sigma_als(info.weight, r3, r4, sigma, n_iter_max=ALS_ITER, cg_maxiter=ALS_CG,
                                        init_hooi_iter=5)
        self.seconds += time.perf_counter() - t0
        res.info = {**(res.info or {}), "data_aware": f"sigma-tucker2 ({self.ctx.method})",
                    "output_rel_error": res.output_rel_error}
        return res


# ------------------------------------------------------------------------------------------ refit


