"""INT8 QDQ through ONNX Runtime static quantization — the one place the package calls ORT's quantizer.

`quantize_qdq` runs ORT's pre-processing (ONNX shape inference first; ORT's symbolic shape inference only as
the fallback: on ResNet-50 it costs 4x the time and 2x the memory, 6.6 s / 604 MB vs 24.9 s / 1203 MB), then
`quantize_static` in QDQ format with MinMax calibration, per-channel symmetric weights, optional node
inclusion/exclusion lists and 16-bit overrides for chosen tensors. The INT8 pass and the sensitivity sweeps
both go through it, so their models are quantized the same way."""
from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Format:
    activations: str   # "uint8" | "int8"
    weights: str       # "int8" | "uint8"
    per_channel: bool
    symmetric_activations: bool
    reason: str

    def to_dict(self) -> dict:
        return {"format": "QDQ", "activations": self.activations, "weights": self.weights,
                "per_channel": self.per_channel, "symmetric_activations": self.symmetric_activations,
                "reason": self.reason}


def int8_format_for(provider: str, activations: str | None = None, weights: str | None = None) -> Int8Format:
    """The fast INT8 layout for the target provider, unless the user overrides it.

    ORT CPU (x86): uint8 activations + int8 per-channel weights map to its fast QLinearConv/MatMulInteger
    kernels (~3.5× FP32 on ResNet-50 here); int8 activations leave many convs in float (~1.5×).
    CUDA/TensorRT: symmetric int8 activations and weights (what TensorRT consumes).
    """
    if provider in ("cuda", "tensorrt"):
        fmt = Int8Format("int8", "int8", True, True, "GPU providers (TensorRT) take symmetric int8 activations")
    else:
        fmt = Int8Format("uint8", "int8", True, False,
                         "ORT CPU: uint8 activations + int8 per-channel weights run as integer kernels")
    if activations or weights:
        fmt = Int8Format(activations or fmt.activations, weights or fmt.weights, fmt.per_channel,
                         (activations or fmt.activations) == "int8" and fmt.symmetric_activations,
                         "user override")
    return fmt


def _at_least_opset(model: onnx.ModelProto, version: int) -> tuple[onnx.ModelProto, bool]:
    """Per-channel QDQ needs DequantizeLinear's `axis` (opset 13): convert older models first."""
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if cur >= version:
        return model, False
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, version), True
    except Exception as e:
        raise UserError(f"INT8 QDQ needs opset >= {version} and converting this opset-{cur} model failed "
                        f"({str(e).splitlines()[0][:150] if str(e) else type(e).__name__})") from e


def nonfinite_weights(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """Float initializers holding NaN or Inf; a model file's weights are read one tensor at a time."""
    import numpy as np
    from onnx import numpy_helper

    base = None
    if isinstance(model, (str, os.PathLike)):
        from ..ir.modelio import load_graph

        base, model = str(Path(model).parent), load_graph(model)
    out = []
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.all(np.isfinite(numpy_helper.to_array(t, base_dir=base or ""))):
                out.append(t.name)
    return out


def check_quantizable(model: onnx.ModelProto | str | os.PathLike, what: str) -> None:
    """A one-line UserError when `model` (a ModelProto or a file) is already quantized or holds NaN/Inf
    weights, whose `what` (INT8, INT4) scales cannot be computed."""
    from ..ir.counts import has_quantized_ops
    from ..ir.modelio import load_graph

    q = has_quantized_ops(load_graph(model) if isinstance(model, (str, os.PathLike)) else model)
    if q:
        raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing to re-quantize; "
                        f"use --quantize none")
    bad = nonfinite_weights(model)
    if bad:
        raise UserError(f"weight {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} holds "
                        f"NaN or Inf: cannot compute {what} scales; fix the model or use --quantize none")


def _matching_nodes(nodes, globs: Sequence[str]) -> list[str]:
    """Nodes named by a glob, or rewritten from a layer named by it (`layer/t2_in` for `layer`)."""
    out = []
    for n in nodes:
        base = n.name.rsplit("/", 1)[0] if "/" in n.name else n.name
        if any(fnmatch.fnmatchcase(n.name, g) or fnmatch.fnmatchcase(base, g) for g in globs):
            out.append(n.name)
    return out


