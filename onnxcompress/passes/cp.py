"""CP pass (ALGORITHMS.md §2): Conv (group 1, kernel > 1×1) → a CP chain that survives INT8.

CP4 (2-D kernels): 1×1 S→R (`cp_in`) · depthwise Kh×1, group=R, vertical strides/pads/dilations (`cp_v`)
· depthwise 1×Kw, group=R, horizontal (`cp_h`) · 1×1 R→T with the bias (`cp_out`).
CP3 (any kernel): 1×1 (`cp_in`) · depthwise kernel with the original strides/pads/dilations (`cp_dw`)
· 1×1 (`cp_out`). Only the last conv carries the bias (zero padding of intermediates stays exact).

Stabilisers for INT8 (§2.4): EPC (error-preserving correction, lowers κ = ‖λ‖/‖K‖), factor balancing,
data-free cross-layer equalisation of the chain weights, and — with calibration data — data-driven
equalisation of the intermediate activations z_k measured on ONNX Runtime (per-channel max-abs; pure
diagonal rescaling compensated in the next factor, so exact in FP32). Layers whose κ stays above
`kappa_max` get a fallback when INT8 follows: `keep-float` (the chain's nodes are excluded from INT8),
`int16` (16-bit QDQ on the chain's intermediates) or `tucker2` (Tucker2 at the same parameter count).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..decompose._blas import one_blas_thread
from ..decompose.costs import ConvSpec, CostModel, Ranks, linear_rank_for_ratio
from ..decompose.cp import (DEFAULT_EPC_ROUNDS, DEFAULT_KERNEL_ITERS, DEFAULT_KERNEL_TOL, chain_weights,
                            cp_als, cp_params, epc, equalize_chain)
from ..decompose.tucker2 import tucker2, tucker2_params
from ..decompose.vbmf import tucker2_vbmf_ranks
from ..ir.layers import ConvInfo, conv_info, conv_spec, kxk_problem
from ..ir.names import is_chain_node
from ..ir.shapes import infer_value_shapes
from ..ir.surgery import export_graph, import_graph, pointwise_attrs, replace_with_convs
from ..ort.capture import channel_ranges
from .base import LayerRecord, Method, Pass, PassContext, PassResult, Wiring
from .tucker2 import COST as TUCKER2_COST, tucker2_chain_weights

#: returns R for a layer, or a string: the reason to leave it alone
RankPolicy = Callable[[ConvInfo], "int | str"]
FeedsFactory = Callable[[], Iterable[dict]]

FALLBACKS = ("keep-float", "int16", "tucker2", "none")
EQUALIZE = ("none", "data-free", "data")
BALANCE = ("sqrt_size", "equal", "none")
#: κ above which a CP layer is treated as unstable under INT8 (measured, benchmarks/cp_int8_evidence.py):
#: trained digits layers after EPC have κ ≤ 2.0 and an INT8 penalty 0.9-1.6× Tucker2's at the same size;
#: degenerate synthetic kernels with κ ≥ 3.8 (ALS) have 2.3-4.2×, κ 2.3-2.5 (EPC) 1.4-2.0×.
DEFAULT_KAPPA_MAX = 2.5
#: keep-float: the only fallback that removes the INT8 noise (digits, all CP layers forced: e_Q 0.033 ->
#: 0.010, accuracy kept) without the FP32 loss of Tucker2 at the same size (99.17% -> 94.72%); int16 only
#: reached e_Q 0.026 and bumps the model to opset 21; cost: the layer runs in float.
DEFAULT_FALLBACK = "keep-float"


def cp_problem(info: ConvInfo, variant: str = "cp4") -> str | None:
    """Why the CP pass cannot rewrite this conv (None when it can)."""
    why = kxk_problem(info, "CP")
    if why:
        return why
    if variant == "cp4" and len(info.kernel) != 2:
        return f"CP4 needs a 2-D kernel (got {len(info.kernel)}-D): use --method cp3"
    return None


def cp_chain_macs(info: ConvInfo, rank: int, variant: str) -> int | None:
    if info.in_shape is None or info.out_shape is None:
        return None
    hw_in, hw_out = int(np.prod(info.in_shape[2:])), int(np.prod(info.out_shape[2:]))
    r = rank
    if variant == "cp4":
        kh, kw = info.kernel
        mid = r * kh * info.out_shape[2] * info.in_shape[3] + r * kw * hw_out
    else:
        mid = r * int(np.prod(info.kernel)) * hw_out
    return info.S * r * hw_in + mid + r * info.T * hw_out


def kernel_hw(info: ConvInfo) -> tuple[int, int]:
    """(Kh, Kw) of a 2-D kernel; other kernels are flattened to (prod, 1) (only CP3 accepts them)."""
    k = info.kernel
    return (int(k[0]), int(k[1])) if len(k) == 2 else (int(np.prod(k)), 1)


def cp_chain_params(info: ConvInfo, rank: int, variant: str) -> int:
    """Weights of the CP chain, bias included."""
    kh, kw = kernel_hw(info)
    p = cp_params(info.T, info.S, kh, kw, rank, variant if len(info.kernel) == 2 else "cp3")
    return p + (info.T if info.has_bias else 0)


class CPCost(CostModel):
    """CP4 / CP3 chains: one rank R shared by every factor; cost affine in R."""
    family = "kxk"

    def __init__(self, variant: str):
        self.method = variant

    def takes(self, layer) -> str | None:
        if not isinstance(layer, ConvInfo):
            return "not a k×k conv (CP takes convs with a spatial kernel)"
        return cp_problem(layer, self.method)

    def full_ranks(self, layer) -> Ranks:
        # the rank at which the chain holds as many weights as the conv (a CP rank has no exact "full" value)
        return (max(1, self.weights(layer, None) // max(self.weights(layer, (1,)), 1)),)

    def rank_limits(self, layer) -> Ranks:
        return (max(self.full_ranks(layer)[0], layer.S * layer.T),)

    def weights(self, layer, ranks):
        if ranks is None:
            return layer.T * (layer.S // max(layer.group, 1)) * int(np.prod(layer.kernel))
        kh, kw = kernel_hw(layer)
        return cp_params(layer.T, layer.S, kh, kw, int(ranks[0]), self.method if len(layer.kernel) == 2 else "cp3")

    def macs(self, layer, ranks):
        if layer.in_shape is None or layer.out_shape is None:
            return None
        return layer.macs if ranks is None else cp_chain_macs(layer, int(ranks[0]), self.method)

    def ranks_for_ratio(self, layer, ratio, target="params"):
        return linear_rank_for_ratio(self, layer, ratio, target, self.rank_limits(layer)[0])

    def vbmf_ranks(self, layer, weakening):
        # a CP of rank R can hold a Tucker2 of multilinear ranks (r3, r4) only if R >= max(r3, r4)
        return (max(tucker2_vbmf_ranks(layer.weight, weakening=weakening)),)

    def original(self, layer):
        return [conv_spec(layer)]

    def chain(self, layer, ranks):
        r = int(ranks[0])
        nd = len(layer.kernel)
        one, zero = (1,) * nd, (0,) * (2 * nd)
        o = conv_spec(layer)
        if self.method == "cp4":
            (sh, sw), (dh, dw) = o.strides, o.dilations
            top, left, bottom, right = o.pads
            kh, kw = o.kernel
            mids = [ConvSpec(r, r, (kh, 1), (sh, 1), (top, 0, bottom, 0), (dh, 1), group=r),
                    ConvSpec(r, r, (1, kw), (1, sw), (0, left, 0, right), (1, dw), group=r)]
        else:
            mids = [ConvSpec(r, r, o.kernel, o.strides, o.pads, o.dilations, group=r)]
        return [ConvSpec(layer.S, r, one, one, zero, one)] + mids + \
            [ConvSpec(r, layer.T, one, one, zero, one, bias=layer.has_bias)]


CP4_COST, CP3_COST = CPCost("cp4"), CPCost("cp3")


def _suffixes(variant: str) -> list[str]:
    return ["cp_in", "cp_v", "cp_h", "cp_out"] if variant == "cp4" else ["cp_in", "cp_dw", "cp_out"]


def _wrange(w: np.ndarray) -> dict:
    cm = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    return {"min": float(w.min()), "max": float(w.max()),
            "channel_spread": float(cm.max() / max(np.median(cm), 1e-30))}


class CPPass(Pass):
    """See the module doc. `ranks(info)`: R (or (R,)) or the reason to leave a layer alone (the planner's plan
    for this method). `calibration`: a callable returning an iterable of ORT feed dicts (enables measured
    activation ranges and `equalize="data"`). `int8`: an INT8 pass follows (enables the κ fallback). What the
    INT8 pass must keep out of INT8 is handed off in the result (`float_nodes`, `int16_tensors`)."""

    name = "CP"

    def __init__(self, ranks: RankPolicy, input_shapes: dict[str, tuple[int, ...]] | None = None, *,
                 variant: str = "cp4", use_epc: bool = True, balance: str = "sqrt_size",
                 equalize: str = "data-free", calibration: FeedsFactory | None = None, int8: bool = False,
                 fallback: str = DEFAULT_FALLBACK, kappa_max: float | None = DEFAULT_KAPPA_MAX,
                 n_iter_max: int = DEFAULT_KERNEL_ITERS, epc_rounds: int = DEFAULT_EPC_ROUNDS,
                 tol: float = DEFAULT_KERNEL_TOL, dtype=np.float32, seed: int = 0):
        if variant not in ("cp4", "cp3"):
            raise ValueError(f"unknown CP variant {variant!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown CP fallback {fallback!r}")
        if equalize not in EQUALIZE:
            raise ValueError(f"unknown CP equalisation {equalize!r}")
        if balance not in BALANCE:
            raise ValueError(f"unknown CP balance {balance!r}")
        self.ranks = ranks
        self.input_shapes = input_shapes
        self.variant = variant
        self.name = variant.upper()
        self.use_epc = use_epc
        self.balance = balance
        self.equalize = equalize
        self.calibration = calibration
        self.int8 = int8
        self.fallback = fallback
        self.kappa_max = kappa_max
        self.n_iter_max = n_iter_max
        self.epc_rounds = epc_rounds
        self.tol = tol
        self.dtype = dtype
        self.seed = seed

    # ------------------------------------------------------------------------------------------ run
    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        float_nodes: list[str] = []
        int16_tensors: list[str] = []
        cost = CP4_COST if self.variant == "cp4" else CP3_COST
        shapes = infer_value_shapes(model, self.input_shapes)
        g = import_graph(model)
        convs = [n for n in g.nodes if n.op == "Conv" and not is_chain_node(n.name)]
        infos = [conv_info(node, idx, shapes) for idx, node in enumerate(convs)]
        records: list[LayerRecord] = []
        chains: dict[str, list[str]] = {}      # layer -> intermediate tensor names (CP chains only)
        all_exact = True
        with one_blas_thread():
            for node, info in zip(convs, infos):
                rec = LayerRecord(name=node.name, op="Conv", method=self.variant,
                                  kernel_shape=list(info.weight_shape), params_before=info.params,
                                  params_after=info.params, macs_before=info.macs, macs_after=info.macs)
                records.append(rec)
                reason = cost.takes(info)
                decision = self.ranks(info) if reason is None else reason
                if isinstance(decision, str):
                    rec.skipped = decision
                    continue
                rank = int(decision[0]) if isinstance(decision, (tuple, list)) else int(decision)
                if rank < 1:
                    rec.skipped = f"invalid CP rank {rank}"
                    continue
                ctx.note(f"{self.variant.upper()} {node.name} {list(info.weight_shape)} -> rank {rank}")
                res, extra = self._decompose(info, rank)
                rec.extra.update(extra)
                p_chain = cp_chain_params(info, rank, self.variant)
                unstable = (self.int8 and self.kappa_max is not None and self.fallback != "none"
                            and res.kappa > self.kappa_max)
                if unstable:
                    rec.extra["fallback"] = self.fallback
                    rec.extra["fallback_reason"] = f"kappa {res.kappa:.3g} > kappa_max {self.kappa_max:g}"
                if unstable and self.fallback == "tucker2":
                    if self._tucker2_fallback(g, node, info, rec, p_chain):
                        all_exact &= (rec.weight_rel_error or 0.0) <= 1e-6
                        continue
                    rec.extra["fallback"] = "keep-float"
                    rec.extra["fallback_reason"] += " (no Tucker2 ranks at this size: kept float)"
                ws = self._chain(info, res, rec)
                names = self._replace(g, node, info, ws)
                rec.ranks = [rank]
                rec.params_after = p_chain
                rec.macs_after = cp_chain_macs(info, rank, self.variant)
                rec.weight_rel_error = res.rel_error
                rec.new_nodes = names
                all_exact &= res.rel_error <= 1e-6
                mids = [f"{n}_out" for n in names[:-1]]
                chains[node.name] = mids
                if unstable and rec.extra["fallback"] == "keep-float":
                    float_nodes += names
                elif unstable and rec.extra["fallback"] == "int16":
                    int16_tensors += mids
        modified = any(r.skipped is None for r in records)
        out = export_graph(g, model) if modified else model
        info_out: dict = {}
        if modified and chains:
            out, notes = self._activations(out, chains, records)
            if notes:
                info_out["cp_notes"] = notes
        handoff = {k: v for k, v in (("float_nodes", float_nodes), ("int16_tensors", int16_tensors)) if v}
        info_out.update({k: list(v) for k, v in handoff.items()})
        return PassResult(model=out, modified=modified, layers=records, lossless=modified and all_exact,
                          info=info_out, handoff=handoff)

    # ------------------------------------------------------------------------------------------ numerics
    def _tensor(self, info: ConvInfo) -> np.ndarray:
        w = np.asarray(info.weight, dtype=np.float64)
        t, s = info.T, info.S
        if self.variant == "cp4":
            return w.reshape(t, s, *kernel_hw(info))
        return w.reshape(t, s, int(np.prod(info.kernel)))

    def _decompose(self, info: ConvInfo, rank: int):
        x = self._tensor(info)
        als = cp_als(x, rank, init="svd", n_iter_max=self.n_iter_max, tol=self.tol,
                     random_state=self.seed, dtype=self.dtype)
        extra = {"variant": self.variant, "kappa_als": als.kappa, "rel_error_als": als.rel_error,
                 "als_sweeps": als.n_iter, "epc": bool(self.use_epc)}
        res = als
        if self.use_epc:
            res = epc(x, als, n_rounds=self.epc_rounds, dtype=self.dtype)
            extra.update({"kappa_epc": res.kappa, "epc_rounds": res.n_iter})
        extra["kappa"] = res.kappa
        lam = np.asarray(res.weights)
        extra["lambda_max_over_min"] = float(lam.max() / max(lam.min(), 1e-300)) if lam.size else None
        return res, extra

    def _chain(self, info: ConvInfo, res, rec: LayerRecord) -> list[np.ndarray]:
        kh, kw = kernel_hw(info)
        shape = (info.T, info.S, kh, kw) if self.variant == "cp4" else (info.T, info.S, kh * kw, 1)
        ws = chain_weights(res, self.variant, shape, balance=self.balance)
        if self.variant == "cp3":
            ws[1] = ws[1].reshape((rank_of(ws),) + (1,) + tuple(info.kernel))
        eq = self.equalize if self.equalize != "data" or self.calibration is not None else "data-free"
        rec.extra["balance"] = self.balance
        rec.extra["equalize"] = eq
        if eq in ("data-free", "data"):
            ws = equalize_chain(ws)
        rec.extra["weight_ranges"] = {sfx: _wrange(w) for sfx, w in zip(_suffixes(self.variant), ws)}
        return ws

    def _tucker2_fallback(self, g, node, info: ConvInfo, rec: LayerRecord, p_chain: int) -> bool:
        """Replace the layer by Tucker2 with the largest proportional ranks whose chain fits in p_chain."""
        k = int(np.prod(info.kernel))
        bias = info.T if info.has_bias else 0
        best = None
        for r3 in range(1, info.S + 1):   # largest r3 (r4 ∝ T/S) under the CP budget
            r4 = max(1, min(info.T, int(round(r3 * info.T / info.S))))
            if tucker2_params(info.T, info.S, k, r3, r4) + bias <= p_chain:
                best = (r3, r4)
        if best is None:
            return False
        r3, r4 = best
        res = tucker2(info.weight, r3, r4, n_iter_max=10)
        rec.method = "tucker2"
        rec.ranks = [r3, r4]
        rec.new_nodes = replace_with_convs(g, node, tucker2_chain_weights(res, info),
                                           info.bias if info.has_bias else None)
        rec.params_after = TUCKER2_COST.params(info, (r3, r4))
        rec.macs_after = TUCKER2_COST.macs(info, (r3, r4))
        rec.weight_rel_error = res.rel_error
        return True

    # ------------------------------------------------------------------------------------------ graph
    def _replace(self, g, node, info: ConvInfo, ws: list[np.ndarray]) -> list[str]:
        dt = info.weight.dtype
        nd = len(info.kernel)
        r = ws[0].shape[0]
        if self.variant == "cp4":
            (sh, sw), (dh, dw) = info.strides, info.dilations
            top, left, bottom, right = info.pads
            kh, kw = info.kernel
            mids = [{"kernel_shape": [kh, 1], "strides": [sh, 1], "pads": [top, 0, bottom, 0],
                     "dilations": [dh, 1], "group": r},
                    {"kernel_shape": [1, kw], "strides": [1, sw], "pads": [0, left, 0, right],
                     "dilations": [1, dw], "group": r}]
        else:
            mids = [{"kernel_shape": list(info.kernel), "strides": list(info.strides), "pads": list(info.pads),
                     "dilations": list(info.dilations), "group": r}]
        attrs = [pointwise_attrs(nd)] + mids + [pointwise_attrs(nd)]
        if nd != 2:   # CP3 on 1-D / 3-D kernels: reshape the 1×1 weights
            ws = [ws[0].reshape((r, info.S) + (1,) * nd)] + ws[1:-1] + [ws[-1].reshape((info.T, r) + (1,) * nd)]
        convs = [(sfx, a, np.asarray(w, dtype=dt)) for sfx, a, w in zip(_suffixes(self.variant), attrs, ws)]
        return replace_with_convs(g, node, convs, info.bias if info.has_bias else None)

    # ------------------------------------------------------------------------------------------ data
    def _activations(self, model: onnx.ModelProto, chains: dict[str, list[str]], records: list[LayerRecord]):
        """Measure the intermediates on the calibration data (ORT, extra outputs); with equalize='data'
        rescale them to equal per-channel ranges. Returns (model, notes)."""
        if self.calibration is None:
            return model, []
        tensors = [t for mids in chains.values() for t in mids]
        try:
            stats = channel_ranges(model, tensors, self.calibration)
        except Exception as e:  # measurement is best effort: the chain itself is already verified
            return model, [f"could not measure CP activation ranges on ORT: {str(e).splitlines()[0][:200]}"]
        by_name = {r.name: r for r in records}
        scales_all: dict[str, np.ndarray] = {}
        for layer, mids in chains.items():
            rec = by_name[layer]
            rec.extra["activation_ranges"] = {t.rsplit("/", 1)[-1]: _arange(*stats[t]) for t in mids}
            if rec.extra.get("equalize") != "data":
                continue
            w_last = _init_array(model, f"{layer}/cp_out_W")
            scales = data_equalization_scales([stats[t] for t in mids], w_last)
            for t, s in zip(mids, scales):
                scales_all[t] = s
            rec.extra["activation_ranges_equalized"] = {
                t.rsplit("/", 1)[-1]: _arange(stats[t][0] / s, stats[t][1] / s) for t, s in zip(mids, scales)}
        if scales_all:
            model = apply_activation_scales(model, chains, scales_all)
            for layer in chains:
                rec = by_name[layer]
                if rec.extra.get("equalize") == "data":
                    ws = [_init_array(model, f"{n}_W") for n in rec.new_nodes]
                    rec.extra["weight_ranges"] = {n.rsplit("/", 1)[-1]: _wrange(w) for n, w in zip(rec.new_nodes, ws)}
        return model, []


def rank_of(ws: list[np.ndarray]) -> int:
    return int(ws[0].shape[0])


def _arange(cmin: np.ndarray, cmax: np.ndarray) -> dict:
    am = np.maximum(np.abs(cmin), np.abs(cmax))
    return {"min": float(cmin.min()), "max": float(cmax.max()),
            "channel_spread": float(am.max() / max(np.median(am), 1e-30))}


def _init_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def data_equalization_scales(stats: list[tuple[np.ndarray, np.ndarray]], w_last: np.ndarray) -> list[np.ndarray]:
    """Scales s_k (z_k ← z_k / s_k) that give every channel of z_k the same max-abs (geometric mean of the
    measured ones). The last intermediate is compensated in the R→T conv, whose rows are quantized per
    output channel across all R columns: if full equalisation would widen that conv's column spread,
    use the geometric-mean compromise s_r = √(m_r / c_r) (balances activation and column ranges)."""
    out = []
    for k, (mn, mx) in enumerate(stats):
        m = np.maximum(np.abs(mn), np.abs(mx))
        ok = m > 0
        if not ok.any():
            out.append(np.ones_like(m))
            continue
        gm = float(np.exp(np.mean(np.log(m[ok]))))
        s = np.where(ok, m / gm, 1.0)
        if k == len(stats) - 1:
            c = np.abs(w_last).reshape(w_last.shape[0], w_last.shape[1]).max(axis=0)   # per column r
            spread = lambda v: float(v.max() / max(np.median(v), 1e-30))   # noqa: E731
            if spread(c * s) > spread(c):
                cok = ok & (c > 0)
                ratio = np.where(cok, m / np.where(cok, c, 1.0), 1.0)
                g2 = float(np.exp(np.mean(np.log(ratio[cok])))) if cok.any() else 1.0
                s = np.where(cok, np.sqrt(ratio / g2), 1.0)
        out.append(s)
    return out


def apply_activation_scales(model: onnx.ModelProto, chains: dict[str, list[str]],
                            scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """z ← z/s for each scaled intermediate: the producing conv's output channel r is divided by s_r, the
    consuming conv's input channel r multiplied by s_r (a depthwise consumer: its channel r)."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    producer = {n.output[0]: n for n in model.graph.node if n.op_type == "Conv"}
    consumer = {n.input[0]: n for n in model.graph.node if n.op_type == "Conv"}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    arrays: dict[str, np.ndarray] = {}

    def get(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(m.graph.initializer[inits[name]]).astype(np.float64)
        return arrays[name]

    for mids in chains.values():
        for t in mids:
            if t not in scales:
                continue
            s = np.asarray(scales[t], dtype=np.float64)
            p, c = producer[t], consumer[t]
            wp = get(p.input[1])
            arrays[p.input[1]] = wp / s.reshape((-1,) + (1,) * (wp.ndim - 1))
            wc = get(c.input[1])
            depthwise = wc.shape[1] == 1 and wc.shape[0] == s.shape[0] and s.shape[0] > 1 and \
                next((a.i for a in c.attribute if a.name == "group"), 1) == s.shape[0]
            if depthwise:
                arrays[c.input[1]] = wc * s.reshape((-1,) + (1,) * (wc.ndim - 1))
            else:
                arrays[c.input[1]] = wc * s.reshape((1, -1) + (1,) * (wc.ndim - 2))
    for name, a in arrays.items():
        old = m.graph.initializer[inits[name]]
        dt = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        m.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(a.astype(dt), name))
    return m


def _builder(variant: str):
    def build(policy, w: Wiring) -> CPPass:
        r = w.recipe
        int8 = w.quantized in ("int8", "int4")   # EPC and the κ fallback for any quantized weights
        # data equalisation widens the R→T conv's rows, which costs more than it gains at 4 bits (QAF_INT4.md)
        eq = r.cp_equalize or ("data" if w.calibration is not None and w.calibration_real and
                               w.quantized != "int4" else "data-free")
        if eq == "data" and w.calibration is None:
            w.warnings.append("--cp-equalize data needs --calibration data: used data-free equalisation")
            eq = "data-free"
        return CPPass(policy, w.shapes, variant=variant, use_epc=r.cp_epc if r.cp_epc is not None else int8,
                      balance=r.cp_balance, equalize=eq, calibration=w.calibration, int8=int8,
                      fallback=r.cp_fallback, kappa_max=r.cp_kappa_max, seed=r.seed)
    return build


CP4 = Method("cp4", CP4_COST, _builder("cp4"))
CP3 = Method("cp3", CP3_COST, _builder("cp3"))
