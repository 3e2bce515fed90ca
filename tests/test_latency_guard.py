"""Latency guard (deterministic through an injected timer), rank alignment, one-layer timing models."""
import numpy as np
import pytest

from conftest import conv_model, run_ort
from onnxcompress import Recipe, optimize
from onnxcompress.graph import ConvInfo
from onnxcompress.latency_guard import (LatencyGuard, align_rank, align_ranks, guard_enabled,
                                        layer_model, original_spec, tucker2_chain)
from onnxcompress.passes.tucker2 import Tucker2Pass


def fixed_timer(conv_s, chain_s, calls=None):
    def timer(m_conv, m_chain, info):
        if calls is not None:
            calls.append(info.name)
        n_conv = sum(1 for n in m_conv.graph.node if n.op_type == "Conv")
        n_chain = sum(1 for n in m_chain.graph.node if n.op_type == "Conv")
        assert n_conv == 1 and n_chain == 3       # the original conv vs the Tucker2 chain
        return conv_s, chain_s
    return timer


def _run_pass(timer, ranks=(4, 4)):
    m = conv_model(T=8, S=6, hw=(9, 11), batch=1)
    guard = LatencyGuard(tucker2_chain, timer=timer)
    res = Tucker2Pass(guard.wrap(lambda info: ranks), {"x": (1, 6, 9, 11)}).run(m)
    guard.annotate(res.layers)
    return m, res, guard


def test_guard_keeps_the_conv_when_the_chain_is_slower():
    m, res, guard = _run_pass(fixed_timer(1e-3, 2.5e-3))
    rec = res.layers[0]
    assert not res.modified and res.model is m
    assert rec.skipped == "latency guard: chain 2.50x slower than the conv"
    ext = rec.extra["latency_guard"]
    assert ext["conv_ms"] == 1.0 and ext["chain_ms"] == 2.5 and ext["kept"] == "conv"
    assert ext["in_shape"] == [1, 6, 9, 11]
    assert guard.summary()["kept_conv"] == 1


def test_guard_rewrites_when_the_chain_is_faster():
    m, res, guard = _run_pass(fixed_timer(2e-3, 1e-3))
    rec = res.layers[0]
    assert res.modified and rec.skipped is None and rec.ranks == [4, 4]
    assert rec.extra["latency_guard"]["kept"] == "chain" and rec.extra["latency_guard"]["speedup"] == 2.0
    x = np.random.default_rng(0).standard_normal((1, 6, 9, 11)).astype(np.float32)
    assert run_ort(res.model, {"x": x})[0].shape == run_ort(m, {"x": x})[0].shape


def test_guard_equal_time_keeps_the_conv_and_min_gain():
    _, res, _ = _run_pass(fixed_timer(1e-3, 1e-3))
    assert res.layers[0].skipped.startswith("latency guard: chain 1.00x slower")
    g = LatencyGuard(tucker2_chain, timer=fixed_timer(1.1e-3, 1e-3), min_gain=1.2)
    info = ConvInfo("c", 0, (8, 6, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 6, 9, 11), (1, 8, 9, 11), True)
    assert "only 1.10x faster" in g.check(info, (4, 4))


def test_guard_passes_string_decisions_through_and_caches_equal_shapes():
    calls = []
    g = LatencyGuard(tucker2_chain, timer=fixed_timer(2e-3, 1e-3, calls))
    pol = g.wrap(lambda info: "first conv (skip_first)" if info.index == 0 else (4, 4))
    mk = lambda i: ConvInfo(f"c{i}", i, (8, 6, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 6, 9, 11),
                            (1, 8, 9, 11), True)
    assert pol(mk(0)) == "first conv (skip_first)"
    assert pol(mk(1)) == (4, 4) and pol(mk(2)) == (4, 4)
    assert calls == ["c1"]                                   # same shapes and ranks: timed once
    assert g.measurements["c2"]["cached"] is True
    # an unknown input shape is not blocked, and says so
    info = mk(3)
    info.in_shape = None
    assert pol(info) == (4, 4) and g.measurements["c3"]["measured"] is False


def test_guard_forwards_planner_prepare():
    class Planner:
        def __init__(self):
            self.seen = None

        def prepare(self, infos):
            self.seen = len(infos)

        def __call__(self, info):
            return (4, 4)

    p = Planner()
    w = LatencyGuard(tucker2_chain, timer=fixed_timer(2e-3, 1e-3)).wrap(p)
    w.prepare([1, 2, 3])
    assert p.seen == 3


