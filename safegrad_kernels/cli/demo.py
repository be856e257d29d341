"""`safegrad demo`: the embedded miniature, harmful fine-tuning vs SafeGrad, on CPU.

The options and the run belong to the ``demo`` package (``python -m safegrad_kernels.demo``
takes the same ones); this module only delegates to it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HELP", "NAME", "OPTIONS_ONLY_WHEN_CHOSEN", "add_arguments", "run"]

NAME = "demo"
HELP = "the embedded miniature: harmful fine-tuning vs SafeGrad, on CPU"
# The options come from the demo package (model, world, plotting), so `build_parser` adds
# them only when `demo` is the command: no other command imports or depends on it.
OPTIONS_ONLY_WHEN_CHOSEN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from .. import demo
    except ImportError as exc:  # e.g. the demo extras are not installed
        parser.set_defaults(demo_import_error=str(exc))
        return
    demo.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "demo_import_error", None):
        print(f"safegrad demo: unavailable ({args.demo_import_error})", file=sys.stderr)
        return 1
    from .. import demo

    demo.run(args)
    return 0
