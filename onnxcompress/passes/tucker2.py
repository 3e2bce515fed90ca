"""Tucker2 (ALGORITHMS.md §1): Conv (group 1, kernel > 1×1) → 1×1 (S→R3) · k×k (R3→R4, the original
strides/pads/dilations) · 1×1 (R4→T, carries the bias). 1-D, 2-D and 3-D kernels. The module holds the
method's cost model (what the planner needs) and its rewrite (the pass)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from ..decompose import allocate as al
from ..decompose.costs import ConvSpec, CostModel, Ranks
from ..decompose.tucker2 import tucker2, tucker2_params
from ..decompose.vbmf import tucker2_vbmf_ranks
from ..errors import UserError
from ..ir.layers import ConvInfo, conv_info, conv_spec, kxk_problem
from ..ir.names import is_chain_node
from ..ir.shapes import infer_value_shapes
from ..ir.surgery import export_graph, import_graph, pointwise_attrs, replace_with_convs
from .base import LayerRecord, Method, Pass, PassContext, PassResult, Wiring

#: returns (r3, r4) for a layer, or a string: the reason to leave it alone
RankPolicy = Callable[[ConvInfo], "tuple[int, int] | str"]
SUFFIXES = ("t2_in", "t2_core", "t2_out")


def layer_spec(info: ConvInfo) -> al.LayerSpec:
    """Allocation descriptor of a conv; kernels of any dimension are flattened to kh = prod(kernel)."""
    k = info.kernel
    kh, kw = (k[0], k[1]) if len(k) == 2 else (int(np.prod(k)), 1)
    hin = info.in_shape[2:] if info.in_shape else (1,)
    hout = info.out_shape[2:] if info.out_shape else (1,)
    sp_in = (hin[0], int(np.prod(hin[1:]))) if len(hin) >= 2 else (int(np.prod(hin)), 1)
    sp_out = (hout[0], int(np.prod(hout[1:]))) if len(hout) >= 2 else (int(np.prod(hout)), 1)
    return al.LayerSpec(info.name, info.T, info.S, kh, kw, sp_in[0], sp_in[1], sp_out[0], sp_out[1], info.index)


class Tucker2Cost(CostModel):
    method = "tucker2"
    family = "kxk"

    def takes(self, layer) -> str | None:
        if not isinstance(layer, ConvInfo):
            return "not a k×k conv (Tucker2 takes convs with a spatial kernel)"
        return kxk_problem(layer, "Tucker2")

    def full_ranks(self, layer) -> Ranks:
        return (layer.S, layer.T)

    def weights(self, layer, ranks):
        k = int(np.prod(layer.kernel))
        if ranks is None:
            return layer.T * (layer.S // max(layer.group, 1)) * k
        return tucker2_params(layer.T, layer.S, k, int(ranks[0]), int(ranks[1]))

    def macs(self, layer, ranks):
        if layer.in_shape is None or layer.out_shape is None:
            return None
        if ranks is None:
            return layer.macs
        r3, r4 = int(ranks[0]), int(ranks[1])
        hw_in, hw_out = int(np.prod(layer.in_shape[2:])), int(np.prod(layer.out_shape[2:]))
        k = int(np.prod(layer.kernel))
        return layer.S * r3 * hw_in + r3 * r4 * k * hw_out + r4 * layer.T * hw_out

    def ranks_for_ratio(self, layer, ratio, target="params"):
        return al.proportional_ranks(layer_spec(layer), ratio, target)

    def vbmf_ranks(self, layer, weakening):
        return tuple(tucker2_vbmf_ranks(layer.weight, weakening=weakening))

    def original(self, layer):
        return [conv_spec(layer)]

    def chain(self, layer, ranks):
        r3, r4 = int(ranks[0]), int(ranks[1])
        nd = len(layer.kernel)
        one, zero = (1,) * nd, (0,) * (2 * nd)
        o = conv_spec(layer)
        return [ConvSpec(layer.S, r3, one, one, zero, one),
                ConvSpec(r3, r4, o.kernel, o.strides, o.pads, o.dilations),
                ConvSpec(r4, layer.T, one, one, zero, one, bias=layer.has_bias)]


COST = Tucker2Cost()


def tucker2_working_set(info: ConvInfo) -> int:
    """Bytes the HOOI of this kernel holds at once (float64): the kernel, two contracted copies, the two
    Gram matrices and their eigenvectors."""
    T, S, k = info.T, info.S, int(np.prod(info.kernel))
    return 8 * (3 * T * S * k + 2 * T * T + 2 * S * S)


def tucker2_chain_weights(res, info: ConvInfo) -> list[tuple[str, dict, np.ndarray]]:
    """The three convs of a Tucker2 factorization `res` of `info`'s kernel: (suffix, attrs, weight)."""
    dt = info.weight.dtype
    nd = len(info.kernel)
    r3, r4 = res.ranks
    core = {"kernel_shape": list(info.kernel), "strides": list(info.strides), "pads": list(info.pads),
            "dilations": list(info.dilations), "group": 1}
    return [(SUFFIXES[0], pointwise_attrs(nd), res.U_S.T.reshape((r3, info.S) + (1,) * nd).astype(dt)),
            (SUFFIXES[1], core, res.core.astype(dt)),
            (SUFFIXES[2], pointwise_attrs(nd), res.U_T.reshape((info.T, r4) + (1,) * nd).astype(dt))]


