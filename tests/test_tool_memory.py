"""Issue 16, the tool: models written without copies (weightless copies, external data), sessions and checks
from files, the streamed INT8 path (ranges, pre-processing, vectorised weight scales) equal to ORT's own, lazy
conv weights, the lean graph export, sequential fidelity, the PassManager handing INT8 a file."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_ort

OPSET = 17


def _small_cnn(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w1[3] = 0.0                                  # an all-zero output channel: scale 1.0 in ORT's rule
    w1[5] *= 1e-39                               # subnormal channel: below float32's tiny as a scale
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b0"),
             numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", strides=[2, 2], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def _batches(n=5, scale=True):
    return [{"x": np.random.default_rng(i).standard_normal((2, 3, 12, 12)).astype(np.float32) * ((i + 1) if scale else 1)}
            for i in range(n)]


class _Reader:
    def __init__(self, batches):
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


# ------------------------------------------------------------------------------------------ model files
def test_write_external_roundtrip_does_not_touch_the_model(tmp_path):
    from onnxcompress.ir.modelio import PAGE, load_graph, weightless_copy, write_external

    m = _small_cnn()
    before = m.SerializeToString()
    p = write_external(m, tmp_path / "m.onnx")
    assert m.SerializeToString() == before
    back = onnx.load(str(p))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in back.graph.initializer} == \
           {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}
    g = load_graph(p)
    ext = [t for t in g.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert ext and all(int(next(e.value for e in t.external_data if e.key == "offset")) % PAGE == 0 for t in ext)
    w = weightless_copy(m)
    assert [tuple(t.dims) for t in w.graph.initializer] == [tuple(t.dims) for t in m.graph.initializer]
    assert all(not t.raw_data and not t.float_data for t in w.graph.initializer)
    assert list(w.graph.node) == list(m.graph.node)


def test_value_shapes_on_weightless_copy_keep_reshape_targets():
    from onnxcompress.ir.shapes import infer_value_shapes

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["y"])]
    g = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    vs = infer_value_shapes(m)
    assert vs["c"] == (1, 4, 5, 5) and vs["y"] == (1, 100)     # the int64 target was kept for data propagation


def test_uses_external_data_remembers_what_load_model_read(tmp_path, monkeypatch):
    from onnxcompress.ir import modelio

    p = tmp_path / "m.onnx"
    onnx.save(_small_cnn(), p)
    modelio.load_model(p)
    calls = []
    monkeypatch.setattr(modelio.onnx, "load", lambda *a, **k: calls.append(a) or onnx.ModelProto())
    assert modelio.uses_external_data(p) is False and not calls     # no second parse of the file
    p.write_bytes(p.read_bytes())                                   # another version of the file: asked again
    modelio._EXTERNAL.clear()
    modelio.uses_external_data(p)
    assert calls


def test_make_session_from_files_and_no_spinning_pools(tmp_path, monkeypatch):
    from onnxcompress.ort import session as S

    assert S.session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert S.session_options(None).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(Exception):
        S.session_options(1).get_session_config_entry("session.intra_op.allow_spinning")
    m = _small_cnn()
    x = _batches(1)[0]
    ref = run_ort(m, x)[0]
    monkeypatch.setattr(S, "FILE_SESSION_BYTES", 0)          # every ModelProto through an external-data file
    assert np.array_equal(S.make_session(m).run(None, x)[0], ref)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    assert np.array_equal(S.make_session(p).run(None, x)[0], ref)


# ------------------------------------------------------------------------------------------ INT8
def test_streamed_minmax_equals_ort_calibrator(tmp_path):
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from onnxcompress.ir.modelio import write_external
    from onnxcompress.ort.capture import default_calibration_ops, minmax_ranges
    from onnxcompress.ort.quantize import pre_process

    m = _small_cnn()
    batches = _batches()
    pre = pre_process(write_external(m, tmp_path / "in.onnx"), tmp_path / "pre.onnx")
    cal = create_calibrator(Path(pre), default_calibration_ops(), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    cal.collect_data(_Reader(batches))
    ref = cal.compute_data()
    got = minmax_ranges(pre, iter(batches))
    assert set(ref.data) == set(got.data) and len(got.data) >= 6
    for k in ref.data:
        for a, b in zip(ref[k].range_value, got[k].range_value):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), k


def test_streamed_minmax_equals_ort_calibrator_on_a_wide_gemm(tmp_path):
    """A classifier-sized Gemm: MLAS packs its weight, and the packed kernel's output differs by an ulp from the
    unpacked one — the ranges stay ORT's only with the same session settings (pre-packing on)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from onnxcompress.ir.modelio import write_external
    from onnxcompress.ort.capture import default_calibration_ops, minmax_ranges
    from onnxcompress.ort.quantize import pre_process

    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                           helper.make_node("Gemm", ["r", "w", "b"], ["y"], name="fc", transB=1)], "fc",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])],
                          [numpy_helper.from_array(rng.standard_normal((1000, 2048)).astype(np.float32) / 45, "w"),
                           numpy_helper.from_array(rng.standard_normal(1000).astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    batches = [{"x": np.random.default_rng(i).standard_normal((1, 2048)).astype(np.float32) * 3} for i in range(6)]
    pre = pre_process(write_external(m, tmp_path / "in.onnx"), tmp_path / "pre.onnx")
    cal = create_calibrator(Path(pre), default_calibration_ops(), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    cal.collect_data(_Reader(batches))
    ref, got = cal.compute_data(), minmax_ranges(pre, iter(batches))
    assert set(ref.data) == set(got.data) and "y" in got.data
    for k in ref.data:
        assert all(np.array_equal(a, b) for a, b in zip(ref[k].range_value, got[k].range_value)), k


def test_weight_scale_overrides_are_ort_per_channel_scales(tmp_path):
    from onnxruntime.quantization.quant_utils import compute_data_quant_params

    from onnxcompress.ir.modelio import write_external
    from onnxcompress.ort.quantize import weight_scale_overrides

    m = _small_cnn()
    p = write_external(m, tmp_path / "m.onnx", min_bytes=0)
    ov = weight_scale_overrides(p)
    assert set(ov) == {"w0", "w1"} and ov["w0"][0]["axis"] == 0   # Conv weights only (not the Gemm's)
    for name in ov:
        w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))
        for c in range(w.shape[0]):
            zp, scale = compute_data_quant_params(w[c].ravel(), TensorProto.INT8, True)
            got = np.array(ov[name][c]["scale"], np.float32)
            assert got.tobytes() == np.asarray(scale, np.float32).tobytes(), (name, c)
            assert int(zp) == ov[name][c]["zero_point"] == 0
    assert ov["w1"][3]["scale"] == 1.0 and ov["w1"][5]["scale"] == 1.0


def test_quantize_qdq_matches_ort_quantize_static(tmp_path):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxcompress.ort.quantize import int8_format_for, quantize_qdq

    m = _small_cnn(1)
    batches = _batches(4, scale=False)
    onnx.save(m, tmp_path / "in.onnx")
    quant_pre_process(str(tmp_path / "in.onnx"), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "q.onnx"), _Reader(batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    ref = onnx.load(str(tmp_path / "q.onnx"))
    before = m.SerializeToString()
    got, facts = quantize_qdq(m, _Reader(batches), int8_format_for("cpu"))
    assert m.SerializeToString() == before
    assert facts["calibrated_tensors"] > 0
    assert sorted(n.op_type for n in ref.graph.node) == sorted(n.op_type for n in got.graph.node)
    refi = {t.name: numpy_helper.to_array(t).tobytes() for t in ref.graph.initializer}
    goti = {t.name: numpy_helper.to_array(t).tobytes() for t in got.graph.initializer}
    assert refi == goti                                          # every scale, zero point and int8 weight
    for b in batches:
        assert np.array_equal(run_ort(ref, b)[0], run_ort(got, b)[0])
    onnx.save(m, tmp_path / "again.onnx")                       # from a path: the same model
    got2, _ = quantize_qdq(str(tmp_path / "again.onnx"), _Reader(batches), int8_format_for("cpu"))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in got2.graph.initializer} == refi


def test_nonfinite_weights_from_a_file(tmp_path):
    from onnxcompress.ir.modelio import write_external
    from onnxcompress.ort.quantize import nonfinite_weights

    m = _small_cnn()
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.full((16, 8, 3, 3), np.nan, np.float32), "w1"))
    assert nonfinite_weights(write_external(m, tmp_path / "m.onnx")) == ["w1"] == nonfinite_weights(m)


