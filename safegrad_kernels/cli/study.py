"""`safegrad study`: SafeGrad versus the multi-objective baseline, paired seeds and intervals.

The design, the run cache, the statistics and the report belong to
``safegrad_kernels.demo.study``; this module only delegates to it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HELP", "NAME", "OPTIONS_ONLY_WHEN_CHOSEN", "add_arguments", "run"]

NAME = "study"
HELP = "the demo as a paired-seed study with bootstrap intervals (resumable, cached runs)"
# Like the demo's: the options come from the demo package, imported only for this command.
OPTIONS_ONLY_WHEN_CHOSEN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from ..demo import study
    except ImportError as exc:  # e.g. the demo extras are not installed
        parser.set_defaults(study_import_error=str(exc))
        return
    study.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "study_import_error", None):
        print(f"safegrad study: unavailable ({args.study_import_error})", file=sys.stderr)
        return 1
    from ..demo import study

    study.run(args)
    return 0
