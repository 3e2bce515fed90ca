"""INT4 options of the auto search (`--objective size` only: INT4 is a size format on ORT CPU, never faster).

The one-layer sensitivity of INT4 weights is measured with the real ORT int4 path: the input model with only that
layer's weight in int4 (weight-only: int4 Conv weight → DequantizeLinear → float Conv; a Gemm/MatMul as
MatMulNBits), its output-noise energy 10^(-SQNR/10) on the calibration samples against the input model — exact
for weight-only INT4; in a mixed model the layer also gets INT8 activations, whose noise (the layer's INT8
measurement) is added when the options are predicted (candidates.predicted_noise). Layers the INT4 pass leaves
alone (depthwise convs, weights that are not a plain constant) get no INT4 option."""
from __future__ import annotations

import time

import onnx

#: what `--objective size` adds to the precisions of the search
SIZE_PRECISION = "int4"


def _int4_one(model: onnx.ModelProto, name: str, op: str, block_size: int) -> onnx.ModelProto | None:
    from ..ort.int4 import conv_weights_int4, depthwise_convs, int4_conv_weights, matmul_nbits, nbits_nodes

    if op == "Conv":
        if name in depthwise_convs(model):
            return None
        m = conv_weights_int4(model, nodes_to_include=[name])
        return m if name in int4_conv_weights(m) else None
    m = matmul_nbits(model, block_size=block_size, nodes_to_include=[name])
    return m if name in nbits_nodes(m) else None


def int4_noise(run, clean: onnx.ModelProto, layers, samples: int) -> tuple[dict[str, float | None], dict]:
    """{layer: output-noise energy with only that layer's weights in INT4 (None: the INT4 pass leaves it
    alone)} on `samples` calibration samples (random inputs without data), and facts for the report."""
    from ..data import inputs_for_model
    from ..ort.fidelity import fidelity

    r = run.recipe
    t0 = time.perf_counter()
    src = run.calib if run.calib is not None else run.holdout
    ops = {n.name: n.op_type for n in clean.graph.node}
    out: dict[str, float | None] = {}
    for k, info in enumerate(layers):
        op = ops.get(info.name)
        m = _int4_one(clean, info.name, op, r.int4_block_size) if op in ("Conv", "Gemm", "MatMul") else None
        if m is None:
            out[info.name] = None
            continue
        run.note(f"auto: INT4 sensitivity {k + 1}/{len(layers)}: {info.name}")
        f = fidelity(clean, m, inputs_for_model(clean, src, batch_size=16, limit=samples), "cpu")
        out[info.name] = None if f.sqnr_db is None else 10 ** (-float(f.sqnr_db) / 10)
    return out, {"layers": sum(v is not None for v in out.values()), "samples": samples,
                 "seconds": round(time.perf_counter() - t0, 2),
                 "how": "one layer's weights in INT4 (weight-only, ORT), output-noise energy vs the input model"}


def drop_unavailable(options: dict, noise: dict[str, float | None]) -> None:
    """Remove the INT4 options of layers the INT4 pass would leave alone."""
    for name, opts in options.items():
        if noise.get(name) is None:
            options[name] = [o for o in opts if o.precision != SIZE_PRECISION]
