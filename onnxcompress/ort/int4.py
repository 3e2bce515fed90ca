"""INT4 weights on ONNX Runtime: Conv weights as per-channel int4 QDQ, MatMul/Gemm weights as `MatMulNBits`.

Every function takes an ``onnx.ModelProto`` and returns a new one (the input is not modified).

* :func:`conv_weights_int4` — weight-only: each Conv weight becomes an INT4 initializer (two values a byte,
  low nibble first) → ``DequantizeLinear(axis=0)`` → Conv; activations stay float. ``ai.onnx``
  DequantizeLinear when the model's opset is ≥ 21 (INT4 entered the standard there), else ORT's contrib
  ``com.microsoft.DequantizeLinear`` (ORT 1.32 runs both; the model's opset is not converted).
* :func:`quantize_int4_static` — int4 Conv weights **with** INT8 activations: ORT ``quantize_static`` in QDQ
  format, weights int8 per channel except the chosen Conv weights, which get ``quant_type=QInt4`` with *our*
  per-channel scales through ``TensorQuantOverrides`` (so a mixed int8/int4 model is one ORT call).
* :func:`matmul_nbits` — MatMul (and Gemm, rewritten to MatMul first) with a constant weight → ORT's
  ``MatMulNBits`` through ``onnxruntime.quantization.matmul_nbits_quantizer`` (4 bits, symmetric, block-wise
  scales along K, block size configurable).

**The grid.** ORT's own symmetric QInt4 rule (``quant_utils.compute_scale_zp`` with ``qmin, qmax = -8, 7``: INT4
has no entry in ORT's symmetric table) uses ``scale = amax/7.5``: the largest positive weight of a channel rounds
to 8 and is clipped to 7, and a dequantized int4 weight is not a fixed point of it (tests/test_qaf.py). Here every
Conv weight uses ``decompose.qaf.INT4``: the full range ``[-8, 7]`` with MSE-chosen per-channel scales, handed to
ORT, so that QAF-fitted factors (``passes/qaf.py`` with ``INT4``) are stored exactly: pass their codes and
scales as ``codes``.

**Version pairing (checked with onnx 1.23 / ORT 1.32).** onnx packs INT4 (data_type 22) two values a byte,
element 2i in the low nibble — the same as ORT's ``pack_bytes_to_4bit``; INT4 tensors need IR version ≥ 10
(raised here); ``MatMulNBitsQuantizer`` raises the IR version itself.

**Speed.** INT4 is a size format on ORT CPU: there is no int4 conv kernel (DequantizeLinear → float Conv runs every
inference: measured 0.54–0.82× FP32 on the digits net), MatMulNBits runs at about FP32 speed (≈1.2× with
``accuracy_level=4``). benchmarks/QAF_INT4.md has the numbers.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..decompose.qaf import INT4, Grid, quantize

__all__ = ["int4_codes", "conv_weights_int4", "quantize_int4_static", "gemm_to_matmul", "matmul_nbits",
           "unpack_int4", "int4_initializers", "opset_of", "int4_conv_weights", "nbits_nodes", "depthwise_convs"]

Codes = Mapping[str, "tuple[np.ndarray, np.ndarray]"]
#: node-name suffix of gemm_to_matmul's MatMul (ORT's quantizer then appends `_Q<bits>`)
_GEMM_SFX = "_MatMul"


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def int4_codes(w: np.ndarray, grid: Grid = INT4) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 0) int4 codes (int8 array in [qmin, qmax]) and float32 scales of a float weight."""
    if grid.qmax > 7 or grid.lo < -8:
        raise ValueError(f"an int4 grid needs -8 <= qmin, qmax <= 7 (got {grid.lo}, {grid.qmax})")
    _, s = quantize(np.asarray(w, dtype=np.float64), grid.along(0))
    s32 = s.astype(np.float32)
    # the codes as ORT computes them from these scales (quant_utils.quantize_nparray: float32 division,
    # round half to even, clip to the int4 range)
    w32 = np.asarray(w, dtype=np.float32)
    q = np.clip(np.round(w32 / s32.reshape((-1,) + (1,) * (w32.ndim - 1))), grid.lo, grid.qmax)
    return q.astype(np.int8), s32