class Tucker2Pass(Pass):
    """`ranks(info)` gives (r3, r4) or the reason to leave a layer alone (the planner's plan for this method).
    `factorizer` (an optional hook; the pipeline's --data-aware runs this pass plain and revisits the chains in
    passes/data_aware.py): `prepare(model, infos)` may capture statistics for the layers to rewrite;
    `factorizer(info, r3, r4)` returns factors or None for plain HOOI. `factor_cache`:
    `cache(method, kernel, params, compute)` memoizes factorizations (the sensitivity sweeps)."""
    name = "Tucker2"

    def __init__(self, ranks: RankPolicy, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 n_iter_max: int = 5, max_memory_mb: int | None = None, factorizer=None, factor_cache=None):
        self.ranks = ranks
        self.factorizer = factorizer
        self.factor_cache = factor_cache
        self.input_shapes = input_shapes
        self.n_iter_max = n_iter_max
        self.max_memory_mb = max_memory_mb

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        shapes = infer_value_shapes(model, self.input_shapes)
        g = import_graph(model)
        convs = [n for n in g.nodes if n.op == "Conv" and not is_chain_node(n.name)]
        infos = [conv_info(node, idx, shapes, lazy=True) for idx, node in enumerate(convs)]
        decisions = []
        for info in infos:
            why = COST.takes(info)
            decisions.append(why if why is not None else self.ranks(info))
        if self.factorizer is not None and hasattr(self.factorizer, "prepare"):
            self.factorizer.prepare(model, [i for i, d in zip(infos, decisions) if not isinstance(d, str)])
        records, all_full = [], True
        for node, info, decision in zip(convs, infos, decisions):
            rec = LayerRecord(name=node.name, op="Conv", method="tucker2", kernel_shape=list(info.weight_shape),
                              params_before=info.params, params_after=info.params,
                              macs_before=info.macs, macs_after=info.macs)
            records.append(rec)
            if isinstance(decision, str):
                rec.skipped = decision
                continue
            r3, r4 = (int(decision[0]), int(decision[1]))
            p_chain = COST.params(info, (r3, r4))
            if p_chain >= info.params and not (r3 == info.S and r4 == info.T):
                rec.skipped = f"chain would not shrink (ranks {r3},{r4}: {p_chain} >= {info.params} params)"
                continue
            need = tucker2_working_set(info)
            if self.max_memory_mb is not None and need > self.max_memory_mb * 2**20:
                raise UserError(f"Tucker2 of layer {node.name} {list(info.weight_shape)} needs about "
                                f"{need / 2**20:.0f} MB, over the {self.max_memory_mb} MB cap "
                                f"(raise max_memory_mb, or exclude the layer)")
            ctx.note(f"Tucker2 {node.name} {list(info.weight_shape)} -> ranks ({r3}, {r4})")
            res = self.factorizer(info, r3, r4) if self.factorizer is not None else None
            if res is None:
                res = self._hooi(info.weight, r3, r4)
            elif getattr(res, "info", None):
                rec.extra.update(res.info)
            rec.new_nodes = replace_with_convs(g, node, tucker2_chain_weights(res, info),
                                               info.bias if info.has_bias else None)
            all_full &= (r3 == info.S and r4 == info.T)
            rec.ranks = [r3, r4]
            rec.params_after = p_chain
            rec.macs_after = COST.macs(info, (r3, r4))
            rec.weight_rel_error = res.rel_error
        modified = any(r.skipped is None for r in records)
        out = export_graph(g, model) if modified else model
        return PassResult(model=out, modified=modified, layers=records, lossless=modified and all_full)

    def _hooi(self, kernel, r3, r4):
        if self.factor_cache is None:
            return tucker2(kernel, r3, r4, n_iter_max=self.n_iter_max)
        return self.factor_cache("tucker2", kernel, (r3, r4, self.n_iter_max),
                                 lambda: tucker2(kernel, r3, r4, n_iter_max=self.n_iter_max))


def build(policy, w: Wiring) -> Tucker2Pass:
    return Tucker2Pass(policy, w.shapes, max_memory_mb=w.recipe.max_memory_mb,
                       factor_cache=w.factor_cache)


METHOD = Method("tucker2", COST, build)
