"""Is a rewrite lossless? Judged against the previous model's own float32 noise floor.

A fixed relative tolerance (1e-4) is wrong in both directions. A float32 model that subtracts large, nearly
equal numbers (a BatchNormalization with running means ~1e4 after a conv on raw pixels) carries rounding
errors of 1e-3 relative in its outputs: folding that BN is exact in real arithmetic, yet it changes the
float32 outputs by as much, and a fixed 1e-4 stops a correct fold. And on a well-conditioned model a wrong
rewrite that moves the outputs by 1e-5 passes a 1e-4 tolerance.

The noise floor: two float32 models whose parameters differ by about one unit in the last place (ulp) are
the same model as far as float32 can tell. So the previous model is run `samples` times with every float
parameter and every float input multiplied by ``1 + u`` (u uniform in ±`ulps` ulp, a fresh draw each time);
the per-element spread σ of those outputs around the unperturbed run is what float32 cannot resolve at that
element — it carries every cancellation's amplification, element by element. The rewritten model's deviation
from the previous one is then measured in units of that spread,
``z = |new - prev| / (σ + 1 ulp)``, and its RMS ``score`` must stay below `threshold`.

Where: at the model outputs and at every tensor the rewrite produces differently (a tensor present in both
models whose producing node changed: the BN output a folded conv now writes, a factorized conv's output),
because downstream layers mix channels and would spread one noisy channel's noise over all of them.

Measured here: correct rewrites score 0.7–2.3 (BN folds on the detector of tests/test_noise_floor.py, whose
plain float32 difference is 0.6–1.3e-3; constant folding, BN folding and full-rank Tucker2 on ResNet-18 and
MobileNetV3 exports; full-rank Tucker2 and exact CP chains), while folds wrong by a 1e-3 scale, a forgotten
epsilon or two swapped channels score 3e2 to 1e6 — their plain difference (1–2.4e-3 for the 1e-3 scale) is
no larger than the correct fold's. The threshold, 30, sits between. Cost: two ORT sessions and 2 + `samples`
runs of the model (about 3 s for ResNet-18 at 224×224 on a loaded 2-core machine).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

#: model -> run(feeds) -> outputs (one session per model, run several times)
SessionFactory = Callable[[onnx.ModelProto], Callable[[dict], Sequence[np.ndarray]]]

#: float parameters that set shapes or indices, not values: never perturbed
STRUCTURAL_OPS = {"Resize", "Upsample", "Range", "ConstantOfShape", "NonMaxSuppression", "TopK", "Slice",
                  "Pad", "Reshape", "Expand", "Tile", "QuantizeLinear", "DequantizeLinear", "RoiAlign"}
_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
_EPS = {np.float32: 2.0 ** -23, np.float16: 2.0 ** -10, np.float64: 2.0 ** -52}
DEFAULT_THRESHOLD = 30.0


@dataclass
class TensorVerdict:
    name: str
    score: float               # RMS of |new - prev| / (σ + 1 ulp)
    rel_error: float           # ||new - prev|| / ||prev||
    noise_rel: float           # ||σ|| / ||prev||: the previous model's own float32 noise, relative
    worst_z: float             # max of |new - prev| / (σ + 1 ulp)

    def to_dict(self) -> dict:
        return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in self.__dict__.items()}


@dataclass
class NoiseVerdict:
    equivalent: bool
    threshold: float
    samples: int
    ulps: float
    tensors: list[TensorVerdict] = field(default_factory=list)

    @property
    def worst(self) -> TensorVerdict | None:
        return max(self.tensors, key=lambda t: t.score, default=None)

    @property
    def rel_error(self) -> float:
        """Largest plain relative error at the model outputs and compared tensors (what a fixed tolerance sees)."""
        return max((t.rel_error for t in self.tensors), default=0.0)

    def line(self) -> str:
        w = self.worst
        if w is None:
            return "no float tensors to compare"
        return (f"{'within' if self.equivalent else 'beyond'} the previous model's float32 noise: "
                f"score {w.score:.3g} {'<=' if self.equivalent else '>'} {self.threshold:g} at {w.name!r} "
                f"(relative error {w.rel_error:.2e}, the model's own float32 noise {w.noise_rel:.2e})")

    def to_dict(self) -> dict:
        w = self.worst
        return {"equivalent": self.equivalent, "threshold": self.threshold, "samples": self.samples,
                "ulps": self.ulps, "worst": w.to_dict() if w else None, "tensors_compared": len(self.tensors),
                "max_rel_error": self.rel_error}


# ------------------------------------------------------------------------------------------ graph helpers
def _producers(model: onnx.ModelProto) -> dict[str, tuple]:
    """Output name -> a signature of the node writing it (op, attributes, inputs with initializer digests)."""
    inits = {t.name: t for t in model.graph.initializer}
    digest: dict[str, str] = {}

    def sig_of(name: str):
        if name in inits:
            if name not in digest:
                t = inits[name]
                h = hashlib.sha1(t.raw_data)
                if not t.raw_data:
                    h.update(t.SerializeToString())
                digest[name] = (t.data_type, tuple(t.dims), h.hexdigest())
            return (name, digest[name])
        return name

    out = {}
    for n in model.graph.node:
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
        sig = (n.domain, n.op_type, attrs, tuple(sig_of(i) for i in n.input))
        for o in n.output:
            if o:
                out[o] = sig
    return out


def changed_tensors(prev: onnx.ModelProto, new: onnx.ModelProto, limit: int = 64) -> list[str]:
    """Tensors both models compute but by a different node (or from different constants): where a rewrite
    starts to differ. At most `limit` (evenly spread over the graph order)."""
    a, b = _producers(prev), _producers(new)
    graph_out = {o.name for o in new.graph.output}
    names = [n for n in b if n in a and a[n] != b[n] and n not in graph_out]
    if len(names) > limit:
        idx = np.linspace(0, len(names) - 1, limit).round().astype(int)
        names = [names[i] for i in sorted(set(idx))]
    return names


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    from ..ir.modelio import weightless_copy

    try:   # types only: inferred on a copy without the weights (a full copy would cost the model's size twice)
        m = onnx.shape_inference.infer_shapes(weightless_copy(model, keep_small=True))
    except Exception:   # noqa: BLE001 - no types: only the model outputs are compared
        m = model
    types = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        et = vi.type.tensor_type.elem_type
        if et in _FLOAT:
            types[vi.name] = et
    return types


def with_outputs(model: onnx.ModelProto, names: Sequence[str], types: dict[str, int]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (already-present outputs are not repeated)."""
    have = {o.name for o in model.graph.output}
    extra = [n for n in names if n not in have]
    if not extra:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in extra:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
    return m


