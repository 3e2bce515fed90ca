"""Data-aware factors (`--data-aware`; ALGORITHMS.md §4, sequential and compensating): the factorization passes
ran plain; this pass revisits every factor chain in topological order and keeps, per chain, whichever of its
plain factors or data-aware ones measured better on held-out calibration rows.

Input: the model with plain chains (Tucker2 `…/t2_in,t2_core,t2_out`, SVD `…/svd_in,svd_out`) and the reference
model the factorization passes started from (after the clean-up passes: BN folded). Two disjoint parts of the
calibration data: `fit` (the statistics) and `heldout` (every choice).

1. One pass of the reference over both parts caches, per chain and batch, sampled output positions and the
   original layer's outputs y there (float32, rows × T per chain), and the reference's graph outputs on the
   held-out part.
2. Chain by chain (one chain per wave: with several, later chains would compensate upstream errors that change
   under them — measured -1.8 dB on MobileNetV2), x̃ = the chain's input in the model *as compressed so far* is
   gathered at the cached positions (ort.frontier.Frontier: the activations at the boundary of the finalized
   prefix live on disk, so every node runs once per batch) and streamed with y into fit moments
   (decompose.compensate.CrossMoment) or kept as held-out rows.
3. Candidates (decompose.compensate): plain, plain + the centred bias correction of §4, and the damped
   compensating factorization min E‖y − Ŵx̃ − b̂‖² + δ‖Ŵ − W‖² for each λ of a grid (whitened SVD / Σ-Tucker2 of
   M* = (C_yx + δW)(Σ̃ + δI)⁻¹). The one with the lowest held-out output error is written into the chain; the
   plain factors win ties, so a layer keeps data-aware factors only if they lower its own held-out error.
4. Whole model: if the held-out network error of the result is above the all-plain model's, every chain
   reverts to plain (the reason is recorded).

`inputs="original"` takes x from the reference instead (no compensation of upstream errors: each layer is fitted
to its original input distribution, SVD-LLM / Σ-Tucker2 style with damping and the bias correction); chains are
then independent and are captured in memory-bounded groups. The report (`SeqReport`) says per layer what was
kept and why, with the held-out layer SQNRs of plain and kept factors."""
from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import onnx

from ..decompose._blas import one_blas_thread
from ..decompose.compensate import (
    LAMBDAS,
    CrossMoment,
    HeldOutRows,
    choose,
    svd_candidates,
    tucker2_candidates,
)
from ..ir.chains import Chain, chain_factors, find_chains, unshare_biases, write_factors
from ..ort.frontier import Frontier, RowView, has_subgraphs, session_for
from .base import Pass, PassContext, PassResult

FeedsFactory = Callable[[], Iterable[dict]]
#: Σ-ALS sweeps per --data-aware-method: kron = Kronecker-whitened init + the closed-form U_T/core step (ALS
#: sweeps add ≤ 0.07 dB per layer and nothing measurable at the network on the digits model); als = 2 sweeps more
ALS_ITER = {"kron": 0, "als": 2}


# ------------------------------------------------------------------------------------------ results
@dataclass
class LayerOutcome:
    name: str
    kind: str
    ranks: list
    wave: int
    kept: str                 # plain | plain+bias | da(lam=…)
    fell_back: bool           # the plain factors were kept (by the layer's own choice or the whole-model check)
    reason: str
    heldout_db_plain: float   # held-out layer-output SQNR of the plain factors (inputs x̃, target y)
    heldout_db_kept: float
    fit_rows: int
    heldout_rows: int
    scores_db: dict = field(default_factory=dict)
    fit_db_kept: float | None = None      # the same on the fit rows (over-fitting shows as fit ≫ held-out)
    weight_rel_error: float | None = None  # ‖W − Ŵ‖/‖W‖ of the kept factors (data-aware ones trade it for output error)


@dataclass
class WaveOutcome:
    index: int
    chains: list
    net_db_before: float | None      # held-out network SQNR before the wave (only measured with net_check)
    net_db_candidate: float | None
    accepted: bool
    reason: str


