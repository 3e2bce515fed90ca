"""The command line (`onnxcompress ...`): one module per sub-command, shared options in common.py."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
