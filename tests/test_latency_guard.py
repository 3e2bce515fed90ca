"""Latency guard over the plan (deterministic through an injected timer), rank alignment in the planner,
one-layer timing models."""
import numpy as np
import pytest

from conftest import conv_model, run_ort
from onnxcompress import Recipe, optimize
from onnxcompress.ir.layers import ConvInfo, collect_layers, conv_spec
from onnxcompress.ir.shapes import input_shapes
from onnxcompress.passes.registry import cost_models
from onnxcompress.passes.tucker2 import COST as T2
from onnxcompress.planning.latency_guard import LatencyGuard, guard_enabled, layer_model
from onnxcompress.planning.planner import MAX_ALIGN_OVERSHOOT, Planner


def fixed_timer(conv_s, chain_s, calls=None, n_chain=3):
    """Per-copy times; a small layer is timed as k copies (one conv per copy in the original's model)."""
    def timer(m_conv, m_chain, name):
        if calls is not None:
            calls.append(name)
        k = sum(1 for n in m_conv.graph.node if n.op_type == "Conv")
        assert sum(1 for n in m_chain.graph.node if n.op_type == "Conv") == n_chain * k
        return conv_s * k, chain_s * k
    return timer


def _guarded_plan(timer, ranks=(4, 4), **kw):
    m = conv_model(T=8, S=6, hw=(9, 11), batch=1)
    layers = collect_layers(m, input_shapes(m))
    plan = Planner(Recipe(quantize="none", skip_first=False, rank_multiple=1), cost_models()).plan(layers)
    plan.layers["conv"].ranks = tuple(ranks)
    guard = LatencyGuard(timer=timer, **kw)
    guard.apply(plan, layers, cost_models())
    return plan.layers["conv"], guard


def test_guard_keeps_the_layer_when_the_chain_is_slower():
    lp, guard = _guarded_plan(fixed_timer(1e-3, 2.5e-3))
    assert lp.ranks is None and lp.reason == "latency guard: chain 2.50x slower than the conv"
    ext = lp.extra["latency_guard"]
    assert ext["conv_ms"] == 1.0 and ext["chain_ms"] == 2.5 and ext["kept"] == "conv"
    assert ext["in_shape"] == [1, 6, 9, 11]
    assert guard.summary()["kept_conv"] == 1


def test_guard_rewrites_when_the_chain_is_faster():
    lp, _ = _guarded_plan(fixed_timer(2e-3, 1e-3))
    assert lp.ranks == (4, 4) and lp.extra["latency_guard"]["kept"] == "chain"
    assert lp.extra["latency_guard"]["speedup"] == 2.0


def test_guard_equal_time_keeps_the_conv_and_min_gain():
    lp, _ = _guarded_plan(fixed_timer(1e-3, 1e-3))
    assert lp.reason.startswith("latency guard: chain 1.00x slower")
    lp, _ = _guarded_plan(fixed_timer(1.1e-3, 1e-3), min_gain=1.2)
    assert "only 1.10x faster" in lp.reason
    lp, _ = _guarded_plan(fixed_timer(1.03e-3, 1e-3))            # 3 % faster: not the 5 % a chain must beat
    assert lp.ranks is None and "1.03x" in lp.reason


def test_guard_caches_equal_shapes_and_does_not_block_unknown_shapes():
    calls = []
    g = LatencyGuard(timer=fixed_timer(2e-3, 1e-3, calls))
    info = ConvInfo("c", 1, (8, 6, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 6, 9, 11), (1, 8, 9, 11), True)
    orig, chain = [conv_spec(info)], T2.chain(info, (4, 4))
    assert g.check("c1", info.in_shape, orig, chain) is None
    assert g.check("c2", info.in_shape, orig, chain) is None
    assert set(calls) == {"c1"} and g.measurements["c2"]["cached"] == "run"   # same shapes and ranks: timed once
    assert g.check("c3", None, orig, chain) is None and g.measurements["c3"]["measured"] is False


def test_guard_failing_timer_does_not_block():
    def boom(*a):
        raise RuntimeError("no timer here")
    info = ConvInfo("c", 1, (8, 6, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 6, 9, 11), (1, 8, 9, 11), True)
    g = LatencyGuard(timer=boom)
    assert g.check("c", info.in_shape, [conv_spec(info)], T2.chain(info, (4, 4))) is None
    assert "timing failed" in g.measurements["c"]["why"]


def test_guard_default_on_for_cpu_only():
    assert guard_enabled(None, ["cpu"]) and not guard_enabled(None, ["cuda", "cpu"])
    assert guard_enabled(True, ["cuda"]) and not guard_enabled(False, ["cpu"])


