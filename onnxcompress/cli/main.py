"""Command line: builds the parser from the sub-command modules and maps errors to exit codes. No logic of its
own: every sub-command is one module (`add_parser`, `run`) over the Python API."""
from __future__ import annotations

import logging
import sys
import traceback

from ..errors import OnnxCompressError, UserError, VerificationError
from . import analyze, bench, inspect, optimize, validate, zoo
from .common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser

COMMANDS = {"inspect": inspect, "optimize": optimize, "validate": validate, "bench": bench, "analyze": analyze,
            "zoo": zoo}


def build_parser() -> Parser:
    p = Parser(prog="onnxcompress", description="Compress CNNs on their ONNX graphs: Tucker2 / CP / SVD "
               "factorization, then INT8 / FP16 quantization, verified on ONNX Runtime.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    return p


def _quiet_onnxruntime(debug: bool) -> None:
    """ORT's C++ logger writes straight to stderr; our errors are one line, so keep it to fatal only."""
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(2 if debug else 4)
    except Exception:  # noqa: BLE001 - best effort
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_onnxruntime(debug)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.version:
            from .._version import __version__
            print(__version__)
            return EXIT_OK
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("onnxcompress: interrupted (no output written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, VerificationError, OnnxCompressError) as e:
        if debug:
            traceback.print_exc()
        print(f"onnxcompress: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("onnxcompress: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit:
        raise
    except Exception as e:  # unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"onnxcompress: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
