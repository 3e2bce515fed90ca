"""Do two models have the same inputs and outputs? `validate` compares an optimized model with its original
and refuses pairs that cannot be the same network (different output names, ranks, static dims or element
types) unless forced. Symbolic dims match anything (a dynamic batch vs a fixed one is the same model)."""
from __future__ import annotations

import onnx


def _sig(vi: onnx.ValueInfoProto) -> tuple[int, list]:
    tt = vi.type.tensor_type
    dims = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return tt.elem_type, dims


def _fmt(vi: onnx.ValueInfoProto) -> str:
    et, dims = _sig(vi)
    t = onnx.helper.tensor_dtype_to_np_dtype(et).name if et else "?"
    return f"{vi.name} {t}[{'x'.join(str(d) for d in dims)}]" if dims is not None else f"{vi.name} {t}"


def _same(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    (ea, da), (eb, db) = _sig(a), _sig(b)
    if ea and eb and ea != eb:
        return False
    if da is None or db is None:
        return True
    if len(da) != len(db):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int) and x and y and x != y) for x, y in zip(da, db))


def io_mismatch(m0: onnx.ModelProto, m1: onnx.ModelProto) -> str | None:
    """None when the graph inputs (initializers aside) and outputs agree in order, name, element type, rank
    and static dims; else one line saying where they differ."""
    def ins(m):
        inits = {t.name for t in m.graph.initializer}
        return [i for i in m.graph.input if i.name not in inits]

    for what, a, b in (("inputs", ins(m0), ins(m1)), ("outputs", list(m0.graph.output), list(m1.graph.output))):
        if len(a) != len(b):
            return (f"the models' {what} differ: {len(a)} vs {len(b)} "
                    f"({', '.join(_fmt(v) for v in a)} vs {', '.join(_fmt(v) for v in b)})")
        for x, y in zip(a, b):
            if x.name != y.name or not _same(x, y):
                return f"the models' {what} differ: {_fmt(x)} vs {_fmt(y)}"
    return None
