"""The latency guard's verdict, made stable: sequential timing rounds until the verdict is clear, a margin the
chain must beat (a tie keeps the conv), and a per-machine disk cache of the timings.

Why: one handful of runs per layer made the guard keep 1, 2, 3 or 4 of the digits CNN's 6 convs in four runs
of the same command (MACs 1.75x to 1.26x): most of those chains run within ±5 % of their conv, and the
verdict followed the noise.

Decision (:func:`decide`), from rounds of (conv seconds, chain seconds), each the fastest of a handful of
interleaved runs, at least `MIN_ROUNDS` (4) of them:
  * the estimate is fastest conv round / fastest chain round (stalls only ever add time); its relative
    uncertainty is how far each side's second-fastest round lies from its fastest, summed (at least 2 %);
  * "chain" when the estimate less that uncertainty still exceeds `need` (default 1.05: 5 % faster),
    "conv" when the estimate plus it falls short; so a chain needs >= 1.07x to replace the conv and one
    below 1.03x keeps it, whatever the noise of the run;
  * otherwise another round, up to `MAX_ROUNDS` (10); still unclear then, the estimate decides with the
    narrowest band (2 %): a chain measured >= 1.07x replaces the conv, anything closer is a tie, and a tie
    keeps the conv.
The margin ``estimate / need - 1`` is reported per layer.
Measured with a noisy fake timer (tests/test_guard_stable.py: |N(0, 3 %)| per round and one round in 8
stalled by 20–80 % on either side): 2 of 2700 layer decisions differed from the majority over 300 runs.

Cache: ``<cache>/latency/<key>.json`` with the rounds, keyed by everything the timing depends on (input
shape, the conv and chain specs, precision, provider, threads, ONNX Runtime version, CPU model). A later run
on the same machine decides from the stored rounds — the same verdict, without timing again. `<cache>`:
``$ONNXCOMPRESS_CACHE`` or ``~/.cache/onnxcompress``; ``ONNXCOMPRESS_LATENCY_CACHE`` names another folder,
or ``off`` disables it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CACHE_VERSION = 1
DEFAULT_NEED = 1.05
MAX_ROUNDS = 10
MIN_ROUNDS = 4
Z = 1.0
MIN_REL_SE = 0.02


@dataclass
class Verdict:
    kept: str               # "chain" | "conv"
    clear: bool             # False: still a tie after max_rounds (the conv is kept)
    speedup: float          # median over rounds of t_conv / t_chain
    lo: float               # speedup - Z * se
    hi: float               # speedup + Z * se
    need: float
    rounds: int

    @property
    def margin(self) -> float:
        """How far the estimate is from what the chain needs: +0.20 = 20 % above, -0.10 = 10 % below."""
        return self.speedup / self.need - 1.0


def decide(rounds: Sequence[tuple[float, float]], need: float = DEFAULT_NEED, final: bool = False) -> Verdict | None:
    """The verdict from the rounds so far, or None when another round is needed (never with `final`)."""
    n = len(rounds)
    a = sorted(x for x, _ in rounds)
    b = sorted(y for _, y in rounds)
    est = a[0] / b[0] if b[0] > 0 else float("inf")
    # the fastest round of each side estimates its time (stalls only add); how far the second fastest is
    # from it says how much to trust that
    gap = ((a[1] - a[0]) / a[0] + (b[1] - b[0]) / b[0]) if n >= 2 and a[0] > 0 and b[0] > 0 else 0.0
    rel = max(gap, MIN_REL_SE)
    lo, hi = est * (1 - Z * rel), est * (1 + Z * rel)
    if n < MIN_ROUNDS and not final:
        return None
    if lo > need:
        return Verdict("chain", True, est, lo, hi, need, n)
    if hi < need:
        return Verdict("conv", True, est, lo, hi, need, n)
    if not final:
        return None
    # still noisy after the last round: the estimate decides with the narrowest band; inside it, a tie
    lo, hi = est * (1 - Z * MIN_REL_SE), est * (1 + Z * MIN_REL_SE)
    kept = "chain" if lo > need else "conv"
    return Verdict(kept, kept == "conv" and hi < need, est, lo, hi, need, n)


def measure(timer_round, need: float = DEFAULT_NEED, max_rounds: int = MAX_ROUNDS,
            rounds: list | None = None) -> tuple[Verdict, list[tuple[float, float]]]:
    """Call `timer_round() -> (t_conv, t_chain)` until :func:`decide` is clear (or `max_rounds`); `rounds`:
    already measured ones (from the cache) to start from."""
    rounds = list(rounds or [])
    while True:
        if rounds:
            v = decide(rounds, need, final=len(rounds) >= max_rounds)
            if v is not None:
                return v, rounds
        a, b = timer_round()
        rounds.append((float(a), float(b)))


# ------------------------------------------------------------------------------------------ disk cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_dir() -> Path | None:
    """``$ONNXCOMPRESS_LATENCY_CACHE`` (a folder, or off/0/no: no disk cache), else ``<cache>/latency``."""
    env = os.environ.get("ONNXCOMPRESS_LATENCY_CACHE", "").strip()
    if env.lower() in ("off", "0", "no", "false"):
        return None
    if env:
        return Path(env).expanduser()
    from .._cachedir import cache_dir

    return cache_dir() / "latency"


class TimingCache:
    """Rounds of timings per key on disk, one small JSON file per key (written atomically)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self.hits = 0
        self.writes = 0

    @staticmethod
    def key(**parts) -> str:
        import onnxruntime

        parts = {**parts, "ort": onnxruntime.__version__, "cpu": cpu_model(), "v": CACHE_VERSION}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> list[tuple[float, float]] | None:
        if self.root is None:
            return None
        try:
            d = json.loads((self.root / f"{key}.json").read_text())
            rounds = [(float(a), float(b)) for a, b in d["rounds"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not rounds:
            return None
        self.hits += 1
        return rounds

    def put(self, key: str, rounds: Sequence[tuple[float, float]], about: dict | None = None) -> None:
        if self.root is None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            from ..ir.modelio import write_text_atomic

            write_text_atomic(json.dumps({"rounds": [list(r) for r in rounds], "about": about or {}}),
                              self.root / f"{key}.json")
            self.writes += 1
        except OSError:   # a read-only home: the guard still works, just without the cache
            pass
