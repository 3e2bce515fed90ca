"""onnxcompress: ONNX-in/ONNX-out tensor decomposition plus quantization."""
