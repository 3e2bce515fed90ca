"""Transformer path: a small nn.TransformerEncoder exported from torch; SVD / data-aware SVD of its
MatMul (3-D activations) and Gemm weights, then INT8 and FP16, run on ORT."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transformer_svd as ts  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = ts.export(tmp_path_factory.mktemp("tf") / "encoder.onnx")
    return path, ts.ArrayData(ts.tokens(96, 1), "cal"), ts.ArrayData(ts.tokens(96, 2), "eval")


def test_svd_and_data_aware_svd(setup):
    path, cal, ev = setup
    plain = ts.run(path, 2.0, False, "none", cal, ev)
    da = ts.run(path, 2.0, True, "none", cal, ev)
    for r in (plain, da):
        layers = {l["name"]: l for l in r["report"].layers}
        assert r["layers"] == 8     # in_proj MatMul, out_proj Gemm, linear1/2 MatMul (3-D) × 2 layers
        assert layers["/head/Gemm"]["skipped"].startswith("last Gemm")
        assert layers["/enc/layers.0/linear1/MatMul"]["ranks"] == [21]
    assert da["sqnr_db"] > plain["sqnr_db"] + 6 and da["cosine"] > 0.95


@pytest.mark.parametrize("q", ["int8", "fp16"])
def test_quantized(setup, q):
    path, cal, ev = setup
    r = ts.run(path, 2.0, True, q, cal, ev)
    assert r["cosine"] > 0.9
    ops = set(r["ops"])
    assert ("DequantizeLinear" in ops) if q == "int8" else ("Cast" in ops)
