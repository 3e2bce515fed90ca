"""QAF pass: put every factorized chain's weights on the integer grid they will be stored on (decompose/qaf.py,
Cherniuk et al. 2023: ADMM per factor, initialised from the chain the decomposition pass wrote).

Runs on the *final* graph of the decomposition passes — after CP balancing, data-free and data-driven
equalisation, the κ fallback and any refit — and right before the quantization pass: a later diagonal rescaling
of a chain's input channels would move the weights off the grid again (output-channel rescaling would not).

Chains are found by the node names the passes give them: ``{layer}/cp_in, cp_v, cp_h, cp_out`` (CP4),
``{layer}/cp_in, cp_dw, cp_out`` (CP3), ``{layer}/t2_in, t2_core, t2_out`` (Tucker2, also the CP → Tucker2
fallback), ``{layer}/svd_in, svd_out`` (SVD of 1×1 convs; Gemm/MatMul chains are left alone). The fit target
per layer is the original kernel, read by layer name from ``reference`` (the model the decomposition passes
started from), else — ``target="chain"``, or a layer the reference does not hold — the chain's own float
composition (right for data-aware chains, whose float chain is deliberately not the weight-space best).

INT8 (``grid=INT8``): the fitted weights are fixed points of ONNX Runtime's per-channel symmetric max-abs rule,
so the INT8 pass (quantize_static) stores exactly the fitted integers; nothing else is handed over.
INT4 (``grid=INT4``): the result's hand-off ``qaf_codes`` holds (weight name, bits, integer codes, scales) per
weight for the INT4 pass (passes/int4.py), which stores them as they are. Chains the INT8/INT4 pass will keep
in float — the CP pass's keep-float fallback (hand-off ``float_nodes``) and ``exclude_globs`` — stay as they are.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..decompose.qaf import INT4, INT8, Grid, _mats, compose, qaf_chain
from .base import LayerRecord, Pass, PassContext, PassResult

CHAINS = {"cp4": ("cp_in", "cp_v", "cp_h", "cp_out"), "cp3": ("cp_in", "cp_dw", "cp_out"),
          "tucker2": ("t2_in", "t2_core", "t2_out"), "svd": ("svd_in", "svd_out")}
GRIDS = {"int8": INT8, "int4": INT4}
#: by default a chain is fitted only where round-to-nearest's weight error exceeds the float chain's by this fraction
MIN_HEADROOM = 0.01


def find_chains(model: onnx.ModelProto) -> list[tuple[str, str, list[str], list[str]]]:
    """(layer, kind, weight initializer names, node names) of every factorized Conv chain in the graph."""
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    inits = {t.name for t in model.graph.initializer}
    out = []
    for name in convs:
        for kind, sfx in CHAINS.items():
            if not name.endswith("/" + sfx[0]):
                continue
            layer = name[: -len(sfx[0]) - 1]
            names = [f"{layer}/{s}" for s in sfx]
            if all(n in convs for n in names) and all(len(convs[n].input) > 1 and convs[n].input[1] in inits
                                                      for n in names):
                out.append((layer, kind, [convs[n].input[1] for n in names], names))
    return out


class KernelFiles(Mapping):
    """{layer: kernel} of a model's Conv layers with constant weights, written once to .npy files in a temporary
    folder and read back memory-mapped: a QAF reference that does not keep the whole model alive through the
    passes after it (ResNet-50: the pipeline's input to the decomposition passes, 97 MB, held by the QAF pass
    until the run ended). The folder goes with the object."""

    def __init__(self, model: onnx.ModelProto):
        import shutil
        import tempfile
        import weakref

        self._dir = tempfile.mkdtemp(prefix="onnxcompress-qaf-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        inits = {t.name: t for t in model.graph.initializer}
        self._paths: dict[str, str] = {}
        for n in model.graph.node:
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and n.name not in self._paths:
                path = f"{self._dir}/{len(self._paths)}.npy"
                np.save(path, numpy_helper.to_array(inits[n.input[1]]))
                self._paths[n.name] = path

    def __getitem__(self, layer: str) -> np.ndarray:
        return np.load(self._paths[layer], mmap_mode="r")

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _kernel_of(reference, layer: str) -> np.ndarray | None:
    """The original kernel of `layer` from a ModelProto (the model the decomposition passes started from) or a
    mapping name -> kernel."""
    if reference is None:
        return None
    if not isinstance(reference, onnx.ModelProto):
        k = reference.get(layer)
        return None if k is None else np.asarray(k, dtype=np.float64)
    node = next((n for n in reference.graph.node if n.name == layer and n.op_type == "Conv"), None)
    if node is None or len(node.input) < 2:
        return None
    t = next((t for t in reference.graph.initializer if t.name == node.input[1]), None)
    return None if t is None else numpy_helper.to_array(t).astype(np.float64)


def _chain_k(ws: list[np.ndarray], kind: str) -> int:
    if kind == "cp4":
        return ws[1].shape[2] * ws[2].shape[3]
    return 1 if kind == "svd" else int(np.prod(ws[1].shape[2:]))


class QAFPass(Pass):
    """See the module doc. ``grid``: ``INT8`` (default) or ``INT4`` (decompose/qaf.py). ``reference``: the
    model the decomposition passes started from (or {layer: kernel}). ``target``: ``auto`` (the reference kernel
    where there is one, else the float chain), ``kernel`` (skip chains without a reference kernel), ``chain``.
    ``exclude_globs``: chains of layers (or with nodes) named by these globs stay as they are; ``layers``: only
    the chains of layers named by these globs (None: all). ``depthwise``: the grid of depthwise factors (CP's
    ``cp_v``/``cp_h``/``cp_dw``): ``"same"`` as the others, a Grid, or None (they stay float, as the weight-only
    INT4 pass keeps them)."""

    name = "QAF"

    def __init__(self, grid: Grid = INT8, reference: onnx.ModelProto | Mapping | None = None, *,
                 target: str = "auto", exclude_globs: Iterable[str] = (), layers: Iterable[str] | None = None,
                 depthwise: Grid | None | str = "same", sweeps: int = 4, max_iter: int = 50,
                 min_headroom: float = MIN_HEADROOM):
        if target not in ("auto", "kernel", "chain"):
            raise ValueError(f"unknown QAF target {target!r}")
        self.grid = grid
        self.layers = None if layers is None else list(layers)
        self.depthwise = grid if isinstance(depthwise, str) and depthwise == "same" else depthwise
        self.reference = reference
        self.target = target
        self.exclude_globs = list(exclude_globs)
        self.sweeps = sweeps
        self.max_iter = max_iter
        self.min_headroom = min_headroom   # decompose.qaf.qaf_chain: no ADMM where it cannot gain this much

    def _excluded(self, layer: str, nodes: list[str], float_nodes: set[str]) -> str | None:
        if float_nodes.intersection(nodes):
            return "chain kept in float (CP fallback)"
        if any(fnmatch.fnmatchcase(x, g) for g in self.exclude_globs for x in [layer] + nodes):
            return "layer kept out of this quantization"
        if self.layers is not None and not any(fnmatch.fnmatchcase(layer, g) for g in self.layers):
            return "not a layer of this grid"
        return None

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        float_nodes = set(ctx.handoff.get("float_nodes", []))
        m = model       # read only: copied once a chain's weights change (most INT8 runs change none)
        idx = {t.name: i for i, t in enumerate(m.graph.initializer)}
        depthwise = {n.name for n in m.graph.node if n.op_type == "Conv" and
                     next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
        records, codes, fitted = [], [], []
        for layer, kind, wnames, nodes in find_chains(m):
            rec = LayerRecord(name=layer, op="Conv", method=f"qaf-{kind}")
            records.append(rec)
            rec.skipped = self._excluded(layer, nodes, float_nodes)
            if rec.skipped:
                continue
            ws = [numpy_helper.to_array(m.graph.initializer[idx[w]]).astype(np.float64) for w in wnames]
            kern = None if self.target == "chain" else _kernel_of(self.reference, layer)
            if kern is None and self.target == "kernel":
                rec.skipped = "original kernel not found in the reference model"
                continue
            target = "kernel" if kern is not None else "chain"
            if kern is None:
                kern = compose(_mats(ws, kind), kind, _chain_k(ws, kind))
            ctx.note(f"QAF {layer} ({kind}, {self.grid.bits}-bit)")
            grids = [self.depthwise if n in depthwise and w.shape[1] == 1 else self.grid for n, w in zip(nodes, ws)]
            fit = qaf_chain(kern, ws, kind, grids, sweeps=self.sweeps, max_iter=self.max_iter,
                            min_headroom=self.min_headroom)
            if fit.skipped:    # left for the quantizer's own rounding, which is as good here
                rec.skipped = fit.skipped
                rec.extra.update({"weight_rel_error_before": fit.rel_error_rtn,
                                  "weight_rel_error_float": fit.rel_error_float})
                continue
            dt = onnx.helper.tensor_dtype_to_np_dtype(m.graph.initializer[idx[wnames[0]]].data_type)
            if m is model:
                m = onnx.ModelProto()
                m.CopyFrom(model)
            for wname, w, g, q, s in zip(wnames, fit.weights, grids, fit.codes, fit.scales):
                m.graph.initializer[idx[wname]].CopyFrom(numpy_helper.from_array(np.asarray(w, dtype=dt), wname))
                if g is not None:
                    codes.append((wname, g.bits, q, s))
            rec.weight_rel_error = fit.rel_error_qaf
            rec.new_nodes = list(nodes)
            fitted += list(nodes)
            rec.extra.update({"qaf": fit.to_dict(), "qaf_target": target, "bits": self.grid.bits,
                              "weight_rel_error_before": fit.rel_error_rtn,
                              "weight_rel_error_float": fit.rel_error_float})
        modified = any(r.skipped is None for r in records)
        return PassResult(model=m if modified else model, modified=modified, layers=records, lossless=False,
                          info={"qaf": {"bits": self.grid.bits, "target": self.target,
                                        "layers": sum(r.skipped is None for r in records)}},
                          # the fitted weights sit on their storage grid: later rewrites (Fuse) leave these nodes alone
                          handoff={**({"qaf_codes": codes} if codes else {}), **({"qaf_nodes": fitted} if fitted
                                                                                    else {})})


def qaf_summary(rec: LayerRecord) -> dict:
    """What the report shows of one QAF'd chain: weight error ‖K − K̂‖/‖K‖ before (round-to-nearest of the
    chain) and after QAF, of the float chain, and the ADMM iterations (total and per factor)."""
    if rec.skipped is not None:
        return {"skipped": rec.skipped, **{k: rec.extra[k] for k in ("weight_rel_error_before",
                                                                        "weight_rel_error_float") if k in rec.extra}}
    q = rec.extra["qaf"]
    return {"bits": rec.extra["bits"], "target": rec.extra["qaf_target"],
            "weight_rel_error_before": rec.extra["weight_rel_error_before"],
            "weight_rel_error_after": rec.weight_rel_error,
            "weight_rel_error_float": rec.extra["weight_rel_error_float"],
            "admm_iterations": q["admm_iterations"], "sweeps": q["sweeps"],
            "factors": [{k: f[k] for k in ("name", "iterations", "primal_residual", "dual_residual", "converged")}
                        for f in q["factors"]]}


def merge_records(records: list[LayerRecord], qaf_records: Iterable[LayerRecord]) -> None:
    """Merge each QAF record into the layer's own record (`extra["qaf"]`, see :func:`qaf_summary`)."""
    by_name = {r.name: r for r in records}
    for q in qaf_records:
        if q.name in by_name:
            by_name[q.name].extra["qaf"] = qaf_summary(q)


def codes_from_handoff(handoff: Mapping[str, list], bits: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{weight name: (codes, scales)} of the QAF hand-off at `bits`."""
    return {w: (q, s) for w, b, q, s in handoff.get("qaf_codes", []) if b == bits}
