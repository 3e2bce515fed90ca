"""Layer facts shared by passes, the planner, `inspect` and the report: constant weights, conv attributes,
explicit pads, compute nodes the passes do not reach. Reads ModelProto / onnx-graphsurgeon graphs; never prints."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..decompose.costs import ConvSpec
from .names import is_chain_node

SUBGRAPH_OPS = {"If", "Loop", "Scan"}
KINDS = ("conv", "gemm", "matmul")


# ---------------------------------------------------------------- shapes


# ---------------------------------------------------------------- constants
def constant_value(t: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
    """Value of a tensor if it is constant: an initializer, a Constant node, or either behind
    Identity/Cast. None for computed (dynamic) tensors."""
    if isinstance(t, gs.Constant):
        if isinstance(t._values, gs.ir.tensor.LazyValues):
            # read without caching: gs would keep the array on the Constant and re-serialise it on export
            # instead of reusing the original TensorProto (one more copy of every weight a pass looked at)
            return np.asarray(t._values.load())
        return np.asarray(t.values)
    if _depth > 8 or not t.inputs:
        return None
    prod = t.inputs[0]
    if prod.op == "Constant":
        a = prod.attrs
        if "value" in a:
            v = a["value"]
            return np.asarray(v.values if isinstance(v, gs.Constant) else v)
        for k in ("value_float", "value_floats", "value_int", "value_ints"):
            if k in a:
                return np.asarray(a[k])
        return None
    if prod.op == "Identity" and prod.inputs:
        return constant_value(prod.inputs[0], _depth + 1)
    if prod.op == "Cast" and prod.inputs:
        v = constant_value(prod.inputs[0], _depth + 1)
        if v is None:
            return None
        to = prod.attrs.get("to")
        try:
            return v.astype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
        except Exception:
            return None
    return None


# ---------------------------------------------------------------- conv facts
@dataclass
class ConvInfo:
    """Everything a decomposition pass needs to know about one Conv node."""
    name: str
    index: int                     # position among the graph's Conv nodes (topological)
    weight_shape: tuple[int, ...]  # (T, S/g, k...)
    group: int
    strides: tuple[int, ...]
    pads: tuple[int, ...]          # explicit, [begins..., ends...]
    dilations: tuple[int, ...]
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    has_bias: bool
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    problem: str | None = None     # why this conv cannot be factorized at all (None = it can)

    @property
    def T(self) -> int:
        return self.weight_shape[0] if self.weight_shape else 0

    @property
    def S(self) -> int:
        return self.weight_shape[1] * self.group if len(self.weight_shape) > 1 else 0

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape)) + (self.T if self.has_bias else 0)

    @property
    def macs(self) -> int | None:
        if self.out_shape is None or not self.weight_shape:
            return None
        return int(np.prod(self.weight_shape)) * int(np.prod(self.out_shape[2:]))


class LazyConvInfo(ConvInfo):
    """A ConvInfo whose `weight` is read from the graph each time it is asked for (its checks ran once, when it
    was made) instead of being held: a pass that makes the infos of every conv before rewriting any would
    otherwise hold a numpy copy of every conv weight next to the model (94 MB on ResNet-50). Setting `weight`
    pins a value."""

    def __init__(self, *args, source: gs.Tensor | None = None, **kwargs):
        self._source = source
        self._weight = None
        super().__init__(*args, **kwargs)

    @property
    def weight(self) -> np.ndarray | None:
        if self._weight is not None or self._source is None:
            return self._weight
        return constant_value(self._source)

    @weight.setter
    def weight(self, value) -> None:
        self._weight = value


def explicit_pads(attrs: dict, kernel: tuple[int, ...], in_spatial: tuple[int, ...] | None,
                  strides: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[int, ...] | None:
    """Explicit [begins..., ends...] pads; resolves auto_pad (needs static input dims, else None)."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("NOTSET", ""):
        pads = attrs.get("pads")
        return tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * nd)
    if auto == "VALID":
        return (0,) * (2 * nd)
    if in_spatial is None:
        return None
    begins, ends = [], []
    for i in range(nd):
        n, s, k, d = in_spatial[i], strides[i], kernel[i], dilations[i]
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        if auto == "SAME_UPPER":
            begins.append(small); ends.append(big)
        else:  # SAME_LOWER
            begins.append(big); ends.append(small)
    return tuple(begins + ends)