def overridable(model: onnx.ModelProto, detach: bool = False, values_from: onnx.ModelProto | None = None
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` whose float parameters are graph inputs with their values as defaults (an ONNX
    initializer listed as an input can be overridden at run time), and those values. One session then runs
    the model as stored and every perturbed copy of it. Float `Constant` nodes become such initializers
    too; tensors that set shapes or indices (inputs of STRUCTURAL_OPS) stay fixed. `detach`: the parameters are
    plain graph inputs without defaults (the copy holds no weights: every run must feed them); `values_from`: the
    model holding the initializers' values when `model` is a weightless graph of it."""
    from ..ir.modelio import weightless_copy

    structural = {i for n in model.graph.node if n.op_type in STRUCTURAL_OPS for i in n.input[1:]}
    src_of = {t.name: t for t in (values_from or model).graph.initializer}
    if detach:   # the graph without the weights; non-parameter initializers keep their values
        m = weightless_copy(model)
        listed = {i.name for i in m.graph.input}
        for t in m.graph.initializer:
            src = src_of.get(t.name)
            if src is not None and (src.data_type not in _FLOAT or src.name in structural or src.name in listed):
                t.CopyFrom(src)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    g = m.graph
    keep = []
    for n in g.node:
        v = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if v is not None and len(n.attribute) == 1 and v.data_type in _FLOAT and n.output[0] not in structural:
            t = onnx.TensorProto()
            t.CopyFrom(v)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inputs = {i.name for i in g.input}
    params = {}
    for t in g.initializer:
        if t.data_type not in _FLOAT or t.name in structural or t.name in inputs:
            continue
        if src_of.get(t.name, t).data_location == TensorProto.EXTERNAL:
            continue
        params[t.name] = numpy_helper.to_array(src_of.get(t.name, t))
        g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if detach and params:
        keep = [t for t in g.initializer if t.name not in params]
        del g.initializer[:]
        g.initializer.extend(keep)
    if m.ir_version < 4:
        m.ir_version = 4
    return m, params


def perturb(arrays: dict, rng: np.random.Generator, ulps: float = 1.0, inplace: bool = False) -> dict:
    """Each float array multiplied by ``1 + u``, u uniform in ±`ulps` ulp of its type; others unchanged.
    `inplace`: the arrays themselves are multiplied (the same values, no second copy of them)."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype.type in _EPS:
            dt = v.dtype.type
            u = rng.random(v.shape, dtype=np.float64 if dt is np.float64 else np.float32).astype(dt, copy=False)
            u = (u * dt(2 * ulps) - dt(ulps)) * dt(_EPS[dt])
            u += dt(1)
            if inplace and v.ndim and v.flags.writeable:
                v *= u
            else:
                v = np.asarray(v * u, dtype=dt)   # 0-d stays an array
            del u
        out[k] = v
    return out


def _ort_session(model: onnx.ModelProto):
    from .session import make_session

    sess = make_session(model, "cpu", lean=True)
    return lambda feeds: sess.run(None, feeds)


# ------------------------------------------------------------------------------------------ the verdict
def _run_from_file(path, inner: Sequence[str], types: dict[str, int], feeds: dict) -> dict:
    """Outputs and `inner` tensors of the model file at `path` (graph + external data): a graph-only copy with
    the extra outputs is written beside it, so the weights are read by ORT from the same data file."""
    from pathlib import Path

    from ..ir.modelio import load_graph
    from .session import make_session

    g = with_outputs(load_graph(path), inner, types)
    aug = Path(path).with_name(Path(path).stem + ".noise-floor.onnx")
    onnx.save_model(g, str(aug))
    try:
        s = make_session(str(aug), "cpu", lean=True)
        return dict(zip([o.name for o in g.graph.output], s.run(None, feeds)))
    finally:
        aug.unlink(missing_ok=True)


def lossless_verdict(prev: onnx.ModelProto, new: onnx.ModelProto, feeds: dict, *, samples: int = 3,
                     ulps: float = 1.0, threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                     max_tensors: int = 64, session: SessionFactory | None = None,
                     new_file=None) -> NoiseVerdict:
    """Whether `new` computes what `prev` computes on `feeds`, up to `prev`'s own float32 noise (see the
    module docstring). `session(model) -> run(feeds) -> outputs` (default: ORT CPU). `new_file`: a file holding
    `new` (graph + external data), which its run then reads instead of a copy of `new`."""
    from ..ir.modelio import weightless_copy

    session = session or _ort_session
    types = _float_types(prev)
    out_names = [o.name for o in prev.graph.output]
    inner = [n for n in changed_tensors(prev, new, max_tensors) if n in types]
    names = out_names + inner
    # the previous model's graph holds no weights: its parameters are fed (one copy of them, plus a perturbed
    # one per run); the new model runs from `new_file` when given (a graph-only copy beside its data file)
    p, params = overridable(with_outputs(weightless_copy(prev), inner, types), detach=True, values_from=prev)
    src = {t.name: t for t in prev.graph.initializer if t.name in params}
    fixed = {k: v for k, v in params.items() if k not in src}    # from Constant nodes: small, kept

    def values() -> dict:   # the parameters read afresh for each run (perturbed in place: one copy at a time)
        return {k: (numpy_helper.to_array(src[k]) if k in src else fixed[k].copy()) for k in params}
    params = {k: None for k in params}
    order_p = [o.name for o in p.graph.output]
    run_p = session(p)
    y0 = dict(zip(order_p, run_p({**feeds, **values()})))
    if new_file is not None:
        yn = _run_from_file(new_file, inner, types, feeds)
    else:
        q = with_outputs(new, inner, types)
        yn = dict(zip([o.name for o in q.graph.output], session(q)(feeds)))
        del q
    rng = np.random.default_rng(seed)
    sq = {n: 0.0 for n in names}
    for _ in range(max(samples, 1)):
        yk = dict(zip(order_p, run_p({**perturb(feeds, rng, ulps), **perturb(values(), rng, ulps, inplace=True)})))
        for n in names:
            a = np.asarray(y0[n])
            if a.dtype.type in _EPS:
                sq[n] = sq[n] + (np.asarray(yk[n], np.float64) - a) ** 2
    v = NoiseVerdict(equivalent=True, threshold=threshold, samples=max(samples, 1), ulps=ulps)
    for n in names:
        a = np.asarray(y0[n])
        if a.dtype.type not in _EPS or n not in yn:
            continue
        a64, b64 = a.astype(np.float64), np.asarray(yn[n], np.float64)
        if a64.shape != b64.shape:
            v.tensors.append(TensorVerdict(n, float("inf"), float("inf"), 0.0, float("inf")))
            continue
        sigma = np.sqrt(sq[n] / v.samples)
        eps = _EPS[a.dtype.type]
        rms = float(np.sqrt(np.mean(a64 ** 2))) if a64.size else 0.0
        floor = eps * (np.abs(a64) + rms) + np.finfo(np.float64).tiny
        d = np.abs(b64 - a64)
        finite = np.isfinite(a64) & np.isfinite(b64)
        if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
            v.tensors.append(TensorVerdict(n, float("inf"), float("inf"), 0.0, float("inf")))
            continue
        z = d[finite] / (sigma[finite] + floor[finite])
        norm = float(np.linalg.norm(a64[finite])) or 1e-30
        v.tensors.append(TensorVerdict(
            name=n, score=float(np.sqrt(np.mean(z ** 2))) if z.size else 0.0,
            rel_error=float(np.linalg.norm(d[finite]) / norm), noise_rel=float(np.linalg.norm(sigma[finite]) / norm),
            worst_z=float(z.max()) if z.size else 0.0))
    v.equivalent = all(t.score <= threshold for t in v.tensors)
    return v


def check_lossless(prev: onnx.ModelProto, new: onnx.ModelProto, feeds: dict, prev_out: Sequence[np.ndarray],
                   new_out: Sequence[np.ndarray], rtol: float = 1e-4, seed: int = 0,
                   new_file=None) -> tuple[dict, str | None]:
    """The PassManager's lossless check: (facts for `PassRecord.verified`, None or why the rewrite is not
    lossless). The noise floor decides; when it cannot be measured (a model over 2 GB cannot be serialized
    for ORT with extra outputs), the plain relative error against `rtol` does."""
    errs = [_rel(a, b) for a, b in zip(prev_out, new_out) if np.issubdtype(np.asarray(a).dtype, np.floating)]
    worst = max(errs) if errs else 0.0
    rec: dict = {"max_rel_error_vs_previous": worst}
    if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(prev_out, new_out)):
        rec["noise_floor"] = {"equivalent": True, "skipped": "outputs bit-identical"}
        return rec, None   # e.g. Identity nodes folded away: nothing to measure against the noise
    try:
        v = lossless_verdict(prev, new, feeds, seed=seed, new_file=new_file)
    except Exception as e:   # noqa: BLE001 - the fixed tolerance decides
        rec["noise_floor"] = {"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
        return rec, (f"(relative error {worst:.2e} > {rtol:g})" if worst > rtol else None)
    rec["noise_floor"] = v.to_dict()
    return rec, (None if v.equivalent else v.line())


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
