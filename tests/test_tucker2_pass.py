"""Full-rank Tucker2 of single Conv nodes reproduces ORT outputs across strides, pads, auto_pad,
dilations, bias, batch; skipped layers are recorded, not mangled."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import conv_model, rel_err, run_ort
from onnxcompress.errors import VerificationError
from onnxcompress.passes.manager import PassManager
from onnxcompress.passes.tucker2 import Tucker2Pass


def _full(info):
    return info.S, info.T


def _run_full_rank(m, batch, hw, S):
    x = np.random.default_rng(1).standard_normal((batch, S) + tuple(hw)).astype(np.float32)
    res = Tucker2Pass(_full, {"x": x.shape}).run(m)
    assert res.modified and res.lossless
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Conv", "Conv"]
    return rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]), res


CASES = [
    dict(kernel=(3, 3)),
    dict(kernel=(3, 3), strides=(2, 1), pads=(1, 2, 0, 1), dilations=(1, 2)),
    dict(kernel=(3, 5), strides=(2, 2), pads=(0, 2, 1, 2)),
    dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(kernel=(4, 4), auto_pad="SAME_LOWER", strides=(3, 2)),
    dict(kernel=(3, 3), auto_pad="VALID", bias=False),
    dict(kernel=(2, 3), pads=(1, 0, 0, 1), bias=False, dilations=(2, 1)),
    dict(kernel=(3,), strides=(2,), pads=(1, 0)),                 # Conv1d
    dict(kernel=(3, 3, 3), pads=(1, 1, 1, 0, 1, 1), hw=(5, 6, 7)),  # Conv3d
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_full_rank_exact(case):
    hw = case.pop("hw", (9, 11))
    m = conv_model(T=8, S=6, hw=hw, batch=3, **case)
    err, res = _run_full_rank(m, 3, hw[:len(case["kernel"])], 6)
    assert err <= 1e-5, err
    rec = res.layers[0]
    assert rec.skipped is None and rec.ranks == [6, 8] and rec.weight_rel_error < 1e-6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(5, 12), S=st.integers(5, 10), kh=st.integers(1, 4), kw=st.integers(2, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), bias=st.booleans(), batch=st.integers(1, 3))
def test_full_rank_exact_property(T, S, kh, kw, sh, sw, dh, dw, pads, bias, batch):
    hw = (12, 13)
    m = conv_model(T=T, S=S, kernel=(kh, kw), strides=(sh, sw), dilations=(dh, dw), pads=pads, bias=bias,
                   hw=hw, batch=batch)
    err, _ = _run_full_rank(m, batch, hw, S)
    assert err <= 1e-5


def test_weight_in_constant_node():
    m = conv_model(weight_as_constant_node=True)
    err, _ = _run_full_rank(m, 2, (9, 11), 6)
    assert err <= 1e-5


def test_truncated_ranks_shrink_and_report():
    m = conv_model(T=32, S=32, hw=(8, 8))
    res = Tucker2Pass(lambda i: (8, 8), {"x": (2, 32, 8, 8)}).run(m)
    rec = res.layers[0]
    assert not res.lossless
    assert rec.params_after == 32 * 8 + 8 * 8 * 9 + 8 * 32 + 32
    assert rec.params_before == 32 * 32 * 9 + 32
    assert 0 < rec.weight_rel_error < 1


@pytest.mark.parametrize("kw,reason", [
    (dict(group=2, S=8), "grouped"),
    (dict(group=6, S=6, T=6), "depthwise"),
    (dict(kernel=(1, 1)), "1x1"),
    (dict(S=3), "too few input channels"),
])
def test_ineligible_layers_are_skipped_with_reason(kw, reason):
    m = conv_model(**kw)
    res = Tucker2Pass(_full, None).run(m)
    assert not res.modified
    assert reason in res.layers[0].skipped
    assert res.model is m


def test_dynamic_weight_is_skipped():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 6, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g", [x, w], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = Tucker2Pass(_full, None).run(m)
    assert "dynamic weight" in res.layers[0].skipped


def test_pass_manager_verifies_lossless_and_names_layer():
    """A pass that claims to be lossless but is not must be stopped, naming the pass and the layer."""
    m = conv_model(T=16, S=16)

    class Liar(Tucker2Pass):
        name = "LyingTucker2"

        def run(self, model, ctx=None):
            res = super().run(model, ctx)
            res.lossless = True
            return res

    pm = PassManager({"x": (2, 16, 9, 11)})
    with pytest.raises(VerificationError, match="LyingTucker2.*conv"):
        pm.run(m, [Liar(lambda i: (2, 2), {"x": (2, 16, 9, 11)})])
    # the honest full-rank pass verifies
    pm = PassManager({"x": (2, 16, 9, 11)})
    pm.run(m, [Tucker2Pass(_full, {"x": (2, 16, 9, 11)})])
    assert pm.records[0].verified["max_rel_error_vs_previous"] < 1e-5
