"""Graph surgery: the onnx-graphsurgeon round trip that keeps what gs drops (model metadata, producer,
ir_version), stable node names."""
from __future__ import annotations

import onnx
import numpy as np
import onnx_graphsurgeon as gs



def import_graph(model: onnx.ModelProto) -> gs.Graph:
    g = gs.import_onnx(model)
    ensure_node_names(g)
    return g


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` as a ModelProto with `like`'s model-level fields (ir_version, producer, metadata, opset imports gs
    drops). Fills the ModelProto directly, one weight at a time: gs.export_onnx builds a GraphProto (one copy of
    every weight) that make_model then copies into the ModelProto (a second)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    m = onnx.ModelProto()
    g = m.graph
    g.name = graph.name or ""
    if graph.doc_string:
        g.doc_string = graph.doc_string
    g.node.extend(OnnxExporter.export_node(n) for n in graph.nodes)
    g.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    g.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensors = graph.tensors()
    for t in tensors.values():
        if isinstance(t, gs.Constant):
            if isinstance(t._values, gs.ir.tensor.SparseValues):
                g.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(t))
            else:
                g.initializer.append(OnnxExporter.export_tensor_proto(t))
    io = {t.name for t in graph.inputs + graph.outputs}
    g.value_info.extend(OnnxExporter.export_value_info_proto(t, False) for n, t in tensors.items()
                        if n not in io and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None))
    m.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
    m.opset_import.extend(update_import_domains(graph))
    m.ir_version = like.ir_version
    m.producer_name = like.producer_name or "onnxcompress"
    m.producer_version = like.producer_version
    m.domain = like.domain
    m.model_version = like.model_version
    m.doc_string = like.doc_string
    m.metadata_props.extend(like.metadata_props)
    # keep the original opset imports (gs may drop unused domains)
    have = {o.domain for o in m.opset_import}
    for o in like.opset_import:
        if o.domain not in have:
            m.opset_import.append(o)
    return m


def ensure_node_names(graph: gs.Graph) -> None:
    """Give every unnamed node a stable unique name (records and recipes refer to layers by name)."""
    seen = set()
    for i, n in enumerate(graph.nodes):
        if not n.name or n.name in seen:
            n.name = f"{n.op}_{i}" if not n.name else f"{n.name}_{i}"
        seen.add(n.name)


def pointwise_attrs(nd: int, strides=None, pads=None) -> dict:
    """Attributes of a 1×1 (pointwise) conv over `nd` spatial dims."""
    ones = [1] * nd
    return {"kernel_shape": ones, "strides": list(strides) if strides is not None else ones,
            "pads": list(pads) if pads is not None else [0] * (2 * nd), "dilations": ones, "group": 1}


def replace_with_convs(g: gs.Graph, node: gs.Node, convs, bias=None) -> list[str]:
    """Replace the Conv `node` by a chain of Conv nodes: `convs` = [(suffix, attrs, weight)], in order; node
    i is named `<node>/<suffix>`, its weight `<name>_W`, its output `<name>_out` (the last one writes the
    node's output). Only the last conv gets `bias` (`<name>_B`): intermediate convs must stay bias-free for
    zero padding to remain exact (ALGORITHMS.md §1.1). Returns the new node names."""
    x, y = node.inputs[0], node.outputs[0]
    cur, names, new = x, [], []
    for i, (suffix, attrs, w) in enumerate(convs):
        nm = f"{node.name}/{suffix}"
        last = i == len(convs) - 1
        out = y if last else gs.Variable(f"{nm}_out", dtype=x.dtype)
        ins = [cur, gs.Constant(f"{nm}_W", np.ascontiguousarray(w))]
        if last and bias is not None:
            ins.append(gs.Constant(f"{nm}_B", np.asarray(bias, dtype=w.dtype)))
        new.append(gs.Node("Conv", nm, attrs=dict(attrs), inputs=ins, outputs=[out]))
        names.append(nm)
        cur = out
    node.inputs.clear()
    node.outputs.clear()
    g.nodes.extend(new)
    return names
