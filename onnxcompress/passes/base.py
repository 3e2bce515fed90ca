"""Pass infrastructure: a pass takes a ModelProto and returns a PassResult (the new model, whether it changed
anything, per-layer records, facts for the report, and hand-offs for later passes). The PassManager
(passes/manager.py) runs passes in order, times and verifies each one; a pass knows no pipeline and no planner.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import onnx

Progress = Callable[[str], None]


@dataclass
class LayerRecord:
    """What a pass did (or refused to do) to one layer. Serialised as-is into the report."""
    name: str
    op: str
    method: str
    kernel_shape: list[int] | None = None
    ranks: list[int] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    weight_rel_error: float | None = None
    skipped: str | None = None          # reason; None when the layer was rewritten
    precision: str | None = None        # "int8" | "float" | "fp16" as the layer runs in the result
    predicted_degradation: float | None = None   # output-noise energy the planner predicted for this layer
    measured_latency_gain: float | None = None   # ms saved by this layer, one-layer timing (auto, guard)
    new_nodes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    layers: list[LayerRecord] = field(default_factory=list)
    lossless: bool = False               # outputs must equal the previous model's (verified on ORT)
    info: dict[str, Any] = field(default_factory=dict)   # pass-level facts for the report
    #: facts for later passes, merged into PassContext.handoff by the manager: lists are extended
    #: (e.g. "float_nodes": nodes the INT8 pass must keep in float, "int16_tensors": 16-bit activations)
    handoff: dict[str, list] = field(default_factory=dict)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    lossless: bool = False
    verified: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may see of the run besides the model: a progress callback and the hand-offs of the passes
    that ran before it."""
    progress: Progress | None = None
    handoff: dict[str, list] = field(default_factory=dict)

    def note(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def absorb(self, res: PassResult) -> None:
        for k, v in res.handoff.items():
            self.handoff.setdefault(k, []).extend(v)


class Pass:
    """Base class. Subclasses set `name` and implement `run(model, ctx)`."""
    name: str = "pass"
    #: lossless passes are compared with the previous model on ORT after they run
    lossless: bool = False

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        return self.run(model, ctx)


@dataclass
class Wiring:
    """What the pipeline hands a method's `build` besides the plan: the recipe (a plain config object; passes
    read the fields they need), the pipeline's input shapes, calibration feeds (None without real or random
    data), whether those feeds are real data, whether a quantization pass follows, and an optional factor cache (sensitivity sweeps)."""
    recipe: Any
    shapes: dict[str, tuple[int, ...]]
    calibration: Callable[[], Any] | None = None
    calibration_real: bool = False
    quantized: str = "none"            # "int8" | "int4" | "fp16" | "none": what follows the decomposition
    factor_cache: Any = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """A factorization method as the registry lists it: its name, its cost model (what the planner sees) and
    how the pipeline builds its pass from a rank policy (the plan) and the wiring."""
    name: str
    cost: Any
    build: Callable[[Callable, Wiring], Pass]