@dataclass
class SeqReport:
    layers: list = field(default_factory=list)
    waves: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    net_db_plain: float | None = None      # held-out network SQNR of the all-plain model
    net_db_final: float | None = None
    seconds: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    inputs: str = "compressed"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fell_back(self) -> list[str]:
        return [l.name for l in self.layers if l.fell_back]


def _sqnr_db(sig: float, err: float) -> float:
    return 10.0 * math.log10(max(sig, 1e-300) / max(err, 1e-300))


# ------------------------------------------------------------------------------------------ driver
class SequentialDataAware:
    """See the module doc. `fit` / `heldout`: factories of ORT feed dicts over disjoint calibration samples,
    `n_fit_batches` / `n_heldout_batches` how many batches they yield (sizes the row sampling).

    lams: damping grid (× mean diag Σ̃) for SVD chains; tucker2_lams: the grid for k×k convs (a Σ-Tucker2 solve
    per λ is costly). max_rows: sampled rows per chain over the fit data (at least min_rows_per_dim·D).
    net_check: also accept each wave on the network output (off: while downstream layers are still plain it
    measures noise — it cost 0.9 dB on MobileNetV2). segmented: the on-disk frontier (else every wave re-runs
    the pruned prefix; used anyway for graphs with subgraphs and for inputs="original"). centred=False (an
    ablation) keeps every chain's original bias and fits raw moments."""

    def __init__(self, fit: FeedsFactory, heldout: FeedsFactory, n_fit_batches: int, n_heldout_batches: int,
                 lams=LAMBDAS, tucker2_lams=(3e-2,), max_rows: int = 8192, min_rows_per_dim: float = 2.0,
                 net_check: bool = False, seed: int = 0, progress: Callable[[str], None] | None = None,
                 als_iter: int = 0, als_cg: int = 5, inputs: str = "compressed", centred: bool | None = None,
                 segmented: bool = True, workdir: str | None = None, max_group_mb: float = 512.0):
        if inputs not in ("compressed", "original"):
            raise ValueError(f"inputs must be 'compressed' or 'original' (got {inputs!r})")
        self.fit, self.heldout = fit, heldout
        self.nb = {"fit": max(1, n_fit_batches), "heldout": max(1, n_heldout_batches)}
        self.lams, self.tucker2_lams = tuple(lams), tuple(tucker2_lams)
        self.max_rows, self.min_rows_per_dim = max_rows, min_rows_per_dim
        self.net_check, self.seed, self.progress = net_check, seed, progress
        self.als_iter, self.als_cg = als_iter, als_cg
        self.inputs, self.centred = inputs, centred
        self.segmented, self.workdir, self.max_group_mb = segmented, workdir, max_group_mb

    def _say(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    def _rows_per_batch(self, chain: Chain) -> int:
        want = max(self.max_rows, int(self.min_rows_per_dim * chain.D))
        return max(64, math.ceil(want / self.nb["fit"]))   # held-out batches: as many rows per batch

    def _waves(self, chains: list[Chain]) -> list[list[Chain]]:
        """One chain per wave on compressed inputs; independent chains (original inputs) in groups whose fit
        moments (8·D² bytes each) stay under max_group_mb."""
        if self.inputs == "compressed":
            return [[c] for c in chains]
        waves, cur, mb = [], [], 0.0
        for c in chains:
            need = 8.0 * c.D * c.D / 2**20
            if cur and mb + need > self.max_group_mb:
                waves.append(cur)
                cur, mb = [], 0.0
            cur.append(c)
            mb += need
        return waves + ([cur] if cur else [])

    def run(self, model: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[onnx.ModelProto, SeqReport]:
        """`model`: the graph with plain factor chains; `reference`: the graph the factorization passes started
        from. Returns a copy of `model` with the kept factors, and the report."""
        t_start = time.perf_counter()
        m = onnx.ModelProto()
        m.CopyFrom(model)
        chains, skipped = find_chains(m, reference)
        rep = SeqReport(skipped=skipped, inputs=self.inputs)
        s = SimpleNamespace(model=m, reference=reference, chains=chains, rep=rep, frontier=None,
                            secs=dict.fromkeys(("reference", "reference_ort", "capture", "capture_ort", "solve",
                                                "check"), 0.0))
        if chains:
            unshare_biases(m, chains)
            s.inits = {t.name: t for t in m.graph.initializer}
            s.views = {c.name: RowView(c.view, **c.conv) for c in chains}
            with tempfile.TemporaryDirectory(prefix="onnxcompress-da-", dir=self.workdir) as tmp:
                self._run(s, tmp)
        s.secs["total"] = time.perf_counter() - t_start
        rep.seconds = {k: round(v, 2) for k, v in s.secs.items()}
        return m, rep

    def _run(self, s, tmp: str) -> None:
        plain_all = {c.name: chain_factors(c, s.inits) for c in s.chains}
        self._reference_pass(s)
        t0 = time.perf_counter()
        s.rep.net_db_plain = _sqnr_db(s.ref_power, self._net_error(s, s.model))
        s.secs["check"] += time.perf_counter() - t0
        if self.segmented and self.inputs == "compressed" and not has_subgraphs(s.model):
            s.frontier = Frontier(s.model, lambda: itertools.chain(self.fit(), self.heldout()), tmp)
            n_fit = len(s.cache["fit"])
            s.where = [("fit", i) for i in range(n_fit)] + [("heldout", i) for i in range(s.frontier.n - n_fit)]
            index = {n.name: i for i, n in enumerate(s.model.graph.node)}
            s.first_node = {c.name: index[c.first] for c in s.chains}
        waves = self._waves(s.chains)
        for wi, wave in enumerate(waves):
            self._say(f"data-aware: wave {wi + 1}/{len(waves)} ({', '.join(c.name for c in wave)})")
            t0 = time.perf_counter()
            acc, err_before = self._capture(s, wave)
            s.secs["capture"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            outcomes, saved = self._solve(s, wave, wi, acc)
            del acc
            s.secs["solve"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self._wave_check(s, wave, wi, outcomes, saved, err_before)
            s.rep.layers += outcomes
            s.secs["check"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self._final_check(s, plain_all)
        s.secs["check"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ reference
    def _reference_pass(self, s) -> None:
        """Per chain and batch: sampled positions and the reference's y rows there; the reference's graph
        outputs on the held-out batches."""
        t0 = time.perf_counter()
        self._say(f"data-aware: reference pass ({len(s.chains)} chains)")
        sess = session_for(s.reference, [c.y for c in s.chains])
        onames = [o.name for o in sess.get_outputs()]
        s.graph_outs = [o.name for o in s.reference.graph.output]
        s.cache, s.ref_outs = {"fit": [], "heldout": []}, []
        for split in ("fit", "heldout"):
            for bi, feed in enumerate((self.fit if split == "fit" else self.heldout)()):
                t1 = time.perf_counter()
                vals = dict(zip(onames, sess.run(onames, feed)))
                s.secs["reference_ort"] += time.perf_counter() - t1
                entry = {}
                for ci, c in enumerate(s.chains):
                    y, view = vals[c.y], s.views[c.name]
                    rng = np.random.default_rng([self.seed, ci, bi, split == "heldout"])
                    pos = view.positions(y.shape, self._rows_per_batch(c), rng)
                    entry[c.name] = (pos, np.array(view.y_rows(y, pos), np.float32))
                s.cache[split].append(entry)
                if split == "heldout":
                    s.ref_outs.append([vals[o] for o in s.graph_outs])
        del sess
        if not s.cache["fit"] or not s.cache["heldout"]:
            raise ValueError("data-aware: the fit and the held-out calibration parts must each yield a batch")
        s.ref_power = sum(float(np.sum(np.asarray(o, np.float64) ** 2)) for b in s.ref_outs for o in b)
        s.rep.rows = {c.name: int(sum(e[c.name][1].shape[0] for e in s.cache["fit"])) for c in s.chains}
        s.secs["reference"] += time.perf_counter() - t0

    def _net_error(self, s, model) -> float:
        """Squared error of `model`'s graph outputs against the reference's, over the held-out batches."""
        sess = session_for(model)
        names = [o.name for o in sess.get_outputs()]
        idx = [names.index(o) for o in s.graph_outs]
        err = 0.0
        for bi, feed in enumerate(self.heldout()):
            out = sess.run(None, feed)
            err += sum(float(np.sum((np.asarray(out[i], np.float64) - r) ** 2)) for i, r in zip(idx, s.ref_outs[bi]))
        return err

    # ------------------------------------------------------------------ capture
    def _capture(self, s, wave: list[Chain]) -> tuple[dict, float]:
        """Fit moments and held-out rows of x̃ (from the model as compressed so far, or the reference) paired
        with the cached y, per chain of the wave; also the network error before the wave (net_check)."""
        acc = {"fit": {c.name: CrossMoment() for c in wave}, "heldout": {c.name: HeldOutRows() for c in wave}}
        if s.frontier is not None:
            t1 = time.perf_counter()
            s.frontier.advance(s.model, min(s.first_node[c.name] for c in wave))
            s.secs["capture_ort"] += time.perf_counter() - t1
            with one_blas_thread():
                for gbi, (split, bi) in enumerate(s.where):
                    for c in wave:
                        pos, Y = s.cache[split][bi][c.name]
                        acc[split][c.name].update(s.views[c.name].x_rows(s.frontier.get(gbi, c.x), pos), Y)
            return acc, (self._net_error(s, s.model) if self.net_check else 0.0)
        err_before = 0.0
        src = s.model if self.inputs == "compressed" else s.reference
        inputs = {i.name for i in src.graph.input}
        xs = [c.x for c in wave if c.x not in inputs]        # chains reading a graph input take it from the feed
        for split in ("fit", "heldout"):
            full = split == "heldout" and self.net_check and src is s.model   # also the network error
            t1 = time.perf_counter()
            sess = session_for(src, xs, prune=not full) if xs or full else None
            names = [o.name for o in sess.get_outputs()] if sess is not None else []
            for bi, feed in enumerate((self.fit if split == "fit" else self.heldout)()):
                res = dict(zip(names, sess.run(None, feed))) if sess is not None else {}
                with one_blas_thread():
                    for c in wave:
                        x = feed[c.x] if c.x in feed else res[c.x]
                        pos, Y = s.cache[split][bi][c.name]
                        acc[split][c.name].update(s.views[c.name].x_rows(np.asarray(x), pos), Y)
                if full:
                    err_before += sum(float(np.sum((np.asarray(res[o], np.float64) - r) ** 2))
                                      for o, r in zip(s.graph_outs, s.ref_outs[bi]))
            del sess
            s.secs["capture_ort"] += time.perf_counter() - t1
        return acc, err_before

    # ------------------------------------------------------------------ solve
    def _solve(self, s, wave: list[Chain], wi: int, acc: dict) -> tuple[list[LayerOutcome], dict]:
        """Candidates per chain, chosen on its held-out rows; the kept factors are written into the model."""
        outcomes, saved = [], {}
        for c in wave:
            fit_r = acc["fit"][c.name].regression()
            ho = acc["heldout"][c.name].finish()
            plain = chain_factors(c, s.inits)
            cen = c.centred if self.centred is None else (c.centred and self.centred)
            with one_blas_thread():
                if c.kind == "svd":
                    cands = svd_candidates(c.W, c.bias, c.ranks[0], fit_r, self.lams, cen, plain=plain)
                else:
                    cands = tucker2_candidates(c.W, c.bias, c.ranks[0], c.ranks[1], fit_r, plain,
                                               self.tucker2_lams, cen, self.als_iter, self.als_cg)
                ch = choose(cands, ho, fit_r if c.D * c.W.shape[0] <= 2**22 else None)
            saved[c.name] = plain
            if ch.data_aware:
                write_factors(c, s.model, s.inits, ch.chosen.factors, ch.chosen.bias)
            fit_db = None if ch.chosen.fit_mse is None else \
                round(10 * math.log10(max(fit_r.syy, 1e-300) / max(ch.chosen.fit_mse, 1e-300)), 3)
            W = c.W.reshape(c.W.shape[0], -1)
            w_err = float(np.linalg.norm(W - ch.chosen.W_hat) / max(np.linalg.norm(W), 1e-300))
            outcomes.append(LayerOutcome(
                c.name, c.kind, [int(r) for r in c.ranks], wi, ch.chosen.label, not ch.data_aware, ch.reason,
                round(ch.rel_db(ch.plain_mse), 3), round(ch.rel_db(ch.chosen.heldout_mse), 3),
                acc["fit"][c.name].rows, acc["heldout"][c.name].rows,
                {k: round(ch.rel_db(v), 3) for k, v in ch.scores.items()}, fit_db, round(w_err, 6)))
        return outcomes, saved

    # ------------------------------------------------------------------ checks
    def _wave_check(self, s, wave, wi, outcomes, saved, err_before) -> None:
        """net_check: revert the wave when the held-out network error rose; the wave's record either way."""
        changed = any(not o.fell_back for o in outcomes)
        names = [c.name for c in wave]
        if not (changed and self.net_check):
            s.rep.waves.append(WaveOutcome(wi, names, None, None, True,
                                           "no data-aware step kept" if not changed else "accepted (no check)"))
            return
        db_before = _sqnr_db(s.ref_power, err_before)
        err_new = self._net_error(s, s.model)
        db_new = _sqnr_db(s.ref_power, err_new)
        ok = err_new < err_before
        if not ok:
            for c in wave:
                write_factors(c, s.model, s.inits, saved[c.name], c.bias)
            for o in outcomes:
                if not o.fell_back:
                    o.fell_back, o.kept, o.heldout_db_kept = True, "plain", o.heldout_db_plain
                    o.reason = (f"wave {wi}: network held-out SQNR {db_new:.2f} dB with the data-aware factors "
                                f"<= {db_before:.2f} dB plain")
        s.rep.waves.append(WaveOutcome(wi, names, round(db_before, 3), round(db_new, 3), ok,
                                       "accepted" if ok else "network held-out error rose: wave reverted"))

    def _final_check(self, s, plain_all: dict) -> None:
        """The held-out network error of the result against the all-plain model's; every chain reverts to
        plain when it is higher."""
        if s.frontier is not None:
            s.frontier.advance(s.model, len(s.model.graph.node))
            n_fit = len(s.cache["fit"])
            err = sum(float(np.sum((np.asarray(s.frontier.get(n_fit + bi, o), np.float64) - r) ** 2))
                      for bi in range(len(s.ref_outs)) for o, r in zip(s.graph_outs, s.ref_outs[bi]))
        else:
            err = self._net_error(s, s.model)
        rep = s.rep
        rep.net_db_final = _sqnr_db(s.ref_power, err)
        if rep.net_db_final >= rep.net_db_plain:
            return
        for c in s.chains:
            write_factors(c, s.model, s.inits, plain_all[c.name], c.bias)
        for o in rep.layers:
            if not o.fell_back:
                o.fell_back, o.kept, o.heldout_db_kept = True, "plain", o.heldout_db_plain
                o.reason = (f"whole model: held-out network SQNR {rep.net_db_final:.2f} dB below the all-plain "
                            f"model's {rep.net_db_plain:.2f} dB")
        rep.net_db_final = rep.net_db_plain


# ------------------------------------------------------------------------------------------ the pass
class DataAwarePass(Pass):
    """`--data-aware`: SequentialDataAware on the model the factorization passes produced, against `reference`
    (the model they started from). The report's facts: `info["data_aware"]` = SeqReport.to_dict(). When no chain
    keeps data-aware factors the input model is returned unchanged."""
    name = "DataAware"
    lossless = False

    def __init__(self, reference: onnx.ModelProto, fit: FeedsFactory, heldout: FeedsFactory, n_fit_batches: int,
                 n_heldout_batches: int, **options):
        self.reference = reference
        self.args = (fit, heldout, n_fit_batches, n_heldout_batches)
        self.options = options

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        out, rep = SequentialDataAware(*self.args, progress=ctx.note, **self.options).run(model, self.reference)
        info = {"data_aware": rep.to_dict()}
        if all(l.fell_back for l in rep.layers):
            return PassResult(model=model, modified=False, info=info)
        return PassResult(model=out, modified=True, info=info)
