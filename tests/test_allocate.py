"""Tests for onnxcompress.decompose.allocate (ALGORITHMS.md §1.4-§1.5, global allocation)."""
import itertools
import math
import random
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxcompress.decompose.allocate import (
    DEFAULT_RATIOS,
    LayerSpec,
    allocate_later_first,
    allocate_sensitivity,
    candidate_ranks,
    conv_cost,
    conv_macs,
    conv_params,
    proportional_ranks,
    total_cost,
    tucker2_cost,
    tucker2_macs,
    tucker2_params,
    uniform_ranks,
)


def spec(T, S, hw_in, stride=1, k=3, name="l", index=0):
    hw_out = hw_in // stride
    return LayerSpec(name, T, S, k, k, hw_in, hw_in, hw_out, hw_out, index)


def resnet_like():
    """A ResNet-18/34-ish list of 3x3 convs (channels 64..512, 56x56 -> 7x7)."""
    layers = []
    cfg = [(64, 64, 56, 1), (64, 64, 56, 1), (64, 64, 56, 1),
           (128, 64, 56, 2), (128, 128, 28, 1), (128, 128, 28, 1),
           (256, 128, 28, 2), (256, 256, 14, 1), (256, 256, 14, 1),
           (512, 256, 14, 2), (512, 512, 7, 1), (512, 512, 7, 1)]
    for i, (T, S, hw, st_) in enumerate(cfg):
        layers.append(spec(T, S, hw, st_, name=f"conv{i}", index=10 * i + 3))
    return layers


# --------------------------------------------------------------------------------------------
# Cost formulas
# --------------------------------------------------------------------------------------------
def test_cost_formulas_hand_computed():
    sp = spec(128, 64, 56, stride=2)  # 56x56 -> 28x28
    assert sp.K == 9
    assert conv_params(sp) == 73_728  # 128*64*9
    assert conv_macs(sp) == 57_802_752  # 73728 * 784
    # 64*16 + 16*32*9 + 32*128 = 1024 + 4608 + 4096
    assert tucker2_params(128, 64, 9, 16, 32) == 9_728
    # conv1 at INPUT resolution: 64*16*3136 + 16*32*9*784 + 32*128*784
    assert tucker2_macs(sp, 16, 32) == 3_211_264 + 3_612_672 + 3_211_264 == 10_035_200
    assert tucker2_cost(sp, 16, 32, "params") == 9_728
    assert tucker2_cost(sp, 16, 32, "macs") == 10_035_200
    assert conv_cost(sp, "macs") == 57_802_752
    # non-square kernel, stride 1
    sp2 = LayerSpec("x", 32, 16, 1, 5, 10, 12, 10, 12, 0)
    assert conv_params(sp2) == 32 * 16 * 5
    assert conv_macs(sp2) == 32 * 16 * 5 * 120
    assert tucker2_macs(sp2, 4, 8) == (16 * 4 + 4 * 8 * 5 + 8 * 32) * 120
    with pytest.raises(ValueError):
        conv_cost(sp, "flops")


def test_total_cost():
    specs = resnet_like()[:3]
    alloc = {"conv0": (16, 16), "conv1": None}  # conv2 missing -> original
    exp = tucker2_params(64, 64, 9, 16, 16) + 2 * 64 * 64 * 9
    assert total_cost(specs, alloc, "params") == exp


# --------------------------------------------------------------------------------------------
# Proportional ranks
# --------------------------------------------------------------------------------------------
def test_proportional_ranks_hand_value():
    # S=T=64, K=9, ratio 8: 36864 k^2 + 8192 k - 4608 = 0 -> k = 0.2595.. -> 16.6;
    # neighbours: (16,16)=4352, (16,17)=(17,16)=4560, (17,17)=4777; goal 4608 -> 4560 closest
    sp = spec(64, 64, 28)
    rr = proportional_ranks(sp, 8, "params")
    assert sorted(rr) == [16, 17]
    assert tucker2_cost(sp, *rr) == 4560