def _pack_int4(q: np.ndarray, name: str) -> TensorProto:
    """INT4 initializer (ONNX packing: element 2i in the low nibble of byte i, 2i+1 in the high nibble)."""
    flat = np.asarray(q, dtype=np.int8).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"{name}: values outside int4")
    u = (flat.astype(np.uint8) & 0x0F)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)


def unpack_int4(t: TensorProto) -> np.ndarray:
    """Signed int values (int8 array, original shape) of a packed INT4 initializer."""
    if t.data_type != TensorProto.INT4:
        raise ValueError(f"{t.name} is not INT4")
    raw = np.frombuffer(t.raw_data, dtype=np.uint8) if t.raw_data else np.asarray(t.int32_data, np.uint8)
    lo, hi = raw & 0x0F, raw >> 4
    u = np.stack([lo, hi], axis=1).ravel()[: int(np.prod(t.dims))]
    return np.where(u > 7, u.astype(np.int16) - 16, u).astype(np.int8).reshape(tuple(t.dims))


def int4_initializers(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Conv nodes with one input channel per group (depthwise): few weights, and at 4 bits per channel a
    3×3 depthwise filter has 9 values for 16 levels (MobileNetV2: top-1 agreement 0.21 → 0.43 when they stay
    int8, benchmarks/QAF_INT4.md)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if group > 1 and inits[n.input[1]].dims[1] == 1:
            out.append(n.name)
    return out


def _conv_weights(model: onnx.ModelProto, include: Iterable[str] | None,
                  exclude: Iterable[str]) -> dict[str, list[onnx.NodeProto]]:
    """Conv weight initializer name -> the Conv nodes reading it (float weights; `include` None: every Conv)."""
    excl, inc = set(exclude), None if include is None else set(include)
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and \
                inits[n.input[1]].data_type == TensorProto.FLOAT:
            out.setdefault(n.input[1], []).append(n)
    # a weight shared with a non-Conv consumer, an excluded or a not-included Conv stays as it is
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    return {w: ns for w, ns in out.items() if users.get(w, 0) == len(ns)
            and not any(x.name in excl for x in ns) and (inc is None or all(x.name in inc for x in ns))}


def conv_weights_int4(model: onnx.ModelProto, *, grid: Grid = INT4, codes: Codes | None = None,
                      nodes_to_include: Iterable[str] | None = None, nodes_to_exclude: Iterable[str] = (),
                      domain: str | None = None) -> onnx.ModelProto:
    """Weight-only int4 for the Conv weights (activations float). ``codes``: per weight name, (int codes,
    per-channel scales) to store as they are (e.g. from QAF); other weights are quantized on ``grid``.
    ``domain``: ``""`` (standard, needs opset ≥ 21) or ``"com.microsoft"``; default by the model's opset."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dom = domain if domain is not None else ("" if opset_of(m) >= 21 else "com.microsoft")
    if dom == "" and opset_of(m) < 21:
        raise ValueError("standard INT4 DequantizeLinear needs opset >= 21 (use domain='com.microsoft')")
    targets = _conv_weights(m, nodes_to_include, nodes_to_exclude)
    inits = {t.name: i for i, t in enumerate(m.graph.initializer)}
    new_inits, new_nodes, value_info, drop = [], [], [], set()
    for wname in targets:
        w = numpy_helper.to_array(m.graph.initializer[inits[wname]])
        if codes is not None and wname in codes:
            q, s = codes[wname]
            q, s = np.asarray(q, np.int8).reshape(w.shape), np.asarray(s, np.float32).ravel()
        else:
            q, s = int4_codes(w, grid)
        new_inits += [_pack_int4(q, f"{wname}_int4"),
                      numpy_helper.from_array(s.astype(np.float32), f"{wname}_int4_scale"),
                      helper.make_tensor(f"{wname}_int4_zp", TensorProto.INT4, [s.size],
                                         np.zeros(s.size, np.int8).tolist())]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{wname}_int4", f"{wname}_int4_scale",
                                                               f"{wname}_int4_zp"],
                                          [f"{wname}_dq"], name=f"{wname}_DequantizeLinear_int4", axis=0, domain=dom))
        # the DequantizeLinear's output shape, for shape inference (it does not know the contrib op)
        value_info.append(helper.make_tensor_value_info(f"{wname}_dq", TensorProto.FLOAT, list(w.shape)))
        drop.add(wname)
    if not drop:
        return m
    for n in m.graph.node:
        for j, i in enumerate(n.input):
            if i in drop:
                n.input[j] = f"{i}_dq"
    keep = [t for t in m.graph.initializer if t.name not in drop]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + new_inits)
    m.graph.value_info.extend(value_info)
    nodes = list(new_nodes) + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if dom == "com.microsoft" and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if m.ir_version < 10:
        m.ir_version = 10      # INT4 tensors need IR 10
    return m


def _int4_overrides(model: onnx.ModelProto, targets, codes: Codes | None, grid: Grid) -> dict:
    """ORT TensorQuantOverrides: per-channel QInt4 with our scales (zero point 0) for each target weight."""
    from onnxruntime.quantization import QuantType

    inits = {t.name: t for t in model.graph.initializer}
    out: dict = {}
    for wname in targets:
        if codes is not None and wname in codes:
            s = np.asarray(codes[wname][1], np.float32).ravel()
        else:
            s = int4_codes(numpy_helper.to_array(inits[wname]), grid)[1]
        out[wname] = [{"axis": 0, "quant_type": QuantType.QInt4, "scale": np.float32(v), "zero_point": np.int8(0)}
                      if i == 0 else {"scale": np.float32(v), "zero_point": np.int8(0)} for i, v in enumerate(s)]
    return out


def quantize_int4_static(model: onnx.ModelProto, reader, *, activations: str = "uint8", grid: Grid = INT4,
                         codes: Codes | None = None, int4_nodes: Iterable[str] | None = None,
                         nodes_to_exclude: Iterable[str] = (), keep_int8: Iterable[str] = (),
                         extra_options: dict | None = None, progress=None) -> tuple[onnx.ModelProto, dict]:
    """INT4 Conv weights + INT8 activations through ORT ``quantize_static`` (QDQ, per channel, MinMax).
    ``int4_nodes``: the Conv nodes whose weights become int4 (None: every Conv not in ``keep_int8``); every
    other weight gets ORT's per-channel int8. ``reader``: an ORT CalibrationDataReader. The int4 weights'
    per-channel scales (ours, see the module doc) are handed to ORT as TensorQuantOverrides so that its integers
    are exactly :func:`int4_codes` (or ``codes``). ``nodes_to_exclude``: left in float.
    Returns (model, facts: int4 weights, opset upgrade)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .quantize import _at_least_opset

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations]
    model, upgraded = _at_least_opset(model, 13)   # per-channel DequantizeLinear needs `axis`
    excluded = list(nodes_to_exclude)
    targets = _conv_weights(model, int4_nodes, excluded + list(keep_int8))
    extra = {"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
             "TensorQuantOverrides": _int4_overrides(model, targets, codes, grid)}
    extra.update(extra_options or {})
    with tempfile.TemporaryDirectory(prefix="onnxcompress-int4-") as td:
        src, pre, dst = Path(td) / "in.onnx", Path(td) / "pre.onnx", Path(td) / "out.onnx"
        onnx.save_model(model, src)
        if progress:
            progress("INT4: ORT quantization pre-processing")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - ONNX shape inference fails on some graphs
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        if progress:
            progress("INT4: calibrating")
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=qt, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded or None, extra_options=extra)
        out = onnx.load(str(dst))
    return out, {"int4_weights": sorted(targets), "opset_upgraded_to": 13 if upgraded else None}


