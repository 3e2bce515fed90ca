"""The lossless check measures a rewrite against the previous model's own float32 noise: a correct BN fold on a
net whose float32 outputs carry 1e-3 of rounding (raw-pixel input, conv outputs ~1e4, BN means ~1e4,
running variances 1e-2..1e8) passes; folds that are wrong by a 1e-3 scale, a forgotten epsilon or two
swapped channels fail; and on a well-conditioned net a wrong rewrite below the old 1e-4 tolerance fails."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_err, run_ort
from onnxcompress.errors import VerificationError
from onnxcompress.ort.noise_floor import changed_tensors, lossless_verdict
from onnxcompress.passes.base import Pass
from onnxcompress.passes.fold_bn import FoldBatchNorm
from onnxcompress.passes.manager import PassManager

HW = (32, 32)
SEEDS = range(5)


def detector(seed: int, S=3, T=16, T2=8) -> onnx.ModelProto:
    """Conv (raw pixels ~255 in, positive weights: outputs ~3e4) → BN (means at the conv outputs, variances
    1e-2..1e8; four channels matched to the real spread) → ReLU → Conv → BN (one dead channel whose variance
    equals epsilon) — the pattern of a text detector's first layers."""
    rng = np.random.default_rng(seed)
    W1 = (10.0 + 0.5 * rng.standard_normal((T, S, 3, 3))).astype(np.float32)
    mean1 = (W1.sum(axis=(1, 2, 3)).astype(np.float64) * 255.0 + 2 * rng.standard_normal(T)).astype(np.float32)
    var1 = (10.0 ** rng.uniform(-2, 8, T)).astype(np.float32)
    var1[:4] = (np.sum(W1[:4].astype(np.float64) ** 2, axis=(1, 2, 3)) * 0.01).astype(np.float32)
    var1[-1] = 1e8
    g1, b1 = rng.uniform(0.5, 2, T).astype(np.float32), rng.standard_normal(T).astype(np.float32)
    W2 = (rng.standard_normal((T2, T, 3, 3)) / np.sqrt(T * 9)).astype(np.float32)
    mean2, var2 = rng.standard_normal(T2).astype(np.float32), rng.uniform(0.5, 2, T2).astype(np.float32)
    var2[0] = 1e-5                                            # a dead channel: variance == epsilon
    g2, b2 = rng.uniform(0.5, 2, T2).astype(np.float32), rng.standard_normal(T2).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (W1, "W1"), (g1, "g1"), (b1, "b1"), (mean1, "m1"), (var1, "v1"),
        (W2, "W2"), (g2, "g2"), (b2, "b2"), (mean2, "m2"), (var2, "v2")]]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["y1"], name="bn1"),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["y"], name="bn2")]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, *HW])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T2, *HW])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def feeds(seed: int = 1) -> dict:
    """A low-contrast photo in raw pixel units: 255 ± 0.1."""
    return {"x": (255.0 + 0.1 * np.random.default_rng(seed).standard_normal((1, 3, *HW))).astype(np.float32)}


def reference64(m: onnx.ModelProto, f: dict) -> np.ndarray:
    """The model evaluated in float64 (numpy; Conv, BatchNormalization, Relu with pads 1)."""
    P = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    v = {"x": f["x"].astype(np.float64)}
    for n in m.graph.node:
        x = v[n.input[0]]
        if n.op_type == "Conv":
            w = P[n.input[1]]
            xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))   # N,C,H,W,kh,kw
            y = np.einsum("nchwij,tcij->nthw", win, w)
            if len(n.input) > 2:
                y = y + P[n.input[2]].reshape(1, -1, 1, 1)
        elif n.op_type == "BatchNormalization":
            g, b, mu, var = (P[i].reshape(1, -1, 1, 1) for i in n.input[1:5])
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            y = (x - mu) / np.sqrt(var + eps) * g + b
        else:
            y = np.maximum(x, 0)
        v[n.output[0]] = y
    return v[m.graph.output[0].name]