CHANNELS = [64, 96, 128, 256, 384, 512]


@pytest.mark.parametrize("target", ["params", "macs"])
@pytest.mark.parametrize("stride", [1, 2])
def test_proportional_ranks_hit_target_within_5pct(target, stride):
    worst = 0.0
    for S, T in itertools.product(CHANNELS, CHANNELS):
        sp = spec(T, S, 28, stride)
        for ratio in (1.5, 2, 2.5, 3, 4, 5, 6, 8):
            rr = proportional_ranks(sp, ratio, target)
            assert rr is not None, (S, T, ratio)
            r3, r4 = rr
            assert 1 <= r3 <= S and 1 <= r4 <= T
            achieved = conv_cost(sp, target) / tucker2_cost(sp, r3, r4, target)
            worst = max(worst, abs(achieved / ratio - 1))
    assert worst < 0.05


@settings(max_examples=60, deadline=None)
@given(S=st.integers(16, 512), T=st.integers(16, 512), hw=st.integers(4, 64),
       stride=st.sampled_from([1, 2]), k=st.sampled_from([3, 5]),
       ratio=st.floats(1.2, 10), target=st.sampled_from(["params", "macs"]))
def test_proportional_ranks_solve_quadratic(S, T, hw, stride, k, ratio, target):
    """Ranks are within rounding of kappa*(S,T), kappa from an independent np.roots solve."""
    sp = spec(T, S, hw, stride, k)
    hwi, hwo = sp.h_in * sp.w_in, sp.h_out * sp.w_out
    if target == "params":
        a, b = S * T * k * k, S * S + T * T
    else:
        a, b = S * T * k * k * hwo, S * S * hwi + T * T * hwo
    kap = max(np.roots([a, b, -a / ratio]).real)
    rr = proportional_ranks(sp, ratio, target)
    x3, x4 = kap * S, kap * T
    assert rr is not None
    r3, r4 = rr
    assert math.floor(x3) <= r3 <= math.ceil(x3) or r3 == 1
    assert math.floor(x4) <= r4 <= math.ceil(x4) or r4 == 1
    assert tucker2_cost(sp, r3, r4, target) < conv_cost(sp, target)


def test_macs_target_accounts_for_conv1_at_input_resolution():
    sp = spec(128, 128, 56, stride=2)  # conv1 runs on 4x the pixels
    rp = proportional_ranks(sp, 3, "params")
    rm = proportional_ranks(sp, 3, "macs")
    assert rm[0] < rp[0]  # input-side rank must shrink to pay for conv1
    got = conv_macs(sp) / tucker2_macs(sp, *rm)
    assert abs(got / 3 - 1) < 0.05
    # the params-target ranks miss the MAC target badly
    assert conv_macs(sp) / tucker2_macs(sp, *rp) < 0.8 * 3


def test_proportional_ranks_none_when_not_smaller():
    assert proportional_ranks(spec(64, 64, 28), 1.0) is None
    assert proportional_ranks(spec(64, 64, 28), 0.5) is None
    tiny = spec(2, 2, 28, k=1)  # 1x1, 2->2: even (1, 1) costs 2 + 1 + 2 = 5 > 4
    assert proportional_ranks(tiny, 2, "params") is None
    assert proportional_ranks(tiny, 2, "macs") is None
    assert proportional_ranks(spec(64, 64, 28), 1.05) is not None
    # rounding never picks a chain that is not smaller than the conv: S=3, T=8, ratio 1.01 ->
    # kappa*(S,T) = (2.5, 6.7); (3, 6) is closest to the goal but costs 219 >= 216, so (2, 7) (188)
    sp = spec(8, 3, 28)
    assert proportional_ranks(sp, 1.01) == (2, 7)
    with pytest.raises(ValueError):
        proportional_ranks(spec(64, 64, 28), 0)


