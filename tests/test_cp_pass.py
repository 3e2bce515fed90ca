"""CP4 / CP3 pass (passes/cp.py): exact chains on ORT, κ after EPC, FP32-exact balancing/equalisation,
INT8 on the trained digits net, fallbacks, recipe ranks, skip reasons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import conv_model, rel_err, run_ort
from onnxcompress.errors import UserError
from onnxcompress.ir.layers import conv_info
from onnxcompress.ir.shapes import infer_value_shapes
from onnxcompress.ir.surgery import import_graph
from onnxcompress.ort.capture import channel_ranges
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.cp import CPPass, cp_problem
from onnxcompress.passes.int8 import QuantizeInt8
from onnxcompress.ort.quantize import _quantized_nodes, int8_format_for
from onnxcompress.passes.registry import cost_models
from onnxcompress.planning.planner import Planner
from onnxcompress.recipe import LayerOverride, Recipe

MODELS = Path(__file__).resolve().parents[1] / "models"


def _lowrank_model(T=12, S=10, R=5, kernel=(3, 3), hw=(9, 11), seed=0, **kw):
    m = conv_model(T=T, S=S, kernel=kernel, hw=hw, batch=2, **kw)
    rng = np.random.default_rng(seed)
    fs = [rng.standard_normal((n, R)) for n in (T, S) + tuple(kernel)]
    letters = "hwd"[:len(kernel)]
    w = np.einsum(f"tr,sr,{',' .join(c + 'r' for c in letters)}->ts{letters}", *fs).astype(np.float32)
    for t in m.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(w, "W"))
    return m


def _x(S=10, hw=(9, 11), batch=2):
    return np.random.default_rng(1).standard_normal((batch, S) + tuple(hw)).astype(np.float32)


EXACT = dict(n_iter_max=1500, tol=1e-12, dtype=np.float64)
CASES = [
    dict(kernel=(3, 3)),
    dict(kernel=(3, 3), strides=(2, 1), pads=(1, 2, 0, 1), dilations=(1, 2)),
    dict(kernel=(3, 5), auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(kernel=(2, 3), pads=(1, 0, 0, 1), dilations=(2, 1), bias=False),
]


@pytest.mark.parametrize("variant", ["cp4", "cp3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_chain_exact_on_lowrank_kernel(variant, case):
    m = _lowrank_model(**case)
    x = _x()
    res = CPPass(lambda i: 5, {"x": x.shape}, variant=variant, **EXACT).run(m)
    onnx.checker.check_model(res.model, full_check=True)
    assert rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5
    rec = res.layers[0]
    assert res.lossless and rec.ranks == [5] and rec.weight_rel_error < 1e-6
    sfx = ["cp_in", "cp_v", "cp_h", "cp_out"] if variant == "cp4" else ["cp_in", "cp_dw", "cp_out"]
    nodes = {n.name: n for n in res.model.graph.node}
    assert list(nodes) == [f"conv/{s}" for s in sfx] and rec.new_nodes == list(nodes)
    # only the last conv carries the bias
    assert all(len(n.input) == 2 for n in list(nodes.values())[:-1])
    assert len(nodes["conv/cp_out"].input) == (3 if case.get("bias", True) else 2)
    # params / MACs
    kh, kw = case["kernel"]
    mid = kh + kw if variant == "cp4" else kh * kw
    assert rec.params_after == 5 * (10 + mid + 12) + (12 if case.get("bias", True) else 0)
    if variant == "cp4":
        v = nodes["conv/cp_v"]
        attrs = {a.name: list(a.ints) if a.ints else a.i for a in v.attribute}
        assert attrs["group"] == 5 and attrs["kernel_shape"] == [kh, 1]


def test_cp3_conv1d_exact_and_cp4_skips_it():
    m = _lowrank_model(kernel=(3,), hw=(13,), strides=(2,), pads=(1, 0))
    x = _x(hw=(13,))
    res = CPPass(lambda i: 5, {"x": x.shape}, variant="cp3", **EXACT).run(m)
    assert rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5
    res4 = CPPass(lambda i: 5, {"x": x.shape}, variant="cp4").run(m)
    assert not res4.modified and "2-D kernel" in res4.layers[0].skipped


def _decaying_model(T=32, S=32, seed=0):
    m = conv_model(T=T, S=S, kernel=(3, 3), hw=(8, 8), batch=2, pads=(1, 1, 1, 1))
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((T, S, 3, 3))
    g *= (np.arange(1.0, T + 1) ** -0.7)[:, None, None, None] * (np.arange(1.0, S + 1) ** -0.7)[None, :, None, None]
    q1, q2 = np.linalg.qr(rng.standard_normal((T, T)))[0], np.linalg.qr(rng.standard_normal((S, S)))[0]
    w = np.einsum("abhw,ta,sb->tshw", g, q1, q2).astype(np.float32)
    for t in m.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(w, "W"))
    return m


def test_graph_level_kappa_epc():
    m = _decaying_model()
    shp = {"x": (2, 32, 8, 8)}
    als = CPPass(lambda i: 24, shp, use_epc=False).run(m).layers[0]
    ep = CPPass(lambda i: 24, shp, use_epc=True).run(m).layers[0]
    assert als.extra["kappa"] == pytest.approx(ep.extra["kappa_als"])
    assert ep.extra["kappa_epc"] <= ep.extra["kappa_als"] + 1e-9
    assert ep.extra["kappa"] == ep.extra["kappa_epc"] and ep.extra["kappa_als"] > 1.5   # degenerate start
    assert ep.extra["kappa_epc"] < 0.9 * ep.extra["kappa_als"]
    assert ep.weight_rel_error <= als.weight_rel_error + 1e-4      # error preserved (fp32 GEMMs)


@pytest.mark.parametrize("variant", ["cp4", "cp3"])
def test_balance_and_equalisation_leave_fp32_outputs_unchanged(variant):
    m = _decaying_model()
    rng = np.random.default_rng(3)
    calib = [rng.standard_normal((2, 32, 8, 8)).astype(np.float32) * rng.uniform(0.1, 3, (1, 32, 1, 1)).astype(np.float32)
             for _ in range(3)]
    x = {"x": calib[0]}
    kw = dict(variant=variant, use_epc=True, dtype=np.float64)
    base = CPPass(lambda i: 16, {"x": (2, 32, 8, 8)}, balance="none", equalize="none", **kw).run(m)
    y0 = run_ort(base.model, x)[0]
    for bal in ("equal", "sqrt_size"):
        for eq in ("none", "data-free", "data"):
            p = CPPass(lambda i: 16, {"x": (2, 32, 8, 8)}, balance=bal, equalize=eq,
                       calibration=lambda: ({"x": c} for c in calib), **kw)
            res = p.run(m)
            assert rel_err(y0, run_ort(res.model, x)[0]) <= 1e-6, (bal, eq)
            rec = res.layers[0]
            assert "activation_ranges" in rec.extra
            if eq == "data":
                mids = [f"{n}_out" for n in rec.new_nodes[:-1]]
                st = channel_ranges(res.model, mids, lambda: ({"x": c} for c in calib))
                for t in mids[:-1]:   # z1 (and z2): every channel at the same range
                    am = np.maximum(-st[t][0], st[t][1])
                    assert am.max() / np.median(am) == pytest.approx(1.0, abs=1e-3)
                assert set(rec.extra["activation_ranges_equalized"]) == {t.rsplit("/", 1)[-1] for t in mids}


def _digits_folded():
    from onnxcompress.passes.fold_bn import FoldBatchNorm
    return FoldBatchNorm().run(onnx.load(MODELS / "digits_cnn.onnx")).model


class _Reader:
    def __init__(self, x):
        self.b = [x[i:i + 16] for i in range(0, len(x), 16)]

    def get_next(self):
        return {"input": self.b.pop(0)} if self.b else None

    def rewind(self):  # pragma: no cover
        pass


def test_cp4_int8_digits_stabilised_beats_plain_als():
    """INT8 noise added to the CP4-decomposed trained net: EPC + balancing + equalisation < plain ALS."""
    from onnxcompress.decompose.cp import cp4_rank_for_ratio

    folded = _digits_folded()
    calib = np.load(MODELS / "digits_calib.npz")["x"].astype(np.float32)
    xt = np.load(MODELS / "digits_test.npz")["x"].astype(np.float32)[:120]
    shp = {"input": (1, 1, 16, 16)}

    def policy(info):
        return "stem" if info.index == 0 else cp4_rank_for_ratio(info.T, info.S, 3, 3, 3.0)

    def penalty(model):
        q = QuantizeInt8(lambda: _Reader(calib), int8_format_for("cpu")).run(model).model
        y32, y8 = run_ort(model, {"input": xt})[0], run_ort(q, {"input": xt})[0]
        return rel_err(y32, y8)

    plain = CPPass(policy, shp, use_epc=False, balance="none", equalize="none").run(folded)
    good = CPPass(policy, shp, use_epc=True, balance="sqrt_size", equalize="data",
                  calibration=lambda: ({"input": calib[i:i + 16]} for i in range(0, 64, 16))).run(folded)
    kp = max(l.extra["kappa"] for l in plain.layers if l.skipped is None)
    kg = max(l.extra["kappa"] for l in good.layers if l.skipped is None)
    assert kg < kp
    assert penalty(good.model) < 0.8 * penalty(plain.model)   # measured 0.040 vs 0.060


def test_fallback_keep_float_through_pipeline_and_recipe_ranks():
    from onnxcompress.pipeline import optimize

    recipe = Recipe(method="cp4", ratio=3, cp_fallback="keep-float", cp_kappa_max=1e-3, verify=False,
                    latency_guard=False, rank_multiple=1,
                    calibration=str(MODELS / "digits_calib.npz"), eval_data=str(MODELS / "digits_test.npz"),
                    eval_samples=64, calibration_samples=16,
                    layers={"/stage1/conv1/Conv": LayerOverride(ranks=[7]),
                            "/stage2/conv2/Conv": LayerOverride(skip=True)})
    res = optimize(MODELS / "digits_cnn.onnx", recipe)
    layers = {l["name"]: l for l in res.report.layers}
    assert layers["/stage1/conv1/Conv"]["ranks"] == [7]
    assert layers["/stage2/conv2/Conv"]["skipped"] == "skipped by the recipe"
    assert "too few input channels" in layers["/stem/stem.0/Conv"]["skipped"]
    # 1x1 convs get SVD under every k×k method (the planner wires all methods alike)
    assert layers["/stage2/shortcut/shortcut.0/Conv"]["method"] == "svd"
    done = [l for l in res.report.layers if l["skipped"] is None and l["method"] == "cp4"]
    assert len(done) == 5 and all(l["extra"]["fallback"] == "keep-float" for l in done)
    assert all(l["extra"]["equalize"] == "data" and "activation_ranges" in l["extra"] for l in done)
    g = res.model.graph
    inits = {t.name for t in g.initializer}
    cp_nodes = [n for n in g.node if "/cp_" in n.name]
    assert len(cp_nodes) == 20
    assert all(n.input[1] in inits for n in cp_nodes)            # float weights, no DequantizeLinear
    q_inputs = {n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    assert not any(n.output[0] in q_inputs for n in cp_nodes[:-1] if not n.name.endswith("cp_out"))
    quantized = {n for n, _ in _quantized_nodes(res.model)}
    assert "/stage2/conv2/Conv" in quantized                     # the rest is INT8


def _one_conv_int8(fallback):
    m = _decaying_model()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8, 32, 8, 8)).astype(np.float32)
    p = CPPass(lambda i: 24, {"x": (2, 32, 8, 8)}, int8=True, fallback=fallback, kappa_max=1e-3)
    res = p.run(m)
    q = QuantizeInt8(lambda: _ReaderX(calib), int8_format_for("cpu"))
    return res, q.run(res.model, PassContext(handoff=res.handoff)).model


class _ReaderX(_Reader):
    def __init__(self, x):
        self.b = [x[i:i + 2] for i in range(0, len(x), 2)]

    def get_next(self):
        return {"x": self.b.pop(0)} if self.b else None


def test_fallback_int16_and_tucker2():
    res, q = _one_conv_int8("int16")
    inits = {t.name: t for t in q.graph.initializer}
    zp = {n.input[0]: onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type)
          for n in q.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    mids = [t for t in zp if "/cp_" in t and t.endswith("_out")]
    assert len(mids) == 3 and all(zp[t].itemsize == 2 for t in mids)
    assert zp["x"].itemsize == 1
    res, q = _one_conv_int8("tucker2")
    rec = res.layers[0]
    assert rec.method == "tucker2" and len(rec.ranks) == 2 and rec.extra["fallback"] == "tucker2"
    assert rec.params_after <= 24 * (32 + 3 + 3 + 32) + 32
    assert [n.name for n in res.model.graph.node] == ["conv/t2_in", "conv/t2_core", "conv/t2_out"]


@pytest.mark.parametrize("kw,reason", [
    (dict(group=2, S=8), "grouped"), (dict(group=6, S=6, T=6), "depthwise"),
    (dict(kernel=(1, 1)), "1x1"), (dict(S=3), "too few input channels")])
def test_skipped_layers_have_reasons(kw, reason):
    m = conv_model(**kw)
    res = CPPass(lambda i: 4, None).run(m)
    assert not res.modified and reason in res.layers[0].skipped


def _planned(recipe, info):
    return Planner(recipe, cost_models()).plan([info]).layers[info.name]


def test_planner_ratio_override_and_errors():
    """The one planner with the CP cost models: rank for a ratio, per-layer ratio, bad explicit ranks, a
    per-layer method override, EVBMF (R >= the Tucker2 EVBMF ranks)."""
    m = conv_model(T=32, S=32, hw=(8, 8))
    g = import_graph(m)
    info = conv_info([n for n in g.nodes if n.op == "Conv"][0], 1, infer_value_shapes(m))
    kw = dict(rank_multiple=1, skip_first=False)
    assert _planned(Recipe(method="cp4", ratio=4, **kw), info).ranks == (32 * 32 * 9 // (4 * (32 + 6 + 32)),)
    assert _planned(Recipe(method="cp3", ratio=4, **kw), info).ranks == (32 * 32 * 9 // (4 * (32 + 9 + 32)),)
    r = Recipe(method="cp4", layers={"conv": LayerOverride(ratio=2)}, **kw)
    assert _planned(r, info).ranks == (32 * 32 * 9 // (2 * 70),)
    with pytest.raises(UserError):
        _planned(Recipe(method="cp4", layers={"conv": LayerOverride(ranks=[3, 4])}, **kw), info)
    lp = _planned(Recipe(method="cp4", layers={"conv": LayerOverride(method="tucker2")}, **kw), info)
    assert lp.method == "tucker2" and len(lp.ranks) == 2
    v = _planned(Recipe(method="cp4", rank="vbmf", **kw), info)
    assert v.ranks is not None or "EVBMF" in v.reason
    assert cp_problem(info, "cp4") is None


def test_cli_flags_reach_the_recipe():
    from onnxcompress.cli import build_parser
    from onnxcompress.cli.optimize import recipe_flags

    a = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--method", "cp3", "--no-cp-epc",
                                   "--cp-balance", "equal", "--cp-equalize", "data", "--cp-fallback", "int16",
                                   "--cp-kappa-max", "5"])
    flags = recipe_flags(a)
    r = Recipe.from_dict(flags)
    assert (r.cp_epc, r.cp_balance, r.cp_equalize, r.cp_fallback, r.cp_kappa_max) == (False, "equal", "data", "int16", 5)
    with pytest.raises(UserError):
        Recipe(cp_fallback="bogus").validate()