def gemm_to_matmul(model: onnx.ModelProto, only: Iterable[str] | None = None) -> onnx.ModelProto:
    """Gemm (transA = 0, constant B) → MatMul(A, α·B') [+ Add(β·C)], named ``<gemm>_MatMul`` / ``<gemm>_Add``,
    so that MatMulNBits can take it (exact up to float32 rounding of α·B). ``only``: these Gemm nodes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    wanted = None if only is None else set(only)
    out_nodes, new_inits = [], []
    for n in m.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type != "Gemm" or a.get("transA", 0) or n.input[1] not in inits or \
                (wanted is not None and n.name not in wanted):
            out_nodes.append(n)
            continue
        has_c = len(n.input) > 2 and bool(n.input[2])
        beta = float(a.get("beta", 1.0))
        if has_c and beta != 1.0 and n.input[2] not in inits:
            out_nodes.append(n)          # a non-constant C with beta: leave the Gemm alone
            continue
        b = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        b = (b.T if a.get("transB", 0) else b) * np.float32(a.get("alpha", 1.0))
        bname = f"{n.name or n.output[0]}_matmul_B"
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(b), bname))
        mm_out = f"{n.output[0]}_matmul" if has_c else n.output[0]
        out_nodes.append(helper.make_node("MatMul", [n.input[0], bname], [mm_out], name=f"{n.name}{_GEMM_SFX}"))
        if has_c:
            cin = n.input[2]
            if beta != 1.0:
                cname = f"{n.name}_bias"
                new_inits.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[cin]).astype(np.float32) * np.float32(beta), cname))
                cin = cname
            out_nodes.append(helper.make_node("Add", [mm_out, cin], [n.output[0]], name=f"{n.name}_Add"))
    del m.graph.node[:]
    m.graph.node.extend(out_nodes)
    m.graph.initializer.extend(new_inits)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used or t.name in {i.name for i in m.graph.input}]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def matmul_nbits(model: onnx.ModelProto, *, block_size: int = 32, bits: int = 4, symmetric: bool = True,
                 accuracy_level: int | None = None, nodes_to_include: Iterable[str] | None = None,
                 nodes_to_exclude: Iterable[str] = (), convert_gemm: bool = True) -> onnx.ModelProto:
    """MatMul/Gemm weights → ``com.microsoft.MatMulNBits`` (ORT's ``MatMulNBitsQuantizer``, round-to-nearest,
    block-wise scales along K; ``block_size`` a power of two ≥ 16). ``accuracy_level`` 4 lets the CPU kernel
    quantize activations to int8 on the fly (ORT's doc), None/0 keeps float activations. ``nodes_to_include``:
    only these MatMul/Gemm nodes (original names; None: all with a constant 2-D weight)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block size must be a power of two >= 16 (got {block_size})")
    excl = set(nodes_to_exclude)
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm" and n.name not in excl and
             (nodes_to_include is None or n.name in set(nodes_to_include))]
    if convert_gemm and gemms:
        m = gemm_to_matmul(model, gemms)
    else:
        m = onnx.ModelProto()     # ORT's quantizer rewrites the model it is given in place
        m.CopyFrom(model)
    include = None
    if nodes_to_include is not None:
        wanted = set(nodes_to_include)
        include = [n.name for n in m.graph.node if n.op_type == "MatMul" and
                   (n.name in wanted or (n.name.endswith(_GEMM_SFX) and n.name[:-len(_GEMM_SFX)] in wanted))]
        if not include:
            return m
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")   # one INFO line per node
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        q = MatMulNBitsQuantizer(m, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=sorted(excl), nodes_to_include=include)
        q.process()
    finally:
        log.setLevel(level)
    return q.model.model


def nbits_nodes(model: onnx.ModelProto) -> list[str]:
    """The original MatMul/Gemm node names behind every MatMulNBits node."""
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            name = re.sub(r"_Q\d+$", "", n.name)
            out.append(name[:-len(_GEMM_SFX)] if name.endswith(_GEMM_SFX) else name)
    return out


def int4_conv_weights(model: onnx.ModelProto) -> dict[str, str]:
    """{Conv node: its int4 weight initializer} for every Conv whose weight is an INT4 DequantizeLinear."""
    int4 = {t.name for t in int4_initializers(model)}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4}
    return {n.name: dq[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
            and n.input[1] in dq}
