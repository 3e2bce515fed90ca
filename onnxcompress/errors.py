"""Error types. `UserError` means bad input or usage: the CLI prints it on one line and exits 2."""


class OnnxCompressError(Exception):
    """Base class of the errors this package raises on purpose."""


class UserError(OnnxCompressError):
    """Bad input or usage (missing file, not ONNX, bad flag value). CLI exit code 2."""


class VerificationError(OnnxCompressError):
    """A pass produced a model that failed verification. Names the pass and, where known, the layer."""

    def __init__(self, pass_name: str, message: str, layer: str | None = None):
        self.pass_name = pass_name
        self.layer = layer
        where = f"pass {pass_name}" + (f", layer {layer}" if layer else "")
        super().__init__(f"verification failed after {where}: {message}")
