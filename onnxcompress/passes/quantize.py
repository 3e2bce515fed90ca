"""Quantization passes: INT8 QDQ through ONNX Runtime static quantization, and FP16 conversion."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from ..errors import UserError
from ..graph import has_quantized_ops
from .base import LayerRecord, Pass, PassResult

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


class QuantizeInt8(Pass):
    name = "QuantizeInt8"

    def __init__(self, reader_factory: Callable[[], object], fmt: Int8Format,
                 exclude_globs: list[str] | None = None, calibration_label: str = ""):
        self.reader_factory = reader_factory
        self.fmt = fmt
        self.exclude_globs = list(exclude_globs or [])
        self.calibration_label = calibration_label
        #: tensors to quantize with 16-bit QDQ instead of 8-bit (e.g. CP intermediates, passes/cp.py);
        #: ORT bumps the model to opset 21 for them
        self.int16_tensors: list[str] = []

    def run(self, model: onnx.ModelProto, progress=None) -> PassResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        q = has_quantized_ops(model)
        if q:
            raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing to re-quantize; "
                            f"use --quantize none")
        bad = _nonfinite_weights(model)
        if bad:
            raise UserError(f"weight {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} holds "
                            f"NaN or Inf: cannot compute INT8 scales; fix the model or use --quantize none")
        qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        model, upgraded = _at_least_opset(model, 13)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-q-") as td:
            src, pre, dst = Path(td) / "in.onnx", Path(td) / "pre.onnx", Path(td) / "out.onnx"
            big = model.ByteSize() > 2**31 - 1000
            onnx.save_model(model, src, save_as_external_data=big)
            if progress:
                progress("INT8: ORT quantization pre-processing")
            # ONNX shape inference is enough for CNN graphs, and ORT's symbolic shape inference costs 4x the
            # time and 2x the memory (ResNet-50 here: 6.6 s / 604 MB vs 24.9 s / 1203 MB): use it only as a
            # fallback
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=big)
            except Exception as e:
                log.info("quant_pre_process without symbolic shapes failed (%s); retrying with them", e)
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False, save_as_external_data=big)
            excluded = _matching_nodes(onnx.load(str(pre), load_external_data=False), self.exclude_globs)
            if progress:
                progress(f"INT8: calibrating ({self.calibration_label})")
            extra = {"ActivationSymmetric": self.fmt.symmetric_activations, "WeightSymmetric": True}
            if self.int16_tensors:
                q16 = QuantType.QUInt16 if self.fmt.activations == "uint8" else QuantType.QInt16
                extra["TensorQuantOverrides"] = {t: [{"quant_type": q16}] for t in self.int16_tensors}
            quantize_static(str(pre), str(dst), self.reader_factory(), quant_format=QuantFormat.QDQ,
                            per_channel=self.fmt.per_channel, activation_type=qt[self.fmt.activations],
                            weight_type=qt[self.fmt.weights], calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=excluded or None, use_external_data_format=big,
                            extra_options=extra)
            out = onnx.load(str(dst))
        quantized = _quantized_nodes(out)
        records = [LayerRecord(name=n, op=op, method="int8") for n, op in quantized]
        info = {"int8": {**self.fmt.to_dict(), **({"opset_upgraded_to": 13} if upgraded else {})}, "quantized_ops": _count_ops(quantized),
                "float_ops_left": _float_compute_ops(out), "excluded": excluded}
        return PassResult(model=out, modified=True, layers=records, lossless=False, info=info)


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


def _nonfinite_weights(model: onnx.ModelProto) -> list[str]:
    import numpy as np
    from onnx import numpy_helper

    out = []
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.all(np.isfinite(numpy_helper.to_array(t))):
                out.append(t.name)
    return out


def _matching_nodes(model: onnx.ModelProto, globs: list[str]) -> list[str]:
    """Nodes named by a glob, or rewritten from a layer named by it (`layer/t2_in` for `layer`)."""
    import fnmatch

    out = []
    for n in model.graph.node:
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


def _toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    from ._gs import export_graph, import_graph

    return export_graph(import_graph(model), model)


class ConvertFP16(Pass):
    """Float16 weights and compute, float32 model inputs/outputs by default. Halves the file; on ORT CPU
    it is not faster (measured 1.0–1.36× slower than FP32): it is meant for GPU providers."""
    name = "ConvertFP16"

    def __init__(self, keep_io_types: bool = True):
        self.keep_io_types = keep_io_types

    def run(self, model: onnx.ModelProto, progress=None) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        q = has_quantized_ops(model)
        if q:
            raise UserError(f"model is already quantized (contains {', '.join(q)}): refusing FP16 conversion")
        m = onnx.ModelProto()
        m.CopyFrom(model)
        out = convert_float_to_float16(m, keep_io_types=self.keep_io_types, disable_shape_infer=False)
        out = _toposorted(out)  # the converter appends its I/O Casts after the nodes that read them
        info = {"fp16": {"keep_io_types": self.keep_io_types,
                         "note": "FP16 halves the file; ORT CPU runs it no faster than FP32 (measured "
                                 "1.0-1.36x slower): use it for GPU providers"}}
        return PassResult(model=out, modified=True, layers=[], lossless=False, info=info)
