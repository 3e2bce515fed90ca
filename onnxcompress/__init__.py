"""onnxcompress: ONNX-in/ONNX-out tensor decomposition plus quantization, verified on ONNX Runtime."""
from ._version import __version__  # noqa: E402

from .recipe import Recipe  # noqa: E402


def optimize(model, recipe=None, calibration=None, eval_data=None, progress=None):
    """Compress a model (path or ModelProto) by a Recipe; returns a Result (`.model`, `.report`, `.passed`,
    `.save(path)`). See `onnxcompress.pipeline.optimize`."""
    from .pipeline import optimize as _optimize

    return _optimize(model, recipe, calibration=calibration, eval_data=eval_data, progress=progress)


__all__ = ["Recipe", "optimize", "__version__"]