def test_guard_through_optimize_for_every_method(monkeypatch):
    """The guard runs over the plan for every method: Tucker2 (3 convs) and CP4 (4 convs) alike; explicit
    per-layer ranks are exempt."""
    import onnxcompress.planning.latency_guard as lg

    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", "off")     # each run times anew: the fake timer changes
    m = conv_model(T=16, S=16, hw=(9, 11), batch=1)
    for method, n_chain in (("tucker2", 3), ("cp4", 4)):
        monkeypatch.setattr(lg, "ort_timer", lambda *a, **k: fixed_timer(1e-3, 3e-3, n_chain=n_chain))
        rep = optimize(m, Recipe(method=method, quantize="none", skip_first=False, rank_multiple=1)).report
        assert rep.layers[0]["skipped"] == "latency guard: chain 3.00x slower than the conv", method
        assert rep.layers[0]["extra"]["latency_guard"]["chain_ms"] == 3.0
        assert rep.latency["guard"]["kept_conv"] == 1
        monkeypatch.setattr(lg, "ort_timer", lambda *a, **k: fixed_timer(3e-3, 1e-3, n_chain=n_chain))
        rep = optimize(m, Recipe(method=method, quantize="none", skip_first=False, rank_multiple=1)).report
        assert rep.layers[0]["skipped"] is None
    monkeypatch.setattr(lg, "ort_timer", lambda *a, **k: fixed_timer(1e-3, 3e-3))
    rep = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False,
                             layers={"conv": {"ranks": [8, 8]}})).report
    assert rep.layers[0]["ranks"] == [8, 8]                        # explicit ranks: not guarded
    rep = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, latency_guard=False)).report
    assert rep.latency is None or "guard" not in rep.latency


def test_real_timer_smoke():
    """The ORT timer on a real layer returns two positive times (no assertion on which is faster)."""
    g = LatencyGuard(precision="int8")
    info = ConvInfo("c", 1, (32, 32, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 32, 14, 14), (1, 32, 14, 14), True)
    g.check("c", info.in_shape, [conv_spec(info)], T2.chain(info, (16, 16)))
    m = g.measurements["c"]
    assert m["measured"] and m["conv_ms"] > 0 and m["chain_ms"] > 0 and m["precision"] == "int8"


# ------------------------------------------------------------------------------------------ layer models
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_layer_models_run(precision):
    import onnx
    info = ConvInfo("c", 1, (12, 8, 3, 3), 1, (2, 2), (1, 1, 1, 1), (1, 1), (1, 8, 10, 10), (1, 12, 5, 5), True)
    for convs in ([conv_spec(info)], T2.chain(info, (4, 6)), cost_models()["cp4"].chain(info, (5,))):
        m = layer_model(info.in_shape, convs, precision)
        onnx.checker.check_model(m, full_check=True)
        dt = np.uint8 if precision == "int8" else np.float32
        x = np.random.default_rng(0).integers(0, 255, info.in_shape).astype(dt)
        assert run_ort(m, {"x": x})[0].shape == (1, 12, 5, 5)


# ------------------------------------------------------------------------------------------ rank alignment
def _plan_one(info, **kw):
    kw.setdefault("skip_first", False)
    return Planner(Recipe(**kw), cost_models()).plan([info]).layers[info.name]


def test_alignment_picks_the_closest_size_never_more_than_one_step_below():
    info = ConvInfo("c", 1, (128, 64, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), None, None, True)
    lp = _plan_one(info, layers={"c": {"ratio": 2.5}})
    planned = lp.planned
    assert lp.ranks is not None and all(r % 8 == 0 for r in lp.ranks)
    assert all(a >= (p // 8) * 8 for a, p in zip(lp.ranks, planned))       # at most one step below
    goal = T2.weights(info, planned)
    opts = [(a, b) for a in {(planned[0] // 8) * 8, -(-planned[0] // 8) * 8}
            for b in {(planned[1] // 8) * 8, -(-planned[1] // 8) * 8}]
    best = min(abs(T2.weights(info, o) - goal) for o in opts)
    assert abs(T2.weights(info, lp.ranks) - goal) == best
    assert _plan_one(info, layers={"c": {"ranks": [39, 77]}}).ranks == (39, 77)   # explicit: as written
    assert _plan_one(info, layers={"c": {"ratio": 2.5}}, rank_multiple=1).ranks == planned


def test_alignment_never_overshoots_and_keeps_a_layer_no_aligned_rank_fits():
    """The issue's case: a 16x32 1x1 conv at ratio 1.01 — rank 8 would make it 1.33x, rank 16 would not shrink
    it: kept, with the reason, instead of silently over-compressed."""
    from onnx import TensorProto, helper, numpy_helper

    W = np.random.default_rng(0).standard_normal((16, 32, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="pw")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
                          [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    info = collect_layers(m, input_shapes(m))[0]
    lp = _plan_one(info, method="svd", ratio=1.01)
    assert lp.ranks is None and "no rank aligned to 8" in lp.reason and "1.33x" in lp.reason
    assert _plan_one(info, method="svd", ratio=1.01, rank_multiple=1).ranks == (10,)


@pytest.mark.parametrize("ratio", [1.25, 1.5, 2, 3])
def test_uniform_ratio_never_ends_beyond_125_percent_on_a_real_network(ratio):
    """Whole network, every layer checked against the plan: with uniform --ratio R no decomposed layer ends
    beyond 1.25 R, for every method (the digits model: 3x3 convs, 1x1 shortcuts)."""
    from pathlib import Path

    from onnxcompress.ir.modelio import load_model
    from onnxcompress.passes.fold_bn import FoldBatchNorm

    m = FoldBatchNorm().run(load_model(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx")).model
    layers = collect_layers(m, input_shapes(m))
    cms = cost_models()
    for method in ("tucker2", "cp4", "cp3", "svd"):
        plan = Planner(Recipe(method=method, ratio=ratio), cms).plan(layers)
        done = [(i, plan.layers[i.name]) for i in layers if plan.layers[i.name].ranks is not None]
        for info, lp in done:
            c = cms[lp.method]
            got = c.weights(info, None) / c.weights(info, lp.ranks)
            assert got <= MAX_ALIGN_OVERSHOOT * ratio + 1e-9, (method, info.name, lp.ranks, got)
            assert got > 1