def _set(m: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    t = next(t for t in out.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
    return out


def wrong_folds(m: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    folded = FoldBatchNorm().run(m).model
    W, B = "conv1_W_bnfold", "conv1_B_bnfold"

    def swap(a):
        a[[0, -1]] = a[[-1, 0]]
        return a

    no_eps = onnx.ModelProto()   # folding as if epsilon were 0: the epsilon term forgotten
    no_eps.CopyFrom(m)
    for n in no_eps.graph.node:
        if n.op_type == "BatchNormalization":
            n.attribute.append(helper.make_attribute("epsilon", 0.0))
    return {
        "scale 1e-3": _set(_set(folded, W, lambda a: a * np.float32(1.001)), B, lambda a: a * np.float32(1.001)),
        "scale 1e-3 of the weights": _set(folded, W, lambda a: a * np.float32(1.001)),
        "swapped channels": _set(_set(folded, W, swap), B, swap),
        "epsilon forgotten": FoldBatchNorm().run(no_eps).model,
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_the_original_carries_more_rounding_than_the_old_tolerance(seed):
    """The case of the issue: the plain float32 difference of a correct fold exceeds 1e-4, and the
    float32 original is itself that far from exact; the fold is not farther (float64 reference)."""
    m, f = detector(seed), feeds()
    folded = FoldBatchNorm().run(m).model
    a, b = run_ort(m, f)[0], run_ort(folded, f)[0]
    exact = reference64(m, f)
    assert rel_err(a, b) > 1e-4                               # today's fixed tolerance: a false alarm
    err_orig, err_fold = rel_err(exact, a), rel_err(exact, b)
    assert err_orig > 1e-4 and err_fold < 2 * err_orig, (err_orig, err_fold)
    assert rel_err(exact, reference64(folded, f)) < err_orig   # folded weights in float32: closer still


@pytest.mark.parametrize("seed", SEEDS)
def test_a_correct_fold_passes_the_pass_manager(seed):
    m = detector(seed)
    pm = PassManager({"x": (1, 3, *HW)})
    pm_feeds = feeds()
    import onnxcompress.passes.manager as pl

    orig = pl.random_feeds
    pl.random_feeds = lambda model, shapes, seed=0: pm_feeds   # the detector's raw-pixel input, not N(0, 1)
    try:
        out = pm.run(m, [FoldBatchNorm()])
        recs = pm.records
    finally:
        pl.random_feeds = orig
    nf = recs[0].verified["noise_floor"]
    assert recs[0].verified["max_rel_error_vs_previous"] > 1e-4 and nf["equivalent"]
    assert nf["worst"]["score"] < 5 and nf["threshold"] == 30
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}


@pytest.mark.parametrize("seed", SEEDS)
def test_correct_fold_passes_and_every_wrong_fold_fails(seed):
    m, f = detector(seed), feeds()
    ok = lossless_verdict(m, FoldBatchNorm().run(m).model, f, seed=seed)
    assert ok.equivalent and ok.worst.score < 5, ok.line()
    for what, bad in wrong_folds(m).items():
        v = lossless_verdict(m, bad, f, seed=seed)
        assert not v.equivalent, f"{what}: {v.line()}"
        assert v.worst.score > 100, f"{what}: {v.line()}"  # far beyond the threshold, not near it


def test_the_pass_manager_stops_a_wrong_fold_and_names_it():
    class WrongFold(Pass):
        name = "WrongFold"
        lossless = True

        def run(self, model, progress=None):
            res = FoldBatchNorm().run(model)
            res.model = wrong_folds(model)["scale 1e-3"]
            return res

    pm = PassManager({"x": (1, 3, *HW)})
    with pytest.raises(VerificationError, match=r"WrongFold.*beyond the previous model's float32 noise.*conv1"):
        pm.run(detector(0), [WrongFold()])


def test_a_wrong_rewrite_below_the_old_tolerance_fails_on_a_well_conditioned_net():
    """The other direction: a 2e-5 scale error passed the old 1e-4 tolerance; the noise floor is ~1e-7."""
    m = conv_model(T=8, S=6, bn=True, batch=1)
    f = {"x": np.random.default_rng(0).standard_normal((1, 6, 9, 11)).astype(np.float32)}
    folded = FoldBatchNorm().run(m).model
    bad = _set(_set(folded, "conv_W_bnfold", lambda a: a * np.float32(1 + 2e-5)),
               "conv_B_bnfold", lambda a: a * np.float32(1 + 2e-5))
    assert rel_err(run_ort(m, f)[0], run_ort(bad, f)[0]) < 1e-4
    assert lossless_verdict(m, folded, f).equivalent
    v = lossless_verdict(m, bad, f)
    assert not v.equivalent and v.worst.score > 30, v.line()


def test_changed_tensors_are_where_the_rewrite_differs():
    m = detector(0)
    folded = FoldBatchNorm().run(m).model
    assert changed_tensors(m, folded) == ["y1"]          # bn2 writes the graph output: compared as an output
    assert changed_tensors(m, m) == []


def test_parameters_that_set_shapes_are_not_perturbed():
    """A Resize whose float scales were perturbed could change the output shape: they stay fixed."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], name="up", mode="nearest")]
    inits = [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "W"),
             numpy_helper.from_array(np.array([1, 1, 1.5, 1.5], np.float32), "scales")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    v = lossless_verdict(m, m, x)
    assert v.equivalent and v.worst.score == 0.0
