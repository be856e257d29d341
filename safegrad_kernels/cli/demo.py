"""`safegrad demo`: the embedded miniature, harmful fine-tuning vs SafeGrad, on CPU.

The options and the run belong to the ``demo`` package (``python -m safegrad_kernels.demo``
takes the same ones); this module only delegates to it.
"""

from __future__ import annotations

from .args import delegated

__all__ = ["HELP", "NAME", "OPTIONS_ONLY_WHEN_CHOSEN", "add_arguments", "run"]

NAME = "demo"
HELP = "the embedded miniature: harmful fine-tuning vs SafeGrad, on CPU"
# The options come from the demo package (model, world, plotting), so `build_parser` adds
# them only when `demo` is the command: no other command imports or depends on it.
OPTIONS_ONLY_WHEN_CHOSEN = True

add_arguments, run = delegated(NAME, "safegrad_kernels.demo")
