"""The latency guard decides the same way every time: timing rounds until the verdict is clear, a 5 % margin
the chain must beat (a tie keeps the conv), and a per-machine disk cache of the rounds."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import conv_model
from onnxcompress import Recipe, optimize
from onnxcompress.ir.layers import ConvInfo, conv_spec
from onnxcompress.passes.tucker2 import COST as T2
from onnxcompress.planning.latency_cache import MAX_ROUNDS, MIN_ROUNDS, TimingCache, decide
from onnxcompress.planning.latency_guard import LatencyGuard

# true speedups of the chain over its conv, one layer each: far below, near and far above the 1.05 margin
GAINS = [0.6, 0.9, 0.97, 1.0, 1.02, 1.04, 1.2, 1.5, 2.5]


def _info(i: int) -> ConvInfo:
    """Layer i: its own input shape, so that no two layers share a timing (big enough to be timed alone)."""
    hw = 28 + i
    return ConvInfo(f"layer{i}", i, (64, 64, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 64, hw, hw),
                    (1, 64, hw, hw), True)


def noisy_timer(seed: int, calls: list | None = None):
    """One round = the fastest of a handful of runs on a loaded machine: the true time (1 ms for the conv,
    1 ms / gain for the chain) plus preemption, which only ever adds: |N(0, 3 %)|, and in one round of 8 a
    stall of 20–80 % on either side."""
    rng = np.random.default_rng(seed)

    def timer(m_conv, m_chain, name):
        if calls is not None:
            calls.append(name)
        gain = GAINS[int(name.removeprefix("layer"))]

        def t(true):
            x = true * (1 + abs(rng.normal(0, 0.03)))
            if rng.random() < 1 / 8:
                x *= 1 + rng.uniform(0.2, 0.8)
            return x
        return t(1e-3), t(1e-3 / gain)
    return timer


def _check(guard: LatencyGuard, info: ConvInfo, ranks=(8, 8)):
    return guard.check(info.name, info.in_shape, [conv_spec(info)], T2.chain(info, ranks), info.macs)


def _decisions(guard: LatencyGuard) -> list[str]:
    return ["conv" if _check(guard, _info(i)) else "chain" for i in range(len(GAINS))]


def test_the_verdict_is_identical_over_repeated_noisy_runs():
    runs = [_decisions(LatencyGuard(timer=noisy_timer(seed))) for seed in range(40)]
    assert all(r == runs[0] for r in runs), {i: [r[i] for r in runs] for i in range(len(GAINS))}
    # ties and chains that are not 5 % faster keep the conv; clear wins get the chain
    assert runs[0] == ["conv"] * 6 + ["chain"] * 3


def test_each_layer_reports_its_margin_and_rounds():
    g = LatencyGuard(timer=noisy_timer(0))
    _decisions(g)
    for i, gain in enumerate(GAINS):
        m = g.measurements[f"layer{i}"]
        assert m["needs"] == 1.05 and m["margin"] == pytest.approx(m["speedup"] / 1.05 - 1, abs=2e-3)
        lo, hi = m["speedup_range"]
        assert lo <= m["speedup"] <= hi and MIN_ROUNDS <= m["rounds"] <= MAX_ROUNDS
        assert abs(m["speedup"] - gain) / gain < 0.08          # the fastest rounds shed the stalls
    assert g.measurements["layer8"]["rounds"] == MIN_ROUNDS     # 2.5x: clear in the fewest rounds
    assert g.measurements["layer5"]["verdict"] == "tie"         # 1.04x vs 1.05x: a tie, the conv stays
    assert "a tie keeps the conv" in _check(g, _info(5))
    s = g.summary()
    assert s["ties"] >= 1 and s["kept_chain"] == 3 and s["smallest_margin"] is not None


def test_the_disk_cache_decides_the_next_run_without_timing(tmp_path):
    calls: list = []
    first = LatencyGuard(timer=noisy_timer(1, calls), disk=TimingCache(tmp_path))
    d1 = _decisions(first)
    assert calls and len(list(tmp_path.glob("*.json"))) == len(GAINS)
    calls.clear()
    second = LatencyGuard(timer=noisy_timer(2, calls), disk=TimingCache(tmp_path))
    assert _decisions(second) == d1 and calls == []
    assert all(m["cached"] == "disk" for m in second.measurements.values())
    assert second.summary()["cache_hits"] == len(GAINS) and second.summary()["rounds"] == 0
    # another precision, provider or thread count is another measurement
    for kw in ({"precision": "int8"}, {"threads": 2}, {"provider": "cuda"}):
        calls.clear()
        _check(LatencyGuard(timer=noisy_timer(3, calls), disk=TimingCache(tmp_path), **kw), _info(0))
        assert set(calls) == {"layer0"}, kw


def test_the_cache_key_holds_the_machine_and_the_runtime():
    import onnxruntime

    from onnxcompress.planning.latency_cache import cpu_model

    k = TimingCache.key(in_shape=[1, 16, 8, 8], precision="fp32")
    assert k == TimingCache.key(in_shape=[1, 16, 8, 8], precision="fp32")
    assert k != TimingCache.key(in_shape=[1, 16, 8, 9], precision="fp32")
    assert cpu_model() and onnxruntime.__version__


def test_decide():
    assert decide([(3e-3, 1e-3)] * (MIN_ROUNDS - 1)) is None        # never from fewer than MIN_ROUNDS rounds
    assert decide([(3e-3, 1e-3)] * MIN_ROUNDS).kept == "chain"
    assert decide([(1e-3, 3e-3)] * MIN_ROUNDS).kept == "conv"
    v = decide([(1.2e-3, 1e-3)] * MIN_ROUNDS)
    assert v.kept == "chain" and v.clear and v.rounds == MIN_ROUNDS and v.margin == pytest.approx(1.2 / 1.05 - 1)
    assert decide([(1.0e-3, 1e-3)] * MIN_ROUNDS).kept == "conv"     # equal times: clearly not 5 % faster
    # stalls only add time: the fastest round of each side is the estimate
    v = decide([(1.2e-3, 1e-3), (1.9e-3, 1e-3), (1.2e-3, 1.7e-3), (1.21e-3, 1.01e-3)])
    assert v.kept == "chain" and v.speedup == pytest.approx(1.2)
    # fastest rounds that disagree by 4 % around 1.06x: unclear, more rounds; a tie at the end keeps the conv
    noisy = [(1.06e-3, 1e-3), (1.10e-3, 1.04e-3)] * MAX_ROUNDS
    assert decide(noisy[:MIN_ROUNDS]) is None
    v = decide(noisy[:MAX_ROUNDS], final=True)
    assert v.kept == "conv" and not v.clear and v.rounds == MAX_ROUNDS


def test_optimize_twice_decides_the_same_from_the_cache(monkeypatch, tmp_path):
    import onnxcompress.planning.latency_guard as lg

    calls: list = []
    monkeypatch.setenv("ONNXCOMPRESS_LATENCY_CACHE", str(tmp_path / "lat"))
    m = conv_model(T=16, S=16, hw=(9, 11), batch=1)

    def fake(*a, **k):   # the chain 1.2x faster, with noise
        rng = np.random.default_rng(len(calls))

        def timer(m0, m1, name):
            calls.append(name)
            return 1.2e-3 * (1 + abs(rng.normal(0, 0.02))), 1e-3 * (1 + abs(rng.normal(0, 0.02)))
        return timer

    monkeypatch.setattr(lg, "ort_timer", fake)
    r1 = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, rank_multiple=1)).report
    n = len(calls)
    r2 = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, rank_multiple=1)).report
    assert n >= 1 and len(calls) == n                               # the second run did not time
    assert [l["skipped"] for l in r1.layers] == [l["skipped"] for l in r2.layers] == [None]
    g = r2.latency["guard"]
    assert g["cache_hits"] == g["layers_timed"] == 1 and g["cache"] == str(tmp_path / "lat")
    assert r2.layers[0]["extra"]["latency_guard"]["margin"] > 0


def test_small_layers_are_timed_as_several_copies():
    """A 20 µs layer is mostly the fixed cost of a session run: it is timed as k independent copies (own
    weights, so ORT cannot merge them), and the report gives the time per copy."""
    import onnx

    from conftest import run_ort
    from onnxcompress.planning.latency_guard import copies_for, layer_model

    small = ConvInfo("s", 1, (64, 64, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 64, 8, 8), (1, 64, 8, 8), True)
    big = ConvInfo("b", 1, (64, 64, 3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (1, 64, 56, 56), (1, 64, 56, 56), True)
    k = copies_for(small.macs)
    assert k == 7 and copies_for(big.macs) == 1
    m = layer_model(small.in_shape, T2.chain(small, (16, 16)), "int8", copies=k)
    onnx.checker.check_model(m, full_check=True)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 * k and len(m.graph.output) == k
    weights = {t.raw_data for t in m.graph.initializer if t.name.endswith("w0_q")}
    assert len(weights) == k                                   # distinct: no common-subexpression merge
    x = np.random.default_rng(0).integers(0, 255, small.in_shape).astype(np.uint8)
    outs = run_ort(m, {"x": x})
    assert len(outs) == k and all(o.shape == (1, 64, 8, 8) for o in outs)
    g = LatencyGuard(timer=lambda m0, m1, name: (7e-3, 3.5e-3))
    _check(g, small, (16, 16))
    rec = g.measurements["s"]
    assert rec["copies"] == 7 and rec["conv_ms"] == 1.0 and rec["chain_ms"] == 0.5
