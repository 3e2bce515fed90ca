"""Recipe: every `optimize` flag is one field; `--recipe file.toml` fills the same fields, and a
`[layers."glob"]` table overrides method, ranks, ratio or skip per layer."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

METHODS = ("auto", "tucker2", "cp4", "cp3", "svd", "none")
QUANTIZE = ("auto", "int8", "int4", "fp16", "none")
OBJECTIVES = ("latency", "size")
EXECUTORS = ("local", "ray")
ALLOCATIONS = ("uniform", "later-first", "sensitivity")
PROVIDER_NAMES = ("cpu", "cuda", "tensorrt")


@dataclass
class LayerOverride:
    method: str | None = None
    ranks: list[int] | None = None      # tucker2: [r3, r4]; cp: [R]; svd: [r]
    ratio: float | None = None
    skip: bool = False
    precision: str | None = None        # "int8" | "float" (keep this layer out of INT8)


@dataclass
class Recipe:
    method: str = "auto"                 # auto: the budgeted search (onnxcompress.auto)
    ratio: float | None = None           # default 2 when no --rank / --target-macs is given
    target_macs: float | None = None
    rank: str | None = None              # "vbmf" or "vbmf:<weakening>"
    allocation: str = "uniform"
    sensitivity: str | None = None       # analyze JSON for --allocation sensitivity (None: measured on the fly)
    sensitivity_metric: str = "auto"     # predicted degradation: auto | top1 | noise | accuracy
    data_aware: bool = False
    quantize: str = "auto"               # auto: INT8 per node where the budget allows (needs calibration data)
    objective: str = "latency"           # what --method auto maximises under the budget: latency | size
    int8_activations: str | None = None  # override the provider default ("uint8" | "int8")
    int8_weights: str | None = None
    # quantization-aware factorization (passes/qaf.py): None = on whenever a factorized layer is quantized
    qaf: bool | None = None
    fuse: bool = True                    # merge the chains' linear neighbours before quantization (passes/fuse.py)
    # INT4 (--quantize int4; passes/int4.py): a size format on ORT CPU
    int4_activations: str = "float"      # float (weight-only, no calibration) | int8 (the provider's INT8 layout)
    int4_block_size: int = 32            # MatMulNBits block along K (power of two >= 16)
    int4_accuracy_level: int | None = None   # MatMulNBits accuracy_level (4: int8 activations inside the kernel)
    calibration: str | None = None       # DIR | FILE.npy | FILE.npz | random
    calibration_samples: int = 32
    preprocess: str | None = None        # imagenet | cifar10 | digits (image folders)
    eval_data: str | None = None
    eval_samples: int | None = 1000
    labels: str | None = None
    input_shape: dict[str, list[int]] = field(default_factory=dict)
    skip_first: bool = True
    include: list[str] = field(default_factory=list)   # name globs; empty = all
    exclude: list[str] = field(default_factory=list)
    layers: dict[str, LayerOverride] = field(default_factory=dict)
    fold_bn: bool = True
    verify: bool = True
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    allow_unavailable_providers: bool = False   # else a provider that cannot run here is an error
    min_top1_agreement: float | None = None   # gate; the auto budget (default 0.99) for classifier outputs
    max_accuracy_drop: float | None = None    # points; gate; the auto budget (default 1.0) with labelled data
    min_sqnr: float | None = None             # dB; gate; the auto budget (default 30) for other outputs
    min_speedup: float | None = None
    allow_worse: bool = False            # auto: write the best candidate even when it misses the budget
    strict: bool = False                 # a WARNING (result below a floor, slower, larger) fails the run (exit 1)
    jobs: int | None = None              # worker processes for sensitivity measurements (None: up to 4 cores)
    executor: str = "local"              # local | ray
    latency_guard: bool | None = None    # None = on for the CPU provider
    rank_multiple: int | None = None     # round ranks to a multiple of this; None = 16 (else 8) for the CPU provider
    report: str | None = None
    plots: str | None = None
    seed: int = 0
    # CP4/CP3 (--method cp4|cp3; passes/cp.py)
    cp_epc: bool | None = None           # None = on when the recipe quantizes to INT8
    cp_balance: str = "sqrt_size"        # sqrt_size | equal | none
    cp_equalize: str | None = None       # none | data-free | data; None = data with calibration data, else data-free
    cp_fallback: str = "keep-float"      # κ > cp_kappa_max under INT8: keep-float | int16 | tucker2 | none
    cp_kappa_max: float = 2.5            # measured: benchmarks/cp_int8_evidence.py
    max_memory_mb: int = 4096            # refuse a layer decomposition whose working set would exceed this
    # SVD (--method svd; passes/svd.py) and data-aware mode (--data-aware; passes/data_aware.py)
    svd_gemm: bool = False               # --method tucker2: also SVD Gemm/MatMul weights (1x1 convs always)
    svd_skip_last: bool = True           # leave the graph's last Gemm/MatMul (the classifier) alone
    data_aware_method: str = "kron"      # data-aware Σ-Tucker2 of k×k convs: kron (Kronecker-whitened init + the
                                         # closed-form last factor/core) | als (+ 2 Tucker2-ALS-Σ sweeps)
    data_aware_refit: bool = True        # fit each layer to the outputs of the original model from its inputs in
                                         # the model compressed so far (compensates upstream errors); False: its
                                         # inputs in the original model

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Recipe":
        self.layers = {k: (LayerOverride(**{kk.replace("-", "_"): vv for kk, vv in v.items()})
                           if isinstance(v, dict) else v) for k, v in self.layers.items()}
        _choice("method", self.method, METHODS)
        _choice("quantize", self.quantize, QUANTIZE)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("executor", self.executor, EXECUTORS)
        if self.jobs is not None and (not isinstance(self.jobs, int) or self.jobs < 1):
            raise UserError(f"jobs must be an integer >= 1 (got {self.jobs})")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise UserError(f"min_sqnr must be a finite number of dB (got {self.min_sqnr})")
        _choice("sensitivity_metric", self.sensitivity_metric, ("auto", "top1", "noise", "accuracy"))
        for p in self.providers:
            _choice("providers", p, PROVIDER_NAMES)
        if self.int8_activations is not None:
            _choice("int8_activations", self.int8_activations, ("uint8", "int8"))
        if self.int8_weights is not None:
            _choice("int8_weights", self.int8_weights, ("uint8", "int8"))
        _choice("int4_activations", self.int4_activations, ("float", "int8"))
        b = self.int4_block_size
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise UserError(f"int4_block_size must be a power of two >= 16 (got {b})")
        if self.int4_accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise UserError(f"int4_accuracy_level must be 0..4 (got {self.int4_accuracy_level})")
        if self.ratio is not None and not self.ratio > 1:
            raise UserError(f"ratio must be > 1 (got {self.ratio}): it is how many times smaller the layers get")
        if self.target_macs is not None and not 0 < self.target_macs < 1:
            raise UserError(f"target_macs must be in (0, 1) (got {self.target_macs}): the fraction of MACs to keep")
        if self.rank is not None:
            parse_rank(self.rank)
        if self.calibration_samples < 1:
            raise UserError("calibration_samples must be >= 1")
        for name, v in (("min_top1_agreement", self.min_top1_agreement),):
            if v is not None and not 0 <= v <= 1:
                raise UserError(f"{name} must be in [0, 1] (got {v})")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise UserError(f"max_accuracy_drop is in points, 0..100 (got {self.max_accuracy_drop})")
        if self.rank_multiple is not None and (not isinstance(self.rank_multiple, int) or self.rank_multiple < 1):
            raise UserError(f"rank_multiple must be an integer >= 1 (got {self.rank_multiple})")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UserError(f"min_speedup must be > 0 (got {self.min_speedup})")
        _choice("data_aware_method", self.data_aware_method, ("als", "kron"))
        _choice("cp_balance", self.cp_balance, ("sqrt_size", "equal", "none"))
        if self.cp_equalize is not None:
            _choice("cp_equalize", self.cp_equalize, ("none", "data-free", "data"))
        _choice("cp_fallback", self.cp_fallback, ("keep-float", "int16", "tucker2", "none"))
        if not self.cp_kappa_max > 0:
            raise UserError(f"cp_kappa_max must be > 0 (got {self.cp_kappa_max})")
        for key, o in self.layers.items():
            if o.method is not None:
                _choice(f"layers.{key}.method", o.method, METHODS)
            if o.ratio is not None and not o.ratio > 1:
                raise UserError(f"layers.{key}.ratio must be > 1")
            if o.ranks is not None and (not o.ranks or any(int(r) < 1 for r in o.ranks)):
                raise UserError(f"layers.{key}.ranks must be positive integers")
            if o.precision is not None:
                _choice(f"layers.{key}.precision", o.precision, ("int8", "float"))
        return self

    def resolved_jobs(self) -> int:
        """Worker processes for sensitivity sweeps: `jobs`, else the cores this process may use (at most 4)."""
        if self.jobs is not None:
            return self.jobs
        import os
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(4, n))

    def override_for(self, name: str, index: int) -> LayerOverride | None:
        """The per-layer override whose key matches the layer name (glob) or its conv index ('#3')."""
        for key, o in self.layers.items():
            if key == f"#{index}" or fnmatch.fnmatchcase(name, key):
                return o
        return None

    def layer_rule(self, name: str, index: int, methods) -> tuple[LayerOverride | None, str | None]:
        """The layer's override and, when the override alone leaves the layer untouched (skip, or another
        method than `methods`), the reason."""
        o = self.override_for(name, index)
        if o is not None:
            if o.skip:
                return o, "skipped by the recipe"
            if o.method is not None and o.method not in methods:
                return o, f"recipe asks for method {o.method}"
        return o, None

    def selected(self, name: str) -> str | None:
        """None when the layer is selected, else why not."""
        if self.include and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return "not matched by --include"
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return "excluded by --exclude"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ TOML
    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"no such recipe file: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {p} is not valid TOML: {e}") from e
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, where=str(p))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
        layers = {}
        for key, val in (data.pop("layers", None) or {}).items():
            if not isinstance(val, dict):
                raise UserError(f"{where}: layers.{key} must be a table")
            val = {k.replace("-", "_"): v for k, v in val.items()}
            lk = {f.name for f in dataclasses.fields(LayerOverride)}
            bad = sorted(set(val) - lk)
            if bad:
                raise UserError(f"{where}: layers.{key}: unknown field(s) {', '.join(bad)}")
            layers[key] = LayerOverride(**val)
        if isinstance(data.get("providers"), str):
            data["providers"] = [p.strip() for p in data["providers"].split(",") if p.strip()]
        if isinstance(data.get("input_shape"), str):
            data["input_shape"] = parse_input_shapes([data["input_shape"]])
        try:
            r = cls(**data, layers=layers)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from e
        return r.validate()


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise UserError(f"invalid {name} {value!r}: choose from {', '.join(options)}")


def parse_rank(spec: str) -> float:
    """'vbmf' → weakening 1.0; 'vbmf:0.6' → 0.6."""
    head, _, w = spec.partition(":")
    if head != "vbmf":
        raise UserError(f"invalid --rank {spec!r}: use vbmf or vbmf:<weakening in [0,1]>")
    try:
        wf = float(w) if w else 1.0
    except ValueError:
        raise UserError(f"invalid --rank {spec!r}: weakening must be a number in [0, 1]") from None
    if not 0 <= wf <= 1:
        raise UserError(f"invalid --rank {spec!r}: weakening must be in [0, 1]")
    return wf


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """['input:1x3x224x224'] → {'input': [1, 3, 224, 224]}."""
    out = {}
    for s in specs:
        name, sep, dims = s.rpartition(":")
        if not sep or not name:
            raise UserError(f"invalid --input-shape {s!r}: use NAME:1x3x224x224")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise UserError(f"invalid --input-shape {s!r}: dimensions must be integers like 1x3x224x224") from None
        if any(d < 1 for d in shape):
            raise UserError(f"invalid --input-shape {s!r}: dimensions must be >= 1")
        out[name] = shape
    return out
