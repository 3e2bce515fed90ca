"""Constant folding before any pass looks at the graph: sub-graphs whose every input is a constant become
initializers, so that a conv's weight or bias built at run time from constants is seen as a constant.

Why: ``torch.onnx.export(..., dynamo=True, optimize=False)`` builds every conv bias as
``Expand(CastLike(Constant 0, input), Expand(Shape(weight), [1]))`` and keeps BatchNormalization; nothing is
a constant until that is evaluated, so every conv is skipped as "dynamic bias" and no BatchNormalization
folds. The legacy exporter routes shared weights through Identity nodes.

Engine: the onnxscript optimizer's constant folder (``onnxscript.optimizer.fold_constants``: what the torch
exporter itself runs with ``optimize=True``, minus its fusion rewrites). Only folding: no Conv+BN/Conv+Add
fusion, no function inlining, node names kept; the folded values are lifted to initializers (ORT's INT8
quantizer only quantizes initializer biases). Size limits are onnxscript's defaults: nodes with an input of
more than 8192 elements are not folded (weights stay as they are; no copy of a large tensor is made), and
no folded tensor over 512×512 elements is written.

ONNX Runtime's offline basic optimisation (``SessionOptions.optimized_model_filepath`` at
``ORT_ENABLE_BASIC``) was compared and rejected: on the same exports it needs two rounds (it inlines
``CastLike`` into ``Cast`` after its folding ran), it inlines ``HardSwish`` into ``HardSigmoid``+``Mul``
with empty node names, and it fuses Conv+BatchNormalization/Add/Mul itself (unverified, unreported).

Without onnxscript installed the model is returned unchanged, with a note saying what was not folded.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

from .base import Pass, PassContext, PassResult

ENGINE = "onnxscript.optimizer.fold_constants"
#: ops onnxscript may fold from static shapes even when an input is not a constant
_SHAPE_OPS = {"Shape", "Size", "CastLike", "Identity"}


@dataclass
class FoldSummary:
    """What :func:`fold_constants` did."""
    modified: bool = False
    engine: str | None = None                 # "onnxscript <version>", None when nothing ran
    nodes_before: int = 0
    nodes_after: int = 0
    removed: dict[str, int] = field(default_factory=dict)   # op type -> nodes folded away
    foldable: int = 0                         # nodes with only constant inputs before folding
    note: str | None = None                   # why nothing ran / what failed

    def line(self) -> str:
        if self.note:
            return f"constant folding: {self.note}"
        if not self.modified:
            return "constant folding: nothing to fold"
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.removed.items(), key=lambda kv: (-kv[1], kv[0])))
        return (f"constant folding ({self.engine}): {self.nodes_before} -> {self.nodes_after} nodes"
                + (f" (removed {ops})" if ops else ""))

    def to_dict(self) -> dict:
        return {"modified": self.modified, "engine": self.engine, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "removed": dict(self.removed), "foldable": self.foldable,
                "note": self.note}


def foldable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes (not Constant) whose every input is a constant (initializer or Constant output), plus
    ``CastLike`` whose value is a constant; Identity is not counted (see :func:`_should_fold`)."""
    graph_inputs = {i.name for i in model.graph.input}
    const = {t.name for t in model.graph.initializer if t.name not in graph_inputs}
    out = []
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            const.update(n.output)
            continue
        if n.op_type == "Identity" or n.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                  for a in n.attribute):
            continue
        ins = [i for i in n.input if i]
        ok = (ins and all(i in const for i in ins)) or (n.op_type == "CastLike" and ins and ins[0] in const)
        if ok:
            out.append(n)
            const.update(n.output)
    return out


def _should_fold(node) -> bool | None:
    """onnxscript's default rules, except Identity: a weight behind Identity is already read through it
    (graph.constant_value), and folding it would un-share a tensor the exporter de-duplicated (the legacy
    exporter routes equal biases through Identity)."""
    return False if node.op_type == "Identity" else None


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldSummary]:
    """Fold the constant sub-graphs of `model`. Returns the folded model (a new ModelProto; `model` is left
    untouched) and a summary; when nothing was folded the same `model` object comes back."""
    s = FoldSummary(nodes_before=len(model.graph.node), nodes_after=len(model.graph.node))
    s.foldable = len(foldable_nodes(model))
    if not s.foldable and not any(n.op_type in _SHAPE_OPS for n in model.graph.node):
        return model, s   # nothing onnxscript could fold either: skip the round trip through its IR
    try:
        import onnxscript
        from onnxscript import ir
        from onnxscript.optimizer import fold_constants as fold_ir   # in place on an ir.Model
    except Exception:   # noqa: BLE001 - not installed, or an incompatible version
        if s.foldable:
            s.note = (f"{s.foldable} node(s) computing constants left unfolded: onnxscript is not installed "
                      f"(pip install onnxscript)")
        return model, s
    s.engine = f"onnxscript {getattr(onnxscript, '__version__', '?')}"
    try:
        m = ir.serde.deserialize_model(model)
        res = fold_ir(m, should_fold=_should_fold)
        if not res.modified:
            return model, s
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(m)
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(m)
        out = ir.serde.serialize_model(m)
    except Exception as e:   # noqa: BLE001 - folding is an optimisation; never block the run on it
        s.note = f"onnxscript failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}); " \
                 f"model left unfolded"
        return model, s
    before = Counter(n.op_type for n in model.graph.node)
    after = Counter(n.op_type for n in out.graph.node)
    s.removed = {k: v for k, v in (before - after).items() if v}
    s.nodes_after = len(out.graph.node)
    s.modified = True
    return out, s


class FoldConstants(Pass):
    """The folding as a lossless pass (first in the PassManager; verified like every other pass)."""
    name = "FoldConstants"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        out, s = fold_constants(model)
        return PassResult(model=out, modified=s.modified, lossless=True, info={"fold_constants": s.to_dict(),
                                                                               "fold_constants_line": s.line()})
