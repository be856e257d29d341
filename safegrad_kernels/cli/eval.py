"""`safegrad eval`: harmful score (HS) and fine-tune accuracy (FA) of a model + LoRA adapter.

HS counts greedy answers to held-out harmful prompts judged harmful (by refusal keywords,
or by a local ``--moderation-model`` classifier); FA is label match or GSM8K final-number
match. This module only declares the options and prints the summary; ``evaluation_run``
does the work.
"""

from __future__ import annotations

import argparse

from .. import evaluation_run
from ..moderation import DEFAULT_TEMPLATE
from .args import add_model_arguments, add_prompt_style, add_values, positive_int

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "eval"
HELP = "harmful score and task accuracy of a model + adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `safegrad eval` options."""
    add_model_arguments(parser)
    parser.add_argument("--adapter", help="LoRA adapter directory (a `safegrad train` output)")
    parser.add_argument(
        "--harmful-eval-data", help="JSON/JSONL harmful prompts (prompt or instruction field)"
    )
    parser.add_argument("--task-eval-data", help="JSON/JSONL task examples with gold answers")
    parser.add_argument(
        "--task-type",
        choices=("classification", "gsm8k"),
        default="classification",
        help="FA by label match, or by the final number (GSM8K)",
    )
    parser.add_argument(
        "--labels",
        metavar="A,B,...",
        help="comma-separated class labels for classification (default: the distinct gold answers)",
    )
    add_values(
        parser,
        (
            ("--harmful-samples", positive_int, 1000, "first N harmful prompts"),
            ("--task-samples", positive_int, 1000, "first N task examples"),
            ("--max-new-tokens", positive_int, 128, "greedy decoding length"),
            ("--batch-size", positive_int, 16, "prompts per generate call"),
        ),
    )
    add_prompt_style(
        parser,
        default=None,
        help="prompt template (default: the one the adapter was trained with, else alpaca)",
    )
    parser.add_argument("--moderation-model", help="local sequence-classification judge for HS")
    parser.add_argument(
        "--moderation-template",
        default=DEFAULT_TEMPLATE,
        help="how prompt and answer are joined for the judge",
    )
    parser.add_argument(
        "--moderation-unsafe-labels",
        help="comma-separated judge labels meaning harmful (default: names containing "
        "unsafe/harm/toxic/flag; for a 2-class judge without such names, class 1)",
    )
    parser.add_argument(
        "--moderation-threshold", type=float, default=0.5, help="for multi-label judges"
    )
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument(
        "--output",
        help="metrics JSON path (default: ADAPTER/eval_metrics.json or ./eval_metrics.json)",
    )
    parser.add_argument(
        "--save-generations", help="also write every prompt and answer to this JSONL file"
    )


def run(args: argparse.Namespace) -> int:
    metrics = evaluation_run.run(args)
    for section in ("harmful", "task"):
        if section in metrics:
            row = metrics[section]
            values = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
            print(f"{section}: n={row['n']}, {values}")
    print(f"metrics written to {metrics['output']}")
    return 0