def test_candidate_ranks():
    sp = spec(256, 128, 28, stride=2)
    for target in ("params", "macs"):
        cands = candidate_ranks(sp, target=target)
        assert [c[0] for c in cands] == list(DEFAULT_RATIOS)
        col = 3 if target == "params" else 4
        costs = [c[col] for c in cands]
        assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
        for ratio, r3, r4, p, m in cands:
            assert (r3, r4) == proportional_ranks(sp, ratio, target)
            assert p == tucker2_params(256, 128, 9, r3, r4) and m == tucker2_macs(sp, r3, r4)
    # tiny layer: no duplicated rank pairs, Nones dropped
    # (ratio 1.5 and 1.6 both give (3, 5) for this layer; ratio 1.0 gives None)
    small = candidate_ranks(spec(6, 5, 8), ratios=(1.0, 1.5, 1.6, 1.7, 3))
    assert [c[0] for c in small] == [1.5, 1.7, 3]


def test_uniform_ranks():
    specs = resnet_like() + [spec(2, 2, 224, k=1, name="tiny", index=0)]
    u = uniform_ranks(specs, 2.0, "params")
    assert u["tiny"] is None
    for sp in specs[:-1]:
        assert u[sp.name] == proportional_ranks(sp, 2.0, "params")
    tot0 = sum(conv_params(sp) for sp in specs[:-1])
    tot = total_cost(specs[:-1], u, "params")
    assert abs(tot0 / tot / 2.0 - 1) < 0.05


# --------------------------------------------------------------------------------------------
# Later layers first
# --------------------------------------------------------------------------------------------
def _decomposed_are_latest(specs, alloc):
    idx_dec = [sp.index for sp in specs if alloc[sp.name] is not None]
    idx_keep = [sp.index for sp in specs if alloc[sp.name] is None]
    return not idx_dec or not idx_keep or min(idx_dec) > max(idx_keep)


@pytest.mark.parametrize("target", ["params", "macs"])
@pytest.mark.parametrize("ratio", [1.1, 1.3, 1.6, 2.0, 3.0])
def test_later_first_meets_target_and_touches_later_layers_first(target, ratio):
    specs = resnet_like()
    random.Random(0).shuffle(specs)  # order of the list must not matter, only .index
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alloc = allocate_later_first(specs, ratio, target=target)
    before = sum(conv_cost(sp, target) for sp in specs)
    after = total_cost(specs, alloc, target)
    assert after <= before / ratio
    assert _decomposed_are_latest(specs, alloc)
    # minimal: undoing the earliest decomposed layer breaks the target
    dec = sorted((sp for sp in specs if alloc[sp.name] is not None), key=lambda s: s.index)
    assert dec
    undo = dict(alloc)
    undo[dec[0].name] = None
    assert total_cost(specs, undo, target) > before / ratio
    # every decomposition is one of the ladder's candidates
    for sp in dec:
        assert alloc[sp.name] in [(c[1], c[2]) for c in candidate_ranks(sp, target=target)]


def test_later_first_small_ratio_only_touches_last_layer():
    specs = resnet_like()
    alloc = allocate_later_first(specs, 1.05, target="params")
    assert [n for n, v in alloc.items() if v is not None] == ["conv11"]
    # least aggressive candidate that suffices: 1.5 is plenty for a 5% global cut
    assert alloc["conv11"] == proportional_ranks(specs[-1], 1.5, "params")
    # with MACs as the target the last layer is only ~1/10 of the total (7x7 output), so a 1.5x
    # cut of it is not enough and a more aggressive candidate is taken
    alloc_m = allocate_later_first(specs, 1.05, target="macs")
    assert [n for n, v in alloc_m.items() if v is not None] == ["conv11"]
    assert alloc_m["conv11"] != proportional_ranks(specs[-1], 1.5, "macs")
    assert alloc_m["conv11"] in [(c[1], c[2]) for c in candidate_ranks(specs[-1], target="macs")]