def conv_info(node: gs.Node, index: int, shapes: dict[str, tuple[int, ...]], lazy: bool = False) -> ConvInfo:
    """The facts of the Conv `node`; `lazy`: a LazyConvInfo (the weight read from the graph on demand)."""
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    b = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
        and not (isinstance(node.inputs[2], gs.Variable) and node.inputs[2].name == "") else None
    has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""
    if w is not None:
        wshape = tuple(w.shape)
    elif len(node.inputs) > 1:
        known = shapes.get(node.inputs[1].name) or node.inputs[1].shape or ()
        wshape = tuple(d for d in known if isinstance(d, (int, np.integer)))
        wshape = wshape if len(wshape) == len(known) else ()
    else:
        wshape = ()
    nd = max(len(wshape) - 2, 0)
    a = node.attrs
    group = int(a.get("group", 1))
    strides = tuple(int(s) for s in a.get("strides", [1] * nd))
    dil = tuple(int(s) for s in a.get("dilations", [1] * nd))
    in_shape = shapes.get(node.inputs[0].name)
    out_shape = shapes.get(node.outputs[0].name)
    kernel = tuple(wshape[2:])
    pads = explicit_pads(a, kernel, in_shape[2:] if in_shape else None, strides, dil) if nd else None
    problem = None
    wprod = node.inputs[1].inputs[0].op if len(node.inputs) > 1 and node.inputs[1].inputs else None
    if w is None and wprod == "DequantizeLinear":
        problem = "quantized weight (DequantizeLinear): already quantized"
    elif w is None:
        problem = "dynamic weight (computed at run time)"
    elif not np.issubdtype(w.dtype, np.floating):
        problem = f"non-float weight ({w.dtype})"
    elif w.size == 0 or len(wshape) < 3:
        problem = "empty or malformed kernel"
    elif not np.all(np.isfinite(w)):
        problem = "weight holds NaN or Inf"
    elif has_bias and b is None:
        problem = "dynamic bias"
    elif b is not None and not np.all(np.isfinite(b)):
        problem = "bias holds NaN or Inf"
    elif pads is None:
        problem = "auto_pad with unknown input shape"
    kw = dict(name=node.name, index=index, weight_shape=wshape, group=group, strides=strides, pads=pads or (),
              dilations=dil, in_shape=in_shape, out_shape=out_shape, has_bias=has_bias, bias=b, problem=problem)
    if lazy and w is not None:
        return LazyConvInfo(source=node.inputs[1], weight=None, **kw)
    return ConvInfo(weight=w, **kw)


def nested_compute_nodes(model: onnx.ModelProto, ops=("Conv", "Gemm", "MatMul")) -> list[tuple[str, str, str]]:
    """(name, op, where) of compute nodes the passes do not rewrite: inside If/Loop/Scan subgraphs or
    model-local functions."""
    out = []

    def walk(graph, where):
        for n in graph.node:
            for a in n.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sg in subs:
                    for m in sg.node:
                        if m.op_type in ops:
                            out.append((m.name or m.output[0], m.op_type, f"inside {n.op_type} {n.name!r} subgraph"))
                    walk(sg, where)
    walk(model.graph, "")
    for f in model.functions:
        for m in f.node:
            if m.op_type in ops:
                out.append((m.name or m.output[0], m.op_type, f"inside model-local function {f.name!r}"))
    return out




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


@dataclass
class LinearInfo:
    """One candidate layer as a linear map y = W x (+ b)."""
    name: str
    op: str                     # Conv | Gemm | MatMul
    kind: str                   # conv | gemm | matmul
    index: int                  # conv: position among the original Conv nodes; gemm/matmul: among Gemm+MatMul
    W: np.ndarray | None = field(default=None, repr=False)     # (out, in), the map actually applied
    bias: np.ndarray | None = field(default=None, repr=False)
    x: str = ""                 # activation input tensor
    y: str = ""                 # output tensor
    side: str = "right"         # matmul: where the constant weight is (right: X @ Wm, left: Wm @ X)
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    params: int = 0             # weights (+ bias) of the layer as it is
    conv: ConvInfo | None = field(default=None, repr=False)
    attrs: dict = field(default_factory=dict)
    last: bool = False          # the last Gemm/MatMul of the graph (a CNN's classifier)
    problem: str | None = None

    @property
    def T(self) -> int:          # output width (planner vocabulary)
        return 0 if self.W is None else int(self.W.shape[0])

    @property
    def S(self) -> int:          # input width
        return 0 if self.W is None else int(self.W.shape[1])

    @property
    def positions(self) -> int | None:
        """How many times per model run W is applied (output pixels / rows), when shapes are known."""
        if self.out_shape is None:
            return None
        if self.kind == "conv":
            return int(np.prod(self.out_shape[2:]))
        if self.kind == "gemm" or self.side == "right":
            return int(np.prod(self.out_shape[:-1])) if len(self.out_shape) > 1 else 1
        return int(np.prod(self.out_shape)) // max(self.T, 1)

    @property
    def macs(self) -> int | None:
        p = self.positions
        return None if p is None or self.W is None else p * self.T * self.S

    @property
    def has_bias(self) -> bool:
        return self.bias is not None


