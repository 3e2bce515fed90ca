"""PassManager: runs passes in order, times each, and verifies after each one that changed the model:
onnx.checker with full shape inference, ONNX Runtime loads and runs it, no new NaN/Inf, and — for passes that
declare themselves lossless — outputs equal to the previous model's up to that model's own float32 noise
(ort.noise_floor.check_lossless; `rtol` decides only where that noise cannot be measured). Hand-offs of each result
reach later passes through the shared PassContext. A manager can run several batches of passes on one model
(e.g. the lossless clean-up, then, after planning, the compression passes); records accumulate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..errors import UserError, VerificationError
from ..ort.session import make_session, model_nbytes, random_feeds, release_memory  # noqa: F401 (re-exported)
from .base import Pass, PassContext, PassRecord, PassResult, Progress

LOSSLESS_RTOL = 1e-4


class PassManager:
    def __init__(self, shapes: dict[str, tuple[int, ...]], verify: bool = True, rtol: float = LOSSLESS_RTOL,
                 progress: Progress | None = None, seed: int = 0, keep_models: bool = True, baseline=None):
        self.shapes = shapes
        self.verify = verify
        self.rtol = rtol
        self.seed = seed
        self.keep_models = keep_models   # False: drop each intermediate model once the next pass has run
        self.ctx = PassContext(progress=progress)
        self.records: list[PassRecord] = []
        self.results: list[tuple[Pass, PassResult]] = []
        self._feeds = None
        self._prev_out = None
        self._nbytes: int | None = None
        if baseline is not None:   # another manager's feeds and its last model's outputs: not measured again
            self._feeds, self._prev_out = baseline

    @property
    def baseline(self):
        """(feeds, outputs of the last model) — a later manager continuing on that model starts from them."""
        return (self._feeds, self._prev_out) if self._feeds is not None else None

    def run(self, model: onnx.ModelProto, passes: Sequence[Pass], input_file: str | None = None) -> onnx.ModelProto:
        """Run `passes` on `model`; returns the last model. Raises VerificationError naming the pass (and the
        layer, when one layer was rewritten) whose output fails a check.

        Memory: each result is written once (graph + external data) and the checker and the ORT session read
        that file; a pass's input is released before its output is verified, unless the pass is lossless (its
        check compares the two models); a pass that `accepts_file` (INT8) gets that file instead of the
        ModelProto, whose last reference the manager drops first. `input_file`: a file holding `model` (the
        input check's session reads it instead of a copy)."""
        from ..ir.modelio import ModelFiles

        self._files = ModelFiles()
        self._input = (model, input_file) if input_file else None
        self._nbytes = model_nbytes(model)   # small models: no gc/trim between passes
        try:
            if self.verify and self._feeds is None:
                self._feeds = random_feeds(model, self.shapes, self.seed)
                self._prev_out = self._outputs(input_file or model, "input model")
            box = [model]       # the manager's only reference: _run_one can drop a pass input
            del model
            for p in passes:
                self._run_one(p, box)
            return box.pop()
        finally:
            self._files.close()
            self._input = None

    def _file_of(self, model) -> tuple[str | None, str | None]:
        """(folder to remove afterwards or None, path) of a file already holding `model`, else (None, None)."""
        if self._input is not None and self._input[0] is model:
            return None, self._input[1]
        if self._files.holds(model) is not None:
            d, path = self._files.take()
            return d, str(path)
        return None, None

    def _run_one(self, p: Pass, box: list) -> None:
        model = box.pop()
        self.ctx.note(f"pass {p.name}")
        t0 = time.perf_counter()
        arg = model
        if getattr(p, "accepts_file", False):
            arg = str(self._files.file_for(model))   # the file the last verification wrote, else written now
            self._files.forget_model()
            self._drop_kept(keep=None)
            model = None
            release_memory(self._nbytes)
        res = p.run(arg, self.ctx)
        seconds = time.perf_counter() - t0
        prev_model = model if res.lossless else None     # only a lossless check compares with the input
        prev_dir = None
        if prev_model is not None and res.modified and self.verify:
            prev_dir, path = self._file_of(prev_model)   # read back only if the outputs differ
            prev_model = path or prev_model
        model = arg = None
        self._drop_kept(keep=res.model)
        release_memory(self._nbytes)
        ver: dict = {}
        try:
            if res.modified and self.verify:
                ver = self._verify(p, res, prev_model)
        finally:
            del prev_model
            if prev_dir:
                import shutil

                shutil.rmtree(prev_dir, ignore_errors=True)
        self.records.append(PassRecord(name=p.name, seconds=round(seconds, 4), modified=res.modified,
                                       lossless=res.lossless, verified=ver))
        self.ctx.absorb(res)
        self.results.append((p, res))
        box.append(res.model)
        release_memory(self._nbytes)

    def _drop_kept(self, keep) -> None:
        """keep_models=False: earlier results let go of their models (all of them: a pass that changed nothing
        returns its input, which an earlier result holds too — QAF with every chain skipped kept the model
        entering Fuse alive through Fuse's verification, +100 MB on ResNet-50), except `keep`."""
        if self.keep_models:
            return
        for _, r in self.results:
            if r.model is not keep:
                r.model = None

    def _outputs(self, model, what: str, pass_name: str = "load"):
        try:
            # unoptimised: ORT's graph rewrites copy the weights (+40% of the model in memory); every model of a
            # run is verified the same way, and the result runs optimised in fidelity and latency
            sess = make_session(model, "cpu", lean=True, optimize=False)
            out = sess.run(None, self._feeds)
            del sess
            release_memory(self._nbytes)
            return out
        except Exception as e:
            if pass_name == "load":
                raise UserError(f"ONNX Runtime cannot run the input model: {_line(e)}") from e
            raise VerificationError(pass_name, f"ONNX Runtime cannot run the {what}: {_line(e)}") from e

    def _verify(self, p: Pass, res: PassResult, prev_model: onnx.ModelProto | str | None) -> dict:
        changed = [l.name for l in res.layers if l.skipped is None]
        layer = changed[0] if len(changed) == 1 else None
        t0 = time.perf_counter()
        path = str(self._files.file_for(res.model))   # one file for the checker and the session
        try:
            check_model(path)
        except Exception as e:
            raise VerificationError(p.name, f"onnx.checker: {_line(e)}", layer) from e
        out = self._outputs(path, "rewritten model", p.name)
        prev = self._prev_out
        ver = {"checker": True, "ort_runs": True}
        if prev is not None and all(np.all(np.isfinite(o)) for o in prev if np.issubdtype(o.dtype, np.floating)):
            bad = [i for i, o in enumerate(out) if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o))]
            if bad:
                raise VerificationError(p.name, f"output {bad[0]} holds NaN/Inf after the pass", layer)
        if res.lossless and prev is not None and prev_model is not None:   # against the input's float32 noise
            from ..ort.noise_floor import check_lossless

            if isinstance(prev_model, str):   # kept as its file: loaded only when the outputs are not identical
                same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(prev, out))
                prev_model = onnx.load(prev_model) if not same else res.model
            rec, bad = check_lossless(prev_model, res.model, self._feeds, prev, out, self.rtol, self.seed,
                                      new_file=path)
            ver.update(rec)
            if bad:
                where = layer or (", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
                raise VerificationError(p.name, f"lossless pass changed the outputs {bad}; rewritten layers: {where}",
                                        layer)
        self._prev_out = out
        ver["seconds"] = round(time.perf_counter() - t0, 4)
        return ver


def check_model(model: onnx.ModelProto | str | Path) -> None:
    """onnx.checker with full shape inference; a path is checked from its file (graph + external data: no
    serialised copy of the weights), a ModelProto over 2 GB through a temporary external-data file."""
    if isinstance(model, (str, Path)):
        onnx.checker.check_model(str(model), full_check=True)
    elif model.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(model, full_check=True)
    else:
        import tempfile

        from ..ir.modelio import write_external

        with tempfile.TemporaryDirectory() as td:
            onnx.checker.check_model(str(write_external(model, Path(td) / "m.onnx")), full_check=True)


def _line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]
