"""ConvertFP16: float16 weights and compute, float32 model inputs/outputs. Halves the file; meant for GPU
providers (ORT CPU runs it no faster than FP32)."""
from __future__ import annotations

import onnx

from ..errors import UserError
from ..ir.counts import has_quantized_ops
from ..ir.surgery import export_graph, import_graph
from .base import Pass, PassContext, PassResult


def _toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    return export_graph(import_graph(model), model)


class ConvertFP16(Pass):
    """Float16 weights and compute, float32 model inputs/outputs by default. Halves the file; on ORT CPU
    it is not faster (measured 1.0–1.36× slower than FP32): it is meant for GPU providers."""
    name = "ConvertFP16"

    def __init__(self, keep_io_types: bool = True):
        self.keep_io_types = keep_io_types

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
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
