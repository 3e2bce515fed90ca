import pytest

from conftest import conv_model, rel_err, run_ort
from onnxcompress import Recipe, optimize
from onnxcompress.errors import UserError
from onnxcompress.recipe import parse_input_shapes, parse_rank


def test_toml_recipe_with_per_layer_ranks(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('method = "tucker2"\nratio = 2\nquantize = "none"\nskip_first = false\n'
                 '[layers."conv"]\nranks = [3, 4]\n')
    r = Recipe.from_toml(p)
    assert r.layers["conv"].ranks == [3, 4]
    res = optimize(conv_model(T=8, S=6), r)
    rec = res.report.layers[0]
    assert rec["ranks"] == [3, 4] and rec["skipped"] is None


def test_recipe_flags_override_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('ratio = 2\nquantize = "fp16"\n')
    assert Recipe.from_toml(p, ratio=4.0).ratio == 4.0


@pytest.mark.parametrize("text,msg", [
    ('ratio = 1\n', "ratio must be > 1"),
    ('method = "magic"\n', "invalid method"),
    ('colour = "red"\n', "unknown field"),
    ('[layers.x]\nfoo = 1\n', "unknown field"),
    ('ratio = [\n', "not valid TOML"),
])
def test_bad_recipes(tmp_path, text, msg):
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=msg):
        Recipe.from_toml(p)


def test_parse_helpers():
    assert parse_input_shapes(["input:1x3x224x224"]) == {"input": [1, 3, 224, 224]}
    assert parse_rank("vbmf") == 1.0 and parse_rank("vbmf:0.6") == 0.6
    for bad in ("x", "input:1xax3", "input:0x3"):
        with pytest.raises(UserError):
            parse_input_shapes([bad])
    with pytest.raises(UserError):
        parse_rank("vbmf:2")


def test_exclude_and_skip_first():
    m = conv_model(T=8, S=6)
    rec = optimize(m, Recipe(method="tucker2", quantize="none")).report.layers[0]
    assert rec["skipped"] == "first conv (skip_first)"
    rec = optimize(m, Recipe(method="tucker2", quantize="none", skip_first=False, exclude=["co*"])).report.layers[0]
    assert rec["skipped"] == "excluded by --exclude"


def test_full_rank_recipe_is_lossless_through_pipeline():
    import numpy as np
    m = conv_model(T=8, S=6, bn=True)
    r = Recipe(method="tucker2", quantize="none", skip_first=False)
    r.layers = {"conv": __import__("onnxcompress.recipe", fromlist=["LayerOverride"]).LayerOverride(ranks=[6, 8])}
    res = optimize(m, r)
    assert res.report.passes[1].lossless
    x = np.random.default_rng(0).standard_normal((2, 6, 9, 11)).astype(np.float32)
    assert rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) < 1e-5


def test_fp16_keeps_float32_io():
    import numpy as np
    import onnx
    m = conv_model(T=8, S=6)
    res = optimize(m, Recipe(method="none", quantize="fp16"))
    assert res.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert res.model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((2, 6, 9, 11)).astype(np.float32)
    assert rel_err(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) < 5e-3
    assert "GPU" in res.report.quantization["fp16"]["note"]