def test_guard_failing_timer_does_not_block():
    def boom(*a):
        raise RuntimeError("no timer here")
    info = ConvInfo("c", 1, (8, 6, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 6, 9, 11), (1, 8, 9, 11), True)
    g = LatencyGuard(tucker2_chain, timer=boom)
    assert g.check(info, (4, 4)) is None and "timing failed" in g.measurements["c"]["why"]


def test_guard_default_on_for_cpu_only():
    assert guard_enabled(None, ["cpu"]) and not guard_enabled(None, ["cuda", "cpu"])
    assert guard_enabled(True, ["cuda"]) and not guard_enabled(False, ["cpu"])


def test_guard_through_optimize(monkeypatch):
    import onnxcompress.latency_guard as lg

    monkeypatch.setattr(lg, "ort_timer", lambda *a, **k: fixed_timer(1e-3, 3e-3))
    m = conv_model(T=16, S=16, hw=(9, 11), batch=1)
    rep = optimize(m, Recipe(quantize="none", skip_first=False)).report
    assert rep.layers[0]["skipped"] == "latency guard: chain 3.00x slower than the conv"
    assert rep.layers[0]["extra"]["latency_guard"]["chain_ms"] == 3.0
    assert rep.latency["guard"]["kept_conv"] == 1
    monkeypatch.setattr(lg, "ort_timer", lambda *a, **k: fixed_timer(3e-3, 1e-3))
    rep = optimize(m, Recipe(quantize="none", skip_first=False)).report
    assert rep.layers[0]["skipped"] is None
    rep = optimize(m, Recipe(quantize="none", skip_first=False, latency_guard=False)).report
    assert rep.latency is None or "guard" not in rep.latency


def test_real_timer_smoke():
    """The ORT timer on a real layer returns two positive times (no assertion on which is faster)."""
    g = LatencyGuard(tucker2_chain, precision="int8")
    info = ConvInfo("c", 1, (32, 32, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 32, 14, 14), (1, 32, 14, 14), True)
    g.check(info, (16, 16))
    m = g.measurements["c"]
    assert m["measured"] and m["conv_ms"] > 0 and m["chain_ms"] > 0 and m["precision"] == "int8"


# ------------------------------------------------------------------------------------------ layer models
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_layer_models_run(precision):
    import onnx
    info = ConvInfo("c", 1, (12, 8, 3, 3), 1, (2, 2), (1, 1, 1, 1), (1, 1), (1, 8, 10, 10), (1, 12, 5, 5), True)
    for convs in ([original_spec(info)], tucker2_chain(info, (4, 6))):
        m = layer_model(info.in_shape, convs, precision)
        onnx.checker.check_model(m, full_check=True)
        dt = np.uint8 if precision == "int8" else np.float32
        x = np.random.default_rng(0).integers(0, 255, info.in_shape).astype(dt)
        assert run_ort(m, {"x": x})[0].shape == (1, 12, 5, 5)


# ------------------------------------------------------------------------------------------ rank alignment
def test_align_rank():
    assert align_rank(39, 64, 8) == 40 and align_rank(31, 64, 8) == 32 and align_rank(310, 512, 8) == 312
    assert align_rank(60, 64, 8) == 56          # up would be full rank: round down
    assert align_rank(3, 6, 8) == 3             # nothing aligned fits: unchanged
    assert align_rank(5, 64, 8) == 8 and align_rank(39, 64, 1) == 39


def test_align_ranks_policy_and_pipeline():
    pol = align_ranks(lambda info: (39, 77))
    info = ConvInfo("c", 1, (128, 64, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), None, None, True)
    # planned 64·39 + 39·77·9 + 77·128 = 39379 weights; aligned pairs: (40, 72) 37696, (40, 80) 41600,
    # (32, 80) 35328, (32, 72) 31104 → the closest is (40, 72)
    assert pol(info) == (40, 72)
    small = ConvInfo("s", 1, (32, 32, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), None, None, True)
    r3, r4 = align_ranks(lambda info: (19, 20))(small)   # 4668 planned; (16, 16) would be 3328
    assert r3 % 8 == 0 and r4 % 8 == 0 and abs(32 * r3 + 9 * r3 * r4 + 32 * r4 - 4668) < 200
    assert align_ranks(lambda info: "why")(info) == "why"
    m = conv_model(T=64, S=64, hw=(6, 6), batch=1)
    rep = optimize(m, Recipe(quantize="none", skip_first=False, latency_guard=False)).report
    assert all(r % 8 == 0 for r in rep.layers[0]["ranks"])
    rep = optimize(m, Recipe(quantize="none", skip_first=False, latency_guard=False, rank_multiple=1)).report
    assert any(r % 8 for r in rep.layers[0]["ranks"])      # the planner's own ranks, e.g. 38, 39