def test_later_first_fixed_per_layer_ratio():
    specs = resnet_like()
    alloc = allocate_later_first(specs, 1.5, per_layer_ratio=3.0, target="params")
    for sp in specs:
        if alloc[sp.name] is not None:
            assert alloc[sp.name] == proportional_ranks(sp, 3.0, "params")
    assert _decomposed_are_latest(specs, alloc)
    before = sum(conv_params(sp) for sp in specs)
    assert total_cost(specs, alloc, "params") <= before / 1.5
    # custom ladder
    alloc2 = allocate_later_first(specs, 1.5, per_layer_ratio=[2.0, 4.0], target="params")
    for sp in specs:
        if alloc2[sp.name] is not None:
            assert alloc2[sp.name] in (proportional_ranks(sp, 2.0), proportional_ranks(sp, 4.0))


def test_later_first_infeasible_warns_and_goes_all_in():
    specs = resnet_like()
    with pytest.warns(RuntimeWarning):
        alloc = allocate_later_first(specs, 50.0, target="params")
    for sp in specs:
        assert alloc[sp.name] == proportional_ranks(sp, 8, "params")


# --------------------------------------------------------------------------------------------
# Sensitivity allocation (multiple-choice knapsack)
# --------------------------------------------------------------------------------------------
def _brute_force(curves, capacity):
    names = list(curves)
    best = None
    for combo in itertools.product(*(range(len(curves[n])) for n in names)):
        c = sum(curves[n][j][0] for n, j in zip(names, combo))
        if c > capacity:
            continue
        d = sum(curves[n][j][1] for n, j in zip(names, combo))
        if best is None or d < best:
            best = d
    return best


def _evaluate(curves, choice):
    c = d = 0.0
    for n, opts in curves.items():
        opt = next(o for o in opts if o[2] == choice[n])
        c += opt[0]
        d += opt[1]
    return c, d


@st.composite
def knapsack_instances(draw):
    n_layers = draw(st.integers(1, 5))
    curves = {}
    for l in range(n_layers):
        keep_cost = draw(st.integers(50, 200))
        opts = [(keep_cost, 0.0, None)]
        for j in range(draw(st.integers(0, 4))):
            c = draw(st.integers(0, keep_cost))
            d = draw(st.floats(0.0, 5.0, allow_nan=False))
            opts.append((c, d, (l, j)))
        draw(st.randoms()).shuffle(opts)
        curves[f"layer{l}"] = opts
    fixed = draw(st.integers(0, 100))
    keep_tot = sum(max(o[0] for o in v if o[2] is None) for v in curves.values())
    min_tot = sum(min(o[0] for o in v) for v in curves.values())
    budget = fixed + draw(st.integers(min_tot, keep_tot))
    return curves, fixed + keep_tot, budget, fixed


