"""`safegrad study`: SafeGrad versus the multi-objective baseline, paired seeds and intervals.

The design, the run cache, the statistics and the report belong to
``safegrad_kernels.demo.study``; this module only delegates to it.
"""

from __future__ import annotations

from .args import delegated

__all__ = ["HELP", "NAME", "OPTIONS_ONLY_WHEN_CHOSEN", "add_arguments", "run"]

NAME = "study"
HELP = "the demo as a paired-seed study with bootstrap intervals (resumable, cached runs)"
# Like the demo's: the options come from the demo package, imported only for this command.
OPTIONS_ONLY_WHEN_CHOSEN = True

add_arguments, run = delegated(NAME, "safegrad_kernels.demo.study")
