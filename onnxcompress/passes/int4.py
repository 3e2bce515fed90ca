"""QuantizeInt4: INT4 weights (ort/int4.py) — a size format on ORT CPU.

* Conv weights: int4 per output channel (MSE-chosen scales on the full range [-8, 7]; the QAF pass's fitted
  codes, hand-off ``qaf_codes``, stored as they are). ``activations="float"`` (weight-only, the default: no
  calibration data needed) writes INT4 initializer → DequantizeLinear → float Conv (standard DequantizeLinear
  at opset ≥ 21, ORT's contrib one below); ``activations="uint8"|"int8"`` (w4a8: needs calibration data like
  INT8) runs ORT's static QDQ quantization with int4 overrides for the chosen Conv weights, every other weight
  int8 — which is also how a mixed int8/int4 model is built (``int4_layers``: only the layers these globs name
  get int4).
* MatMul/Gemm weights with a constant 2-D weight: ORT's ``MatMulNBits`` (4 bits, symmetric, block-wise along K,
  ``block_size``; ``accuracy_level`` 4 lets the CPU kernel use int8 activations internally).
* Depthwise convs (one input channel per group) stay as they are in weight-only mode and int8 in w4a8 mode
  (``keep_depthwise``): few weights, and 9 values per channel do not survive 16 levels.

Nodes that earlier passes asked to keep in float (hand-off ``float_nodes``) and the ``exclude_globs`` stay float.
The CP pass's ``int16_tensors`` hand-off is not applied (weight-only int4 keeps every activation float anyway).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

import onnx

from ..ir.names import exact_globs
from ..ort.int4 import (conv_weights_int4, depthwise_convs, int4_conv_weights, matmul_nbits, nbits_nodes,
                        opset_of, quantize_int4_static)
from ..ort.quantize import check_quantizable, quantized_summary
from .base import LayerRecord, Pass, PassContext, PassResult
from .qaf import codes_from_handoff

ACTIVATIONS = ("float", "uint8", "int8")
SIZE_NOTE = ("INT4 is a size format on ORT CPU: there is no int4 conv kernel (DequantizeLinear -> float Conv at "
             "every inference, slower than FP32) and MatMulNBits runs at about FP32 speed")


def _matches(name: str, globs: Sequence[str]) -> bool:
    """A node named by a glob, or rewritten from a layer named by it (`layer/t2_in` for `layer`)."""
    base = name.rsplit("/", 1)[0] if "/" in name else name
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(base, g) for g in globs)


def _linear_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes with a constant 2-D weight as second input (what MatMulNBits takes)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits and \
                len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT:
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            if n.op_type == "MatMul" or not trans_a:
                out.append(n.name)
    return out


class QuantizeInt4(Pass):
    name = "QuantizeInt4"

    def __init__(self, activations: str = "float", reader_factory: Callable[[], object] | None = None,
                 fmt=None, *, block_size: int = 32, accuracy_level: int | None = None,
                 exclude_globs: Sequence[str] = (), int4_layers: Sequence[str] | None = None,
                 keep_depthwise: bool = True, calibration_label: str = ""):
        if activations not in ACTIVATIONS:
            raise ValueError(f"int4 activations must be one of {ACTIVATIONS} (got {activations!r})")
        if activations != "float" and reader_factory is None:
            raise ValueError("int4 with int8 activations needs a calibration reader")
        self.activations = activations
        self.reader_factory = reader_factory
        self.fmt = fmt
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.exclude_globs = list(exclude_globs)
        self.int4_layers = None if int4_layers is None else list(int4_layers)
        self.keep_depthwise = keep_depthwise
        self.calibration_label = calibration_label

    def _scope(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[list[str], list[str], list[str]]:
        """(excluded nodes, Conv nodes to int4, MatMul/Gemm nodes to MatMulNBits)."""
        globs = self.exclude_globs + exact_globs(ctx.handoff.get("float_nodes", []))
        excluded = [n.name for n in model.graph.node if _matches(n.name, globs)]
        skip = set(excluded) | (set(depthwise_convs(model)) if self.keep_depthwise else set())
        def chosen(name: str) -> bool:
            return name not in skip and (self.int4_layers is None or _matches(name, self.int4_layers))

        convs = [n.name for n in model.graph.node if n.op_type == "Conv" and chosen(n.name)]
        linear = [n for n in _linear_nodes(model) if chosen(n)]
        return excluded, convs, linear

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        check_quantizable(model, "INT4")
        excluded, convs, linear = self._scope(model, ctx)
        codes = codes_from_handoff(ctx.handoff, 4)
        facts: dict = {}
        if self.activations == "float":
            ctx.note(f"INT4: {len(convs)} Conv weights (weight-only)")
            out = conv_weights_int4(model, codes=codes, nodes_to_include=convs)
        else:
            out, facts = quantize_int4_static(model, self.reader_factory(), activations=self.activations,
                                              codes=codes, int4_nodes=convs, nodes_to_exclude=excluded + linear,
                                              progress=ctx.progress)
        if linear:
            ctx.note(f"INT4: {len(linear)} MatMul/Gemm weights -> MatMulNBits (block {self.block_size})")
            out = matmul_nbits(out, block_size=self.block_size, accuracy_level=self.accuracy_level,
                               nodes_to_include=linear)
        int4_convs = int4_conv_weights(out)
        int4_nodes = sorted(int4_convs) + nbits_nodes(out)
        stored = {w for w in int4_convs.values()}
        qaf_stored = sum(1 for w in codes if f"{w}_int4" in stored or f"{w}_quantized" in stored)
        summary = quantized_summary(out) if self.activations != "float" else None
        info = {"int4": {"activations": self.activations, "conv_weights": "int4 per output channel (MSE scales, "
                         "full range [-8, 7])", "conv_dequantize_domain": "ai.onnx" if opset_of(out) >= 21
                         else "com.microsoft", "matmul": f"MatMulNBits 4-bit, block {self.block_size}",
                         "accuracy_level": self.accuracy_level, "depthwise": (
                             ("float" if self.activations == "float" else "int8") if self.keep_depthwise else "int4"),
                         "qaf_weights": qaf_stored, "calibration": self.calibration_label, "note": SIZE_NOTE,
                         **({"opset_upgraded_to": 13} if facts.get("opset_upgraded_to") else {}),
                         **({"int16_tensors_ignored": len(ctx.handoff["int16_tensors"])}
                            if ctx.handoff.get("int16_tensors") else {})},
                "int4_nodes": int4_nodes, "excluded": excluded}
        if summary is not None:
            info.update({"quantized_ops": summary["quantized_ops"], "float_ops_left": summary["float_ops_left"],
                         "quantized_nodes": [n for n, _ in summary["quantized_nodes"] if n not in int4_convs]})
        records = [LayerRecord(name=n, op="Conv" if n in int4_convs else "MatMul", method="int4") for n in int4_nodes]
        return PassResult(model=out, modified=bool(int4_nodes) or summary is not None, layers=records,
                          lossless=False, info=info)