@settings(max_examples=150, deadline=None)
@given(inst=knapsack_instances())
def test_sensitivity_dp_matches_brute_force(inst):
    curves, baseline, budget, fixed = inst
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = allocate_sensitivity(curves, budget, baseline)
    assert set(choice) == set(curves)
    c, d = _evaluate(curves, choice)
    assert fixed + c <= budget
    assert d == pytest.approx(_brute_force(curves, budget - fixed), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(inst=knapsack_instances())
def test_sensitivity_greedy_feasible_and_not_better_than_optimum(inst):
    curves, baseline, budget, fixed = inst
    choice = allocate_sensitivity(curves, budget, baseline, method="greedy")
    c, d = _evaluate(curves, choice)
    assert fixed + c <= budget
    assert d >= _brute_force(curves, budget - fixed) - 1e-9


@settings(max_examples=60, deadline=None)
@given(inst=knapsack_instances(), data=st.data())
def test_sensitivity_greedy_exact_for_single_layer(inst, data):
    curves = inst[0]
    name = next(iter(curves))
    one = {name: curves[name]}
    keep = max(o[0] for o in one[name] if o[2] is None)
    budget = data.draw(st.integers(min(o[0] for o in one[name]), keep))
    g = allocate_sensitivity(one, budget, keep, method="greedy")
    assert _evaluate(one, g)[1] == pytest.approx(_brute_force(one, budget), abs=1e-12)


def test_sensitivity_hand_instance():
    # the hull greedy takes A's cheap-per-unit step first and then still needs B's mid step
    # (overshooting the budget: A60+B50, degradation 3); hill climbing then undoes A -> optimum 2.
    curves = {
        "A": [(100, 0.0, None), (60, 1.0, "A60")],           # 0.025 per saved unit
        "B": [(100, 0.0, None), (50, 2.0, "B50"), (0, 10.0, "B0")],  # 0.04, then 0.16
    }
    budget = 150  # need to save 50
    assert allocate_sensitivity(curves, budget, 200) == {"A": None, "B": "B50"}
    g = allocate_sensitivity(curves, budget, 200, method="greedy")
    assert g == {"A": None, "B": "B50"}
    # baseline beyond the layers is fixed cost: 30 extra units must be saved as well
    assert allocate_sensitivity(curves, budget, 230) == {"A": "A60", "B": "B50"}
    # nothing to do when the budget already holds
    assert allocate_sensitivity(curves, 200, 200) == {"A": None, "B": None}


def test_sensitivity_errors_and_infeasible():
    curves = {"A": [(100, 0.0, None), (60, 1.0, "A60")]}
    with pytest.warns(RuntimeWarning):
        assert allocate_sensitivity(curves, 10, 100) == {"A": "A60"}  # cheapest
    with pytest.raises(ValueError):
        allocate_sensitivity({"A": [(60, 1.0, "A60")]}, 100, 100)  # no keep option
    with pytest.raises(ValueError):
        allocate_sensitivity(curves, 100, 50)  # baseline < keep costs
    with pytest.raises(ValueError):
        allocate_sensitivity(curves, 100, 100, method="magic")


def test_sensitivity_realistic_curves_and_thinning():
    """ResNet-ish curves from candidate_ranks; DP meets the budget; thinning stays feasible and near-optimal."""
    specs = resnet_like()
    rng = np.random.default_rng(0)
    curves = {}
    for sp in specs:
        c0 = conv_params(sp)
        opts = [(c0, 0.0, None)]
        sens = rng.uniform(0.5, 2.0)
        for ratio, r3, r4, p, m in candidate_ranks(sp, ratios=(1.25, 1.5, 2, 3, 4, 6, 8, 12)):
            opts.append((p, sens * (1 - p / c0) ** 2, (r3, r4)))
        curves[sp.name] = opts
    baseline = sum(conv_params(sp) for sp in specs)
    budget = baseline / 3
    choice = allocate_sensitivity(curves, budget, baseline)
    c, d = _evaluate(curves, choice)
    assert c <= budget
    # the optimum spends (almost) all the budget: every saved unit costs degradation
    assert c > 0.97 * budget
    # it is at least as good as uniform 3x and later-first 3x
    uni = uniform_ranks(specs, 3.0)
    lf = allocate_later_first(specs, 3.0, per_layer_ratio=(1.25, 1.5, 2, 3, 4, 6, 8, 12))
    for alloc in (uni, lf):
        if total_cost(specs, alloc) <= budget:
            assert d <= _evaluate(curves, alloc)[1] + 1e-12
    with pytest.warns(RuntimeWarning):
        thin = allocate_sensitivity(curves, budget, baseline, max_states=5)
    ct, dt = _evaluate(curves, thin)
    assert ct <= budget and dt >= d - 1e-12
    g = allocate_sensitivity(curves, budget, baseline, method="greedy")
    cg, dg = _evaluate(curves, g)
    assert cg <= budget and dg >= d - 1e-12
