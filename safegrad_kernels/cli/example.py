"""`safegrad example`: a tiny model folder and sample data, and the train/eval commands to try.

Writes a 2-layer Llama Hugging Face folder (random weights, a byte-level BPE tokenizer with
a chat template) and small data files in every accepted format into FOLDER, then prints
the exact `safegrad train` and `safegrad eval` commands that use them. The work is
``safegrad_kernels.example``.
"""

from __future__ import annotations

import argparse

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "example"
HELP = "write a tiny model and sample data, and print train/eval commands to try"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folder",
        nargs="?",
        default="safegrad_example",
        help="where to write (new, empty, or an earlier example folder)",
    )


def run(args: argparse.Namespace) -> int:
    from .. import example

    written = example.write_example(args.folder)
    print("\n".join(example.describe(written)))
    return 0