# ------------------------------------------------------------------------------------------ layers, export
def test_lazy_conv_infos_read_on_demand_and_detach():
    from onnxcompress.ir.layers import LazyConvInfo, LazyLinearInfo, collect_layers, detach_weights

    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    m = _small_cnn()
    m.graph.initializer.append(numpy_helper.from_array(w1, "wp"))
    m.graph.node.insert(4, helper.make_node("Conv", ["r1", "wp"], ["p1"], name="pw"))
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w1"))
    m.graph.node[5].input[0] = "p1"
    eager = collect_layers(m)
    lazy = collect_layers(m, lazy=True)
    assert [type(i).__name__ for i in lazy[:3]] == ["LazyConvInfo", "LazyConvInfo", "LazyLinearInfo"]
    for a, b in zip(eager, lazy):
        wa = getattr(a, "weight", None) if not hasattr(a, "W") else a.W
        wb = getattr(b, "weight", None) if not hasattr(b, "W") else b.W
        assert np.array_equal(wa, wb) and (a.params, a.macs, a.T, a.S) == (b.params, b.macs, b.T, b.S)
    assert isinstance(lazy[0], LazyConvInfo) and lazy[0]._weight is None        # nothing held
    assert lazy[0].weight is not lazy[0].weight                                 # read each time
    detach_weights(lazy)
    assert lazy[0].weight is None and isinstance(lazy[2], LazyLinearInfo) and lazy[2].W is None
    assert [(i.params, i.macs, i.T, i.S) for i in lazy] == [(i.params, i.macs, i.T, i.S) for i in eager]