def _quantized_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Compute nodes whose data inputs all come from DequantizeLinear (they run as integer kernels)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    res = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data_inputs = [i for i in n.input if i and i not in inits]
        if data_inputs and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                               for i in data_inputs):
            res.append((n.name, n.op_type))
    return res


def _count_ops(nodes) -> dict[str, int]:
    c: dict[str, int] = {}
    for _, op in nodes:
        c[op] = c.get(op, 0) + 1
    return c


def _float_compute_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Conv/Gemm/MatMul/Add nodes left in float (not fed by DequantizeLinear on every data input)."""
    q = {n for n, _ in _quantized_nodes(model)}
    c: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "Add") and n.name not in q:
            c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


def quantize_qdq(model: onnx.ModelProto | str | os.PathLike, reader, fmt: Int8Format, *,
                 nodes_to_quantize: Sequence[str] | None = None, exclude_globs: Sequence[str] = (),
                 int16_tensors: Sequence[str] = (), include_globs: Sequence[str] | None = None,
                 progress=None) -> tuple[onnx.ModelProto, dict]:
    """`model` (a ModelProto, or the path of a model file: then its weights are never loaded into Python)
    quantized to INT8 QDQ (format `fmt`), calibrated (MinMax) on the batches of `reader` (an ORT
    CalibrationDataReader). `nodes_to_quantize`: only these nodes (names as in the model; all when None);
    `exclude_globs`: nodes named by these globs, or rewritten from a layer they name, stay float;
    `include_globs`: only the nodes they name (or rewritten from a layer they name) are quantized — every
    other node, elementwise ones included, stays float (mixed precision: a float layer's neighbours too);
    `int16_tensors`: activations quantized with 16-bit QDQ (ORT moves the model to opset 21 for them).
    Returns the quantized model and facts (opset upgrade, excluded nodes, calibrated tensors).

    From files, streamed: the model is written once as graph + external data (never serialised whole, the
    caller's ModelProto untouched); ORT's pre-processing runs from that file (:func:`pre_process`); the ranges
    come from :func:`..capture.minmax_ranges` (one session, running min/max, bit-identical to ORT's MinMax
    calibrator) and reach ORT's own QDQ quantizer through its calibration cache, with the per-channel weight
    scales computed vectorised (:func:`weight_scale_overrides`, bit-identical to ORT's per-channel loop)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from ..ir.modelio import load_graph
    from .capture import minmax_ranges, reader_batches

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="onnxcompress-q-") as td:
        src, upgraded = _source_file(model, Path(td))
        del model
        pre, dst, cache = Path(td) / "pre.onnx", Path(td) / "out.onnx", Path(td) / "ranges.json"
        if progress:
            progress("INT8: ORT quantization pre-processing")
        pre_process(src, pre)
        pre_nodes = load_graph(pre).graph.node
        excluded = _matching_nodes(pre_nodes, exclude_globs)
        if include_globs is not None:
            nodes_to_quantize = [n for n in _matching_nodes(pre_nodes, include_globs) if n not in excluded]
        if nodes_to_quantize is not None:
            have = {n.name for n in pre_nodes}
            nodes_to_quantize = [n for n in nodes_to_quantize if n in have]
            if not nodes_to_quantize:
                raise RuntimeError("the nodes to quantize disappeared in quantization pre-processing")
        del pre_nodes
        if progress:
            progress("INT8: calibrating (streamed min/max)")
        ranges = minmax_ranges(pre, reader_batches(reader))
        save_tensors_data(ranges, cache)
        extra = {"ActivationSymmetric": fmt.symmetric_activations, "WeightSymmetric": True}
        overrides = {}
        if fmt.per_channel and fmt.weights == "int8":
            overrides = weight_scale_overrides(pre, skip_nodes=set(excluded), only_nodes=nodes_to_quantize)
        if int16_tensors:
            q16 = QuantType.QUInt16 if fmt.activations == "uint8" else QuantType.QInt16
            overrides.update({t: [{"quant_type": q16}] for t in int16_tensors})
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        if progress:
            progress("INT8: ORT QDQ quantizer")
        quantize_static(str(pre), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=fmt.per_channel,
                        activation_type=qt[fmt.activations], weight_type=qt[fmt.weights],
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
                        nodes_to_exclude=excluded or None, use_external_data_format=True, extra_options=extra)
        out = onnx.load(str(dst))
    return out, {"opset_upgraded_to": 13 if upgraded else None, "excluded": excluded,
                 "calibrated_tensors": len(ranges.data)}


def _source_file(model, folder: Path) -> tuple[Path, bool]:
    """The model as a file (graph + external data) at opset >= 13: a path is used as it is unless its opset is
    older (then it is loaded and converted); a ModelProto is written without being modified."""
    from ..ir.modelio import load_graph, write_external

    if isinstance(model, (str, os.PathLike)):
        if _opset(load_graph(model)) >= 13:
            return Path(model), False
        model = onnx.load(str(model))
    model, upgraded = _at_least_opset(model, 13)
    return write_external(model, folder / "in.onnx"), upgraded


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def pre_process(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ORT's ``quant_pre_process(src, dst, skip_symbolic_shape=True)`` done from files, without loading the
    weights into Python (ORT's own function loads the whole model while ORT optimises it: 2.0 s and +146 MB
    vs 0.2 s and +13 MB on ResNet-50): ORT_ENABLE_BASIC optimisation writing its weights to an external file,
    ONNX shape inference on the file, ORT's pre-process metadata. Opset <= 10 models, and models ONNX shape
    inference fails on, go through ORT's own function (the latter with symbolic shape inference)."""
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..ir.modelio import load_graph

    src, dst = Path(src), Path(dst)
    if _opset(load_graph(src)) <= 10:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, save_as_external_data=True)
        return dst
    opt, inferred = dst.with_name(dst.stem + ".opt.onnx"), dst.with_name(dst.stem + ".inferred.onnx")
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(opt)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        onnx.shape_inference.infer_shapes_path(str(opt), str(inferred))
        m = load_graph(inferred)
        add_pre_process_metadata(m)
        onnx.save_model(m, str(dst))
    except Exception as e:  # noqa: BLE001 - ONNX shape inference fails on some graphs
        log.info("pre-processing without symbolic shapes failed (%s); retrying with them", e)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False, save_as_external_data=True,
                          all_tensors_to_one_file=True)
    finally:
        opt.unlink(missing_ok=True)
        inferred.unlink(missing_ok=True)
    return dst


def weight_scale_overrides(model_path: str | os.PathLike, skip_nodes: set[str] = frozenset(),
                           only_nodes: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Per-channel scales of the float32 Conv weights of the model file at `model_path`, as ORT's QDQ quantizer
    computes them for symmetric int8 per-channel weights (``compute_data_quant_params`` per output channel:
    absmax over the channel with 0 included, scale = float64(2 absmax) / 254 stored as float32, 1.0 where
    that is below float32's tiny, zero point 0), computed with one vectorised reduction per weight and handed
    to ORT as ``TensorQuantOverrides`` ({"axis": 0, "scale", "zero_point"} per channel): ORT then skips its
    Python loop over the channels (35 k calls on ResNet-50). Weights read one at a time from their file;
    weights shared by several nodes, and nodes in `skip_nodes` or outside `only_nodes`, are left to ORT."""
    import numpy as np
    from onnx import numpy_helper

    from ..ir.modelio import load_graph

    model_path = Path(model_path)
    g = load_graph(model_path).graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    only = set(only_nodes) if only_nodes is not None else None
    tiny = float(np.finfo(np.float32).tiny)
    out: dict[str, list[dict]] = {}
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.name in skip_nodes or (only is not None and n.name not in only):
            continue
        t = inits.get(n.input[1])
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 3 or uses.get(t.name) != 1 \
                or t.name in out:
            continue
        w = numpy_helper.to_array(t, base_dir=str(model_path.parent))
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if w.size else np.zeros(w.shape[0], np.float32)
        a64 = absmax.astype(np.float64)
        s64 = (a64 - (-a64)) / (127.0 - (-127.0))
        scale = np.where(s64 < tiny, 1.0, s64).astype(np.float32)
        out[t.name] = [{"axis": 0, "scale": float(scale[0]), "zero_point": 0}] + \
            [{"scale": float(v), "zero_point": 0} for v in scale[1:]]
    return out


def quantized_summary(model: onnx.ModelProto) -> dict:
    """Which compute nodes run as integer kernels, and which Conv/Gemm/MatMul/Add stay float."""
    q = _quantized_nodes(model)
    return {"quantized_nodes": q, "quantized_ops": _count_ops(q), "float_ops_left": _float_compute_ops(model)}


def _activation_qparams(lo: float, hi: float, fmt: Int8Format) -> tuple[float, int, int, int]:
    """(scale, zero point, qmin, qmax) of an activation range as ORT's MinMax QDQ computes it."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if fmt.activations == "uint8" and not fmt.symmetric_activations:
        scale = (hi - lo) / 255.0 or 1.0
        return scale, int(round(-lo / scale)), 0, 255
    m = max(abs(lo), abs(hi))
    return (m / 127.0 or 1.0), 0, -127, 127


def fake_quant_weight(w, axis: int = 0):
    """Per-channel symmetric int8 quantize-dequantize of a weight along `axis` (the output channels)."""
    import numpy as np

    w = np.asarray(w)
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=red, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(w.dtype)


def simulate_int8(model: onnx.ModelProto, nodes: Sequence[str], ranges: dict[str, tuple[float, float]],
                  fmt: Int8Format) -> onnx.ModelProto:
    """`model` with only `nodes` in simulated INT8 (QDQ semantics of the INT8 pass): their constant weights
    quantized-dequantized per output channel, their activation inputs and outputs passed through
    QuantizeLinear → DequantizeLinear with the scales MinMax calibration gives for `ranges` (an integer kernel
    requantizes its output too). Float everywhere else: a cheap, calibration-free measurement of one layer's
    INT8 sensitivity."""
    import numpy as np
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    wanted = set(nodes)
    ordered, extra_inits = [], []

    def qdq(x: str, base: str, rng: tuple[float, float]) -> list:
        scale, zp, _, _ = _activation_qparams(*rng, fmt)
        zt = onnx.TensorProto.UINT8 if fmt.activations == "uint8" and not fmt.symmetric_activations \
            else onnx.TensorProto.INT8
        extra_inits.extend([numpy_helper.from_array(np.array(scale, np.float32), base + "_s"),
                            helper.make_tensor(base + "_z", zt, [], [zp])])
        return [helper.make_node("QuantizeLinear", [x, base + "_s", base + "_z"], [base + "_q"]),
                helper.make_node("DequantizeLinear", [base + "_q", base + "_s", base + "_z"], [base + "_dq"])]

    graph_outputs = {o.name for o in m.graph.output}
    for n in m.graph.node:
        new_nodes, after = [], []
        if n.name in wanted:
            for k, x in enumerate(n.input):
                if not x:
                    continue
                if x in inits:
                    w = numpy_helper.to_array(inits[x])
                    if w.ndim < 2 or not np.issubdtype(w.dtype, np.floating) or (n.op_type == "Conv" and k == 2):
                        continue
                    axis = 1 if n.op_type == "MatMul" and k == 1 else (
                        1 if n.op_type == "Gemm" and k == 1 and not any(a.name == "transB" and a.i for a in
                                                                        n.attribute) else 0)
                    name = f"{n.name}/{x}_fq"
                    extra_inits.append(numpy_helper.from_array(fake_quant_weight(w, axis), name))
                    n.input[k] = name
                elif x in ranges:
                    base = f"{n.name}/{x}_sim"
                    new_nodes += qdq(x, base, ranges[x])
                    n.input[k] = base + "_dq"
            y = n.output[0]
            if y in ranges and y not in graph_outputs:
                base = f"{n.name}/{y}_simout"
                n.output[0] = base + "_raw"
                after = qdq(base + "_raw", base, ranges[y])
                after[-1].output[0] = y
        keep = onnx.NodeProto()
        keep.CopyFrom(n)
        ordered += new_nodes + [keep] + after
    m.graph.initializer.extend(extra_inits)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    return m
