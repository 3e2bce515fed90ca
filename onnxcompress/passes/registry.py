"""The pass registry: every factorization method and quantizer the pipeline can run, in the order their passes
run. A method is one module (its cost model, its pass, its `build`) plus one line here; the planner sees the
cost models, the pipeline builds the passes, `inspect` asks the cost models what each method can take."""
from __future__ import annotations

from . import cp, svd, tucker2
from .base import Method
from .fold_bn import FoldBatchNorm
from .fold_constants import FoldConstants
from .fuse import Fuse

#: factorization methods, in pass order (k×k methods before SVD: chains are named and never re-factorized)
METHODS: dict[str, Method] = {m.name: m for m in (tucker2.METHOD, cp.CP4, cp.CP3, svd.METHOD)}

#: lossless clean-up passes run before planning (the planner sees the model they produce): constant sub-graphs
#: first (today's exporters build conv biases and shapes from constants), then BatchNorm into the convs
CLEANUP = (FoldConstants, FoldBatchNorm)

#: lossless passes run after the decomposition passes, before quantization: linear neighbours the chains leave
#: behind merged (issue 16); each is built with (input shapes, globs of nodes to leave alone)
FUSION = (Fuse,)


def cost_models() -> dict:
    return {name: m.cost for name, m in METHODS.items()}


def quantizer(kind: str, **kw):
    """The quantization pass for `kind` ("int8" | "int4" | "fp16"); keyword arguments go to its constructor."""
    if kind == "int8":
        from .int8 import QuantizeInt8
        return QuantizeInt8(**kw)
    if kind == "int4":
        from .int4 import QuantizeInt4
        return QuantizeInt4(**kw)
    if kind == "fp16":
        from .fp16 import ConvertFP16
        return ConvertFP16(**kw)
    raise ValueError(f"unknown quantization {kind!r}")


def applicable(layer) -> dict[str, str | None]:
    """{method: None when it can rewrite `layer`, else why not}: the one source of truth for `inspect`."""
    return {name: m.cost.takes(layer) for name, m in METHODS.items()}
