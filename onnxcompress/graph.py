"""Graph facts shared by passes, `inspect` and the report: static shapes, constant weights, conv attributes,
parameter and MAC counts. Reads ModelProto / onnx-graphsurgeon graphs; never prints."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .errors import UserError

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
             "QLinearMatMul", "DynamicQuantizeLinear"}
SUBGRAPH_OPS = {"If", "Loop", "Scan"}


# ---------------------------------------------------------------- shapes
def input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                 default_batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: overrides first, then the static dims; a dynamic batch
    dim becomes `default_batch`; other dynamic dims are an error that asks for --input-shape."""
    overrides = dict(overrides or {})
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name in overrides:
            out[vi.name] = tuple(int(d) for d in overrides.pop(vi.name))
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise UserError(f"input {vi.name!r} has no static shape: pass --input-shape {vi.name}:1x3x224x224")
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(default_batch)
            else:
                raise UserError(f"input {vi.name!r} has a dynamic dimension {i} ({d.dim_param or '?'}): "
                                f"pass --input-shape {vi.name}:1x3x224x224")
        out[vi.name] = tuple(dims)
    if overrides:
        raise UserError(f"--input-shape names an unknown input: {', '.join(overrides)} "
                        f"(inputs: {', '.join(out) or 'none'})")
    return out


def with_static_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for s in shapes[vi.name]:
                dims.add().dim_value = int(s)
    return m


def infer_value_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
                       ) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor that shape inference can resolve (with `shapes` pinned)."""
    m = with_static_inputs(model, shapes) if shapes else model
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return {}
    res = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            res[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    return res


# ---------------------------------------------------------------- constants
def constant_value(t: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
    """Value of a tensor if it is constant: an initializer, a Constant node, or either behind
    Identity/Cast. None for computed (dynamic) tensors."""
    if isinstance(t, gs.Constant):
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


def conv_info(node: gs.Node, index: int, shapes: dict[str, tuple[int, ...]]) -> ConvInfo:
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
    info = ConvInfo(name=node.name, index=index, weight_shape=wshape, group=group, strides=strides,
                    pads=pads or (), dilations=dil, in_shape=in_shape, out_shape=out_shape,
                    has_bias=has_bias, weight=w, bias=b, problem=problem)
    return info


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


def ensure_node_names(graph: gs.Graph) -> None:
    """Give every unnamed node a stable unique name (records and recipes refer to layers by name)."""
    seen = set()
    for i, n in enumerate(graph.nodes):
        if not n.name or n.name in seen:
            n.name = f"{n.op}_{i}" if not n.name else f"{n.name}_{i}"
        seen.add(n.name)


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
    try:
        return model.ByteSize()
    except Exception:
        return -1


def has_quantized_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})


def fixed_batch(model: onnx.ModelProto, name: str) -> int | None:
    """The model's batch size for input `name` when its batch dim is static, else None."""
    for vi in model.graph.input:
        if vi.name == name and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            if d0.HasField("dim_value") and d0.dim_value > 0:
                return int(d0.dim_value)
    return None


def open_batch_shape(model: onnx.ModelProto, name: str, concrete: tuple[int, ...]) -> tuple:
    """`concrete` with its batch dim left open (None) when the model's batch dim is dynamic."""
    return tuple(concrete) if fixed_batch(model, name) else (None,) + tuple(concrete[1:])


def tensor_to_numpy(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)