def test_lean_export_equals_graphsurgeon_export():
    import onnx_graphsurgeon as gs

    from onnxcompress.ir.surgery import export_graph, import_graph

    m = _small_cnn(2)
    g = import_graph(m)
    ref = gs.export_onnx(g.cleanup(remove_unused_graph_inputs=False).toposort(), do_type_check=False)
    got = export_graph(import_graph(m), m)
    onnx.checker.check_model(got, full_check=True)
    assert got.graph == ref.graph and [o.domain for o in got.opset_import] == [o.domain for o in ref.opset_import]
    assert got.ir_version == m.ir_version


# ------------------------------------------------------------------------------------------ pipeline pieces
def test_sequential_fidelity_equals_fidelity():
    from onnxcompress.ort.fidelity import fidelity, fidelity_sequential

    a, b = _small_cnn(0), _small_cnn(3)
    batches = [(x["x"], np.array([1, 2])) for x in _batches(3)]
    f1 = fidelity(a, b, batches)
    f2 = fidelity_sequential(a, b, lambda: iter(batches))
    f3 = fidelity_sequential(a, b, lambda: iter(batches), max_kept_mb=1e-9)     # both alive past the cap
    assert f1 == f2 == f3


def test_pass_manager_hands_int8_a_file_and_drops_the_input(tmp_path):
    import gc

    from onnxcompress.passes.base import Pass, PassResult
    from onnxcompress.passes.manager import PassManager

    seen = []

    class Renamer(Pass):
        name = "rename"

        def run(self, model, ctx=None):
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.name = "renamed"
            return PassResult(model=m, modified=True, lossless=False)

    class FileReader(Pass):
        name = "reader"
        accepts_file = True

        def run(self, model, ctx=None):
            seen.append(model)
            gc.collect()
            seen.append(sum(isinstance(o, onnx.ModelProto) and o.graph.name == "renamed" for o in gc.get_objects()))
            return PassResult(model=onnx.load(model), modified=False)

    m = _small_cnn()
    pm = PassManager({"x": (2, 3, 12, 12)}, keep_models=False)
    out = pm.run(m, [Renamer(), FileReader()])
    assert isinstance(seen[0], str) and seen[1] == 0      # a path; no ModelProto of the pass input left alive
    assert out.graph.name == "renamed" and not Path(seen[0]).exists()   # the manager's file is gone after the run


def test_bench_cache_makes_each_session_once(monkeypatch):
    from onnxcompress.ort import timing

    made = []
    real = timing.make_session
    monkeypatch.setattr(timing, "make_session", lambda *a, **k: made.append(1) or real(*a, **k))
    cache: dict = {}
    for _ in range(2):
        timing.bench([_small_cnn(0), _small_cnn(1)], ["cpu"], warmup=0, runs=1, cache=cache)
    assert len(made) == 2


def test_lossless_check_reads_the_input_back_from_its_file(tmp_path):
    """A lossless pass's input is released before verification when a file holds it; the noise-floor check
    loads it back only when the outputs differ — and still catches a wrong "lossless" rewrite."""
    from conftest import conv_model

    from onnxcompress.errors import VerificationError
    from onnxcompress.ir.modelio import write_external
    from onnxcompress.passes.base import Pass, PassResult
    from onnxcompress.passes.fold_bn import FoldBatchNorm
    from onnxcompress.passes.manager import PassManager

    m = conv_model(bn=True)
    f = str(write_external(m, tmp_path / "in.onnx"))
    shapes = {"x": tuple(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim)}
    pm = PassManager(shapes)
    pm.run(m, [FoldBatchNorm()], input_file=f)
    nf = pm.records[0].verified["noise_floor"]
    assert "skipped" not in nf and nf["equivalent"] is True and nf["tensors_compared"] >= 1

    class Wrong(Pass):
        name = "wrong"
        lossless = True

        def run(self, model, ctx=None):
            out = onnx.ModelProto()
            out.CopyFrom(model)
            w = out.graph.initializer[0]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.001), w.name))
            return PassResult(model=out, modified=True, lossless=True)

    with pytest.raises(VerificationError, match="lossless"):
        PassManager(shapes).run(m, [Wrong()], input_file=f)
