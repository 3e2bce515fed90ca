"""Tucker2 pass: Conv (group 1, kernel > 1×1) → 1×1 (S→R3) · k×k (R3→R4, original strides/pads/dilations)
· 1×1 (R4→T, carries the bias). Works for 1-D, 2-D and 3-D kernels."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..decompose.tucker2 import tucker2, tucker2_params
from ..errors import UserError
from ..graph import ConvInfo, conv_info, infer_value_shapes
from ._gs import export_graph, import_graph
from .base import LayerRecord, Pass, PassResult

#: returns (r3, r4) for a layer, or a string: the reason to leave it alone
RankPolicy = Callable[[ConvInfo], "tuple[int, int] | str"]


def kxk_problem(info: ConvInfo, method: str) -> str | None:
    """Why a k×k factorization (Tucker2, CP) cannot rewrite this conv (None when it can)."""
    if info.problem:
        return info.problem
    if info.group != 1:
        return "depthwise conv" if info.group == info.S == info.T else f"grouped conv (group={info.group})"
    if int(np.prod(info.kernel)) <= 1:
        return f"1x1 kernel (SVD, not {method})"
    if info.S <= 4:
        return f"too few input channels (S={info.S})"
    return None


def tucker2_problem(info: ConvInfo) -> str | None:
    """Why Tucker2 cannot rewrite this conv (None when it can)."""
    return kxk_problem(info, "Tucker2")


def tucker2_working_set(info: ConvInfo) -> int:
    """Bytes the HOOI of this kernel holds at once (float64): the kernel, two contracted copies, the two
    Gram matrices and their eigenvectors."""
    T, S, k = info.T, info.S, int(np.prod(info.kernel))
    return 8 * (3 * T * S * k + 2 * T * T + 2 * S * S)


def chain_macs(info: ConvInfo, r3: int, r4: int) -> int | None:
    if info.in_shape is None or info.out_shape is None:
        return None
    hw_in, hw_out = int(np.prod(info.in_shape[2:])), int(np.prod(info.out_shape[2:]))
    k = int(np.prod(info.kernel))
    return info.S * r3 * hw_in + r3 * r4 * k * hw_out + r4 * info.T * hw_out


class Tucker2Pass(Pass):
    name = "Tucker2"

    def __init__(self, ranks: RankPolicy, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 n_iter_max: int = 5, layer_filter: Callable[[ConvInfo], str | None] | None = None,
                 max_memory_mb: int | None = None, factorizer=None):
        self.ranks = ranks
        # data-aware hook (data_aware.SigmaTucker2): prepare(model, infos) captures statistics for the
        # layers the plan decomposes; factorizer(info, r3, r4) -> factors (core, U_T, U_S, rel_error,
        # ranks) or None for plain HOOI
        self.factorizer = factorizer
        self.input_shapes = input_shapes
        self.n_iter_max = n_iter_max
        self.layer_filter = layer_filter
        self.max_memory_mb = max_memory_mb

    def run(self, model: onnx.ModelProto, progress=None) -> PassResult:
        shapes = infer_value_shapes(model, self.input_shapes)
        g = import_graph(model)
        convs = [n for n in g.nodes if n.op == "Conv"]
        infos = [conv_info(node, idx, shapes) for idx, node in enumerate(convs)]
        if hasattr(self.ranks, "prepare"):   # planners that allocate a global budget see all layers first
            self.ranks.prepare(infos)
        if self.factorizer is not None and hasattr(self.factorizer, "prepare"):
            plan = getattr(self.ranks, "plan", None)
            self.factorizer.prepare(model, [i for i in infos if tucker2_problem(i) is None and (
                plan is None or not isinstance(plan.get(i.name, ()), str))])
        records, all_full = [], True
        for node, info in zip(convs, infos):
            rec = LayerRecord(name=node.name, op="Conv", method="tucker2", kernel_shape=list(info.weight_shape),
                              params_before=info.params, params_after=info.params,
                              macs_before=info.macs, macs_after=info.macs)
            records.append(rec)
            reason = tucker2_problem(info) or (self.layer_filter(info) if self.layer_filter else None)
            decision = self.ranks(info) if reason is None else reason
            if isinstance(decision, str):
                rec.skipped = decision
                continue
            r3, r4 = (int(decision[0]), int(decision[1]))
            k = int(np.prod(info.kernel))
            p_chain = tucker2_params(info.T, info.S, k, r3, r4) + (info.T if info.has_bias else 0)
            if p_chain >= info.params and not (r3 == info.S and r4 == info.T):
                rec.skipped = f"chain would not shrink (ranks {r3},{r4}: {p_chain} >= {info.params} params)"
                continue
            need = tucker2_working_set(info)
            if self.max_memory_mb is not None and need > self.max_memory_mb * 2**20:
                raise UserError(f"Tucker2 of layer {node.name} {list(info.weight_shape)} needs about "
                                f"{need / 2**20:.0f} MB, over the {self.max_memory_mb} MB cap "
                                f"(raise max_memory_mb, or exclude the layer)")
            if progress:
                progress(f"Tucker2 {node.name} {list(info.weight_shape)} -> ranks ({r3}, {r4})")
            res = self.factorizer(info, r3, r4) if self.factorizer is not None else None
            if res is None:
                res = tucker2(info.weight, r3, r4, n_iter_max=self.n_iter_max)
            elif getattr(res, "info", None):
                rec.extra.update(res.info)
            self._replace(g, node, info, res)
            all_full &= (r3 == info.S and r4 == info.T)
            rec.ranks = [r3, r4]
            rec.params_after = p_chain
            rec.macs_after = chain_macs(info, r3, r4)
            rec.weight_rel_error = res.rel_error
            rec.new_nodes = [f"{node.name}/t2_in", f"{node.name}/t2_core", f"{node.name}/t2_out"]
        modified = any(r.skipped is None for r in records)
        out = export_graph(g, model) if modified else model
        return PassResult(model=out, modified=modified, layers=records, lossless=modified and all_full)

    @staticmethod
    def _replace(g: gs.Graph, node: gs.Node, info: ConvInfo, res) -> None:
        dt = info.weight.dtype
        nd = len(info.kernel)
        ones = [1] * nd
        x, y = node.inputs[0], node.outputs[0]
        r3, r4 = res.ranks
        w1 = res.U_S.T.reshape((r3, info.S) + (1,) * nd).astype(dt)
        w2 = res.core.astype(dt)
        w3 = res.U_T.reshape((info.T, r4) + (1,) * nd).astype(dt)
        z1 = gs.Variable(f"{node.name}/t2_in_out", dtype=x.dtype)
        z2 = gs.Variable(f"{node.name}/t2_core_out", dtype=x.dtype)
        pw = {"kernel_shape": ones, "strides": ones, "pads": [0] * (2 * nd), "dilations": ones, "group": 1}
        n1 = gs.Node("Conv", f"{node.name}/t2_in", attrs=dict(pw),
                     inputs=[x, gs.Constant(f"{node.name}/t2_in_W", w1)], outputs=[z1])
        n2 = gs.Node("Conv", f"{node.name}/t2_core",
                     attrs={"kernel_shape": list(info.kernel), "strides": list(info.strides),
                            "pads": list(info.pads), "dilations": list(info.dilations), "group": 1},
                     inputs=[z1, gs.Constant(f"{node.name}/t2_core_W", w2)], outputs=[z2])
        ins3 = [z2, gs.Constant(f"{node.name}/t2_out_W", w3)]
        if info.has_bias:
            ins3.append(gs.Constant(f"{node.name}/t2_out_B", np.asarray(info.bias, dtype=dt)))
        n3 = gs.Node("Conv", f"{node.name}/t2_out", attrs=dict(pw), inputs=ins3, outputs=[y])
        node.inputs.clear()
        node.outputs.clear()
        g.nodes.extend([n1, n2, n3])