class LazyLinearInfo(LinearInfo):
    """A LinearInfo of a 1×1 conv whose `W` is read from the graph each time it is asked for (see LazyConvInfo);
    its widths come from the weight's shape, so `T`, `S`, `macs` hold without the values."""

    def __init__(self, *args, source=None, shape: tuple[int, int] = (0, 0), **kwargs):
        self._source, self._shape, self._W = source, tuple(shape), None
        super().__init__(*args, **kwargs)

    @property
    def W(self) -> np.ndarray | None:
        if self._W is not None or self._source is None:
            return self._W
        return self._source()

    @W.setter
    def W(self, value) -> None:
        self._W = value

    @property
    def T(self) -> int:
        return int(self._W.shape[0]) if self._W is not None else self._shape[0]

    @property
    def S(self) -> int:
        return int(self._W.shape[1]) if self._W is not None else self._shape[1]

    @property
    def macs(self) -> int | None:
        p = self.positions
        return None if p is None else p * self.T * self.S


def _attr_int(node: gs.Node, key: str, default: int) -> int:
    return int(node.attrs.get(key, default))


def linear_infos(g: gs.Graph, shapes: dict[str, tuple[int, ...]], kinds=KINDS, lazy: bool = False
                 ) -> list[tuple[gs.Node, LinearInfo]]:
    """Candidate nodes of `g` (topological order) and their facts; nodes made by factorization passes are
    left out. Each info's `problem` says why it cannot be factorized (None: it can). `lazy`: convs' weights are
    read from `g` when asked for (LazyConvInfo, LazyLinearInfo), not held."""
    out = []
    conv_idx = lin_idx = 0
    for node in g.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or is_chain_node(node.name):
            continue
        if node.op == "Conv":
            ci = conv_info(node, conv_idx, shapes, lazy=lazy)
            conv_idx += 1
            if "conv" not in kinds:
                continue
            if ci.weight_shape and len(ci.weight_shape) > 2 and int(np.prod(ci.kernel)) != 1:
                continue   # k×k convs belong to Tucker2/CP: not an SVD candidate, no record
            out.append((node, _conv_linear_info(node, ci)))
            continue
        idx = lin_idx
        lin_idx += 1
        kind = node.op.lower()
        if kind not in kinds:
            continue
        out.append((node, _gemm_or_matmul_info(node, idx, kind, shapes)))
    lins = [i for _, i in out if i.kind != "conv"]
    if lins and lin_idx:
        # the last Gemm/MatMul of the whole graph (a CNN's classifier head), whatever kinds were asked for
        last_name = [n.name for n in g.nodes if n.op in ("Gemm", "MatMul") and not is_chain_node(n.name)][-1]
        for i in lins:
            i.last = i.name == last_name
    return out


def _conv_linear_info(node: gs.Node, ci: ConvInfo) -> LinearInfo:
    """A 1×1 conv as a linear map (its weight read on demand when `ci` is lazy)."""
    kw = dict(x=node.inputs[0].name, y=node.outputs[0].name, in_shape=ci.in_shape, out_shape=ci.out_shape, conv=ci,
              params=ci.params, problem=ci.problem)
    problem = ci.problem
    if problem is None and ci.group != 1:
        problem = kw["problem"] = ("depthwise conv" if ci.group == ci.S == ci.T else f"grouped conv (group={ci.group})")
    if problem is None and isinstance(ci, LazyConvInfo):
        info = LazyLinearInfo(node.name, "Conv", "conv", ci.index, source=lambda: ci.weight.reshape(ci.T, ci.S),
                              shape=(ci.T, ci.S), **kw)
    else:
        info = LinearInfo(node.name, "Conv", "conv", ci.index, **kw)
        if problem is None:
            info.W = ci.weight.reshape(ci.T, ci.S)
    if problem is None:
        info.bias = ci.bias if ci.has_bias else None
    return info


