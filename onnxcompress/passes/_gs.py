"""onnx-graphsurgeon round trip that keeps what gs drops (model metadata, producer, ir_version)."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..graph import ensure_node_names


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    g = gs.import_onnx(model)
    ensure_node_names(g)
    return g


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    m = gs.export_onnx(graph, do_type_check=False)
    m.ir_version = like.ir_version
    m.producer_name = like.producer_name or "onnxcompress"
    m.producer_version = like.producer_version
    m.domain = like.domain
    m.model_version = like.model_version
    m.doc_string = like.doc_string
    del m.metadata_props[:]
    m.metadata_props.extend(like.metadata_props)
    # keep the original opset imports (gs may drop unused domains)
    have = {o.domain for o in m.opset_import}
    for o in like.opset_import:
        if o.domain not in have:
            m.opset_import.append(o)
    return m
