"""What every sub-command shares, declared once: the parser class (usage errors are one-line UserErrors), number
parsing, --quiet/--debug, --input-shape, --providers, the data options, the progress printer, exit codes."""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2; main() adds the "onnxcompress: error:" prefix
        raise UserError(f"{self.prog.removeprefix('onnxcompress ')}: {message}" if self.prog != "onnxcompress"
                        else message)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with defaults stated (only where an option has a real default; `None` shows nothing)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def add_common(sp) -> None:
    g = sp.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress output and no table")
    g.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def add_input_shape(sp) -> None:
    sp.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                    help="concrete shape of a model input with dynamic dimensions (repeatable)")


def add_providers(sp, default: str | None = "cpu") -> None:
    sp.add_argument("--providers", default=default, metavar="LIST",
                    help="ONNX Runtime execution providers, comma-separated: cpu, cuda, tensorrt")


def add_data(sp, flag: str = "--data", required: bool = False, what: str = "data") -> None:
    sp.add_argument(flag, required=required, metavar="DATA",
                    help=f"{what}: DIR (image folder, class sub-folders) | FILE.npy | FILE.npz | cifar-10-batches-py "
                         f"| random")
    sp.add_argument("--labels", metavar="FILE", help="labels file for image folders or .npy data")
    sp.add_argument("--preprocess", metavar="PRESET", help="image preset: imagenet | cifar10 | digits "
                    "(default: derived from the model's input shape)")


def providers(spec: str) -> list[str]:
    from ..ort.session import PROVIDERS

    provs = [p.strip().lower() for p in (spec or "").split(",") if p.strip()]
    if not provs:
        raise UserError("--providers is empty")
    bad = [p for p in provs if p not in PROVIDERS]
    if bad:
        raise UserError(f"unknown provider {bad[0]!r} (choose from {', '.join(PROVIDERS)})")
    return list(dict.fromkeys(provs))


def progress_printer(args):
    """Progress lines on stderr with the elapsed time (also when stderr is not a terminal); None with --quiet."""
    if args.quiet:
        return None
    t0 = time.perf_counter()

    def show(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return show


def check_files(paths) -> None:
    from pathlib import Path

    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"no such file: {p}")
