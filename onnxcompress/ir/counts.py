"""Model-level counts: parameters, MACs, bytes on disk (external data included), quantized ops."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .shapes import infer_value_shapes


QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
             "QLinearMatMul", "DynamicQuantizeLinear", "MatMulNBits"}


def model_params(model: onnx.ModelProto) -> int:
    """Number of float weight parameters held by initializers and Constant nodes (main graph)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                           onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            if n > 1:  # scalars (scales, zero points, eps) are not parameters
                total += n
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    n = int(np.prod(a.t.dims)) if len(a.t.dims) else 1
                    if n > 1:
                        total += n
    return total


def model_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """MACs of Conv, ConvInteger/QLinearConv, Gemm and MatMul nodes at the given input shapes."""
    vshapes = infer_value_shapes(model, shapes)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consts = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    # DequantizeLinear of a constant weight keeps its shape
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            consts[n.output[0]] = inits[n.input[0]]

    def shape(name):
        return vshapes.get(name) or inits.get(name) or consts.get(name)

    total = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            wi = 3 if n.op_type == "QLinearConv" else 1
            ws, os_ = shape(n.input[wi]), shape(n.output[0])
            if ws and os_:
                total += int(np.prod(ws)) * int(np.prod(os_[2:]))
        elif n.op_type == "MatMulNBits":       # K and N are attributes; weights packed
            o = shape(n.output[0])
            if o:
                total += int(np.prod(o)) * int(_attr(n, "K", 0))
        elif n.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            a, o = shape(n.input[0]), shape(n.output[0])
            if a and o:
                k = a[-1] if not (n.op_type == "Gemm" and _attr(n, "transA", 0)) else a[0]
                total += int(np.prod(o)) * int(k)
    return total


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, tensor data included (external-data tensors not loaded count their `length`)."""
    try:
        n = model.ByteSize()
    except Exception:
        return -1
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n += int(next((e.value for e in t.external_data if e.key == "length"), 0) or 0)
    return n


def has_quantized_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})


def tensor_to_numpy(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)
