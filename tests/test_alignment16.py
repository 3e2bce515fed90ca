"""The CPU rank multiple (issue 16): 16 — the step of ORT's INT8 conv kernels (benchmarks/bench_int8_align.py) —
else 8 where no multiple of 16 fits a layer (small models keep their compression); an explicit --rank-multiple is
used as given."""
from onnxcompress import Recipe
from onnxcompress.ir.layers import ConvInfo
from onnxcompress.passes.registry import cost_models
from onnxcompress.planning.planner import CPU_MULTIPLE, Multiple, Planner, align


def _conv(T, S, k=3, hw=14):
    return ConvInfo("c", 1, (T, S, k, k), 1, (1, 1), (k // 2,) * 4, (1, 1), (1, S, hw, hw), (1, T, hw, hw), True)


def _plan(info, **kw):
    kw.setdefault("method", "tucker2")
    kw.setdefault("skip_first", False)
    kw.setdefault("latency_guard", False)
    return Planner(Recipe(**kw), cost_models()).plan([info]).layers[info.name]


def test_cpu_default_is_16_else_8():
    assert Planner(Recipe(method="tucker2"), cost_models()).multiple == 16 == CPU_MULTIPLE
    assert CPU_MULTIPLE.fallback == 8
    assert Planner(Recipe(method="tucker2", providers=["cuda"], allow_unavailable_providers=True),
                   cost_models()).multiple == 1
    assert Planner(Recipe(method="tucker2", rank_multiple=8), cost_models()).multiple.fallback is None


def test_wide_layers_get_multiples_of_16():
    for T, S, ratio in [(256, 256, 2), (256, 256, 3), (512, 512, 3), (128, 64, 2)]:
        lp = _plan(_conv(T, S), ratio=ratio)
        assert lp.ranks is not None and all(r % 16 == 0 for r in lp.ranks), (T, S, ratio, lp.ranks)


def test_small_layers_fall_back_to_8_instead_of_being_kept():
    info = _conv(32, 32, hw=8)                      # the digits CNN's stage-1 conv at ratio 2
    only16 = _plan(info, ratio=2, rank_multiple=16)
    assert only16.ranks is None and "aligned to 16" in only16.reason
    lp = _plan(info, ratio=2)
    assert lp.ranks is not None and all(r % 8 == 0 for r in lp.ranks) and any(r % 16 for r in lp.ranks)


def test_align_fallback_only_when_16_does_not_fit():
    c = cost_models()["tucker2"]
    info = _conv(256, 256)
    assert align(c, info, (70, 70), Multiple(16, 8))[0] == align(c, info, (70, 70), 16)[0]
    small = _conv(32, 32, hw=8)
    assert align(c, small, (18, 18), 16, asked_ratio=2)[0] is None
    assert align(c, small, (18, 18), Multiple(16, 8), asked_ratio=2)[0] == align(c, small, (18, 18), 8, asked_ratio=2)[0]
