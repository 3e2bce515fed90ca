import numpy as np

from conftest import conv_model, rel_err, run_ort
from onnxcompress.passes.fold_bn import FoldBatchNorm


def test_fold_bn_exact_with_and_without_bias():
    for bias in (True, False):
        m = conv_model(T=8, S=6, bn=True, bias=bias, strides=(2, 1), pads=(1, 1, 0, 1))
        res = FoldBatchNorm().run(m)
        assert res.modified and res.lossless
        assert [n.op_type for n in res.model.graph.node] == ["Conv"]
        x = np.random.default_rng(0).standard_normal((2, 6, 9, 11)).astype(np.float32)
        assert rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) < 1e-6


def test_fold_bn_noop_without_bn():
    m = conv_model()
    res = FoldBatchNorm().run(m)
    assert not res.modified and res.model is m
