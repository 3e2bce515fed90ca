"""QuantizeInt8: INT8 QDQ through ONNX Runtime static quantization (ort.quantize), per-channel int8
weights, activations in the provider's fast layout. Nodes that earlier passes asked to keep in float (CP chains
with a high cancellation index) or in 16 bits arrive through the pass context's hand-offs."""
from __future__ import annotations

from typing import Callable

import onnx

from ..ort.quantize import Int8Format, check_quantizable, quantize_qdq, quantized_summary
from .base import LayerRecord, Pass, PassContext, PassResult


class QuantizeInt8(Pass):
    name = "QuantizeInt8"

    def __init__(self, reader_factory: Callable[[], object], fmt: Int8Format,
                 exclude_globs: list[str] | None = None, calibration_label: str = "",
                 include_globs: list[str] | None = None):
        self.reader_factory = reader_factory
        self.fmt = fmt
        self.exclude_globs = list(exclude_globs or [])
        self.include_globs = None if include_globs is None else list(include_globs)
        self.calibration_label = calibration_label

    #: the PassManager may hand this pass the path of a file holding its input model (graph + external data)
    #: instead of the ModelProto, so that no float model stays in memory while ORT quantizes its own copy
    accepts_file = True

    def run(self, model: onnx.ModelProto | str, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        check_quantizable(model, "INT8")
        from ..ir.names import exact_globs

        keep_float = exact_globs(ctx.handoff.get("float_nodes", []))
        int16 = list(ctx.handoff.get("int16_tensors", []))
        out, facts = quantize_qdq(model, self.reader_factory(), self.fmt,
                                  exclude_globs=self.exclude_globs + keep_float, int16_tensors=int16,
                                  include_globs=self.include_globs,
                                  progress=ctx.progress)
        summary = quantized_summary(out)
        records = [LayerRecord(name=n, op=op, method="int8") for n, op in summary["quantized_nodes"]]
        info = {"int8": {**self.fmt.to_dict(), **({"opset_upgraded_to": 13} if facts["opset_upgraded_to"] else {}),
                         "calibration": self.calibration_label},
                "quantized_ops": summary["quantized_ops"], "float_ops_left": summary["float_ops_left"],
                "quantized_nodes": [n for n, _ in summary["quantized_nodes"]],
                "excluded": facts["excluded"]}
        return PassResult(model=out, modified=True, layers=records, lossless=False, info=info)