def _gemm_or_matmul_info(node: gs.Node, idx: int, kind: str, shapes) -> LinearInfo:
    a, b = node.inputs[0], node.inputs[1]
    va, vb = constant_value(a), constant_value(b)
    info = LinearInfo(node.name, node.op, kind, idx, y=node.outputs[0].name,
                      out_shape=shapes.get(node.outputs[0].name))
    if va is not None and vb is not None:
        info.problem = "both inputs constant (constant folding, not SVD)"
        return info
    if kind == "gemm":
        ta, tb = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        info.attrs = {"transA": ta, "transB": tb, "alpha": alpha, "beta": beta}
        info.x, info.in_shape = a.name, shapes.get(a.name)
        if vb is None:
            info.problem = "dynamic weight (computed at run time)"
            return info
        wt = vb
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            c = constant_value(node.inputs[2])
            info.attrs["C"] = c
            info.attrs["C_dynamic"] = c is None
            if c is not None and beta != 0 and (c.size == wt.shape[0 if tb else 1]) and c.ndim <= 2 \
                    and (c.ndim < 2 or c.shape[0] == 1):
                info.bias = (beta * c.reshape(-1)).astype(wt.dtype)
        W = (wt if tb else wt.T) * alpha          # (out, in)
    else:
        if vb is not None:
            info.side, wt, info.x = "right", vb, a.name
        elif va is not None:
            info.side, wt, info.x = "left", va, b.name
        else:
            info.problem = "no constant weight (activation × activation)"
            return info
        info.in_shape = shapes.get(info.x)
        if wt.ndim != 2:
            info.problem = f"{wt.ndim}-D constant weight (only 2-D weights are factorized)"
            return info
        W = wt.T if info.side == "right" else wt
    if not np.issubdtype(wt.dtype, np.floating):
        info.problem = f"non-float weight ({wt.dtype})"
        return info
    if not np.all(np.isfinite(wt)):
        info.problem = "weight holds NaN or Inf"
        return info
    info.W = np.asarray(W)
    info.params = int(wt.size) + (int(info.bias.size) if info.bias is not None else 0)
    return info


def conv_spec(info: ConvInfo) -> ConvSpec:
    """The conv as a ConvSpec (shapes and attributes, for one-layer timing)."""
    nd = len(info.kernel)
    return ConvSpec(info.S, info.T, tuple(info.kernel), tuple(info.strides), tuple(info.pads) or (0,) * (2 * nd),
                    tuple(info.dilations), info.group, info.has_bias)


def collect_layers(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                   lazy: bool = False) -> list:
    """Every compute layer of the main graph in topological order (nodes made by factorization passes left
    out): ConvInfo for convs with a spatial kernel (and convs whose weight cannot be read), LinearInfo for
    1×1 convs, Gemm and MatMul. Indices follow the recipe's `#N` convention (position among the Conv nodes;
    Gemm/MatMul among Gemm+MatMul). `lazy`: conv weights are read from the model when asked for, not held
    (the infos then keep `model`'s tensors alive; `detach_weights` lets them go)."""
    from .shapes import infer_value_shapes
    from .surgery import import_graph

    vs = infer_value_shapes(model, shapes)
    g = import_graph(model)
    lin = {n.name: info for n, info in linear_infos(g, vs, lazy=lazy)}
    out, conv_idx = [], 0
    for node in g.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or is_chain_node(node.name):
            continue
        if node.name in lin:
            out.append(lin[node.name])
        elif node.op == "Conv":
            out.append(conv_info(node, conv_idx, vs, lazy=lazy))
        conv_idx += node.op == "Conv"
    return out


def detach_weights(infos) -> None:
    """Let the infos forget their weights (shapes, params and MACs stay): lazy ones where to read them, eager
    Gemm/MatMul ones the (out, in) array they hold (a VGG-16's classifier: 480 MB), so that the model they were
    read from, and their copies, can be freed. `weight` / `W` are None afterwards."""
    for i in infos:
        if type(i) is LinearInfo and i.W is not None:   # eager: becomes a LazyLinearInfo with nothing to read
            shape = (i.T, i.S)
            i.__class__ = LazyLinearInfo
            i._source, i._shape, i._W = None, shape, None
            i.__dict__.pop("W", None)
        for obj in (i, getattr(i, "conv", None)):
            if obj is None:
                continue
            if hasattr(obj, "_source"):
                obj._source = None
            if isinstance(obj, LazyLinearInfo):
                obj._W = None
            elif isinstance(obj, LazyConvInfo):
                obj._weight = None


def layer_kernel(info) -> tuple[int, ...]:
    """The spatial kernel of a layer: a conv's kernel (1×1 convs seen as linear maps too), () for Gemm/MatMul."""
    if isinstance(info, ConvInfo):
        return tuple(info.kernel)
    conv = getattr(info, "conv", None)
    return tuple(conv.kernel) if conv is not None else ()
