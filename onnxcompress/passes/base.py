"""Pass infrastructure: a pass takes a ModelProto and returns a PassResult (new model, whether it changed
anything, per-layer records). The PassManager (pipeline.py) times and verifies each pass."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import onnx


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


Progress = Callable[[str], None]


class Pass:
    """Base class. Subclasses set `name`, and implement `run`."""
    name: str = "pass"
    #: lossless passes are compared with the previous model on ORT after they run
    lossless: bool = False

    def run(self, model: onnx.ModelProto, progress: Progress | None = None) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, progress: Progress | None = None) -> PassResult:
        return self.run(model, progress)
