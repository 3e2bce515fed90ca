"""Static tensor shapes of a model: concrete input shapes (overrides, dynamic batch), every value's shape
by ONNX shape inference, batch-dimension facts."""
from __future__ import annotations

import onnx

from ..errors import UserError


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
    return _pin_inputs(m, shapes)


def _pin_inputs(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for s in shapes[vi.name]:
                dims.add().dim_value = int(s)
    return m


def infer_value_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
                       ) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor that shape inference can resolve (with `shapes` pinned).

    Runs on a weightless copy (small and integer initializers keep their data for data propagation): copying
    and serialising the full model here cost 3-4x its size in memory, and over 2 GB it cannot be serialised."""
    from .modelio import weightless_copy

    m = weightless_copy(model, keep_small=True)
    if shapes:
        m = _pin_inputs(m, shapes)
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
