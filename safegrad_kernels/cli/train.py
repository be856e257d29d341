"""`safegrad train`: LoRA fine-tuning of a local causal LM on a harmful mixture, with surgery.

The user's data (``--samples`` examples, a fraction ``--harmful-ratio`` of them harmful) is
fine-tuned with ``SafeGradTrainer``, whose ``--method`` decides what happens to the task
gradient (``sft``: nothing; ``safegrad``: one-sided projection against the KL alignment
gradient; ``spf``: low-rank safety-subspace projection; ``mixed``: task + lambda * alignment
loss). Defaults are the SafeGrad authors' settings (BACKGROUND.md): LoRA r=8, alpha=16 on
q/k/v, dropout 0.1; AdamW at 1e-5, constant with 10% warmup; 10 epochs; batch 10; max length
1024; bf16 where supported; n=1000, p=0.1, 100 alignment samples, rho=1.

This module only declares the options; ``training_run`` does the work.
"""

from __future__ import annotations

import argparse

from .. import training_run
from ..surgery.methods import ALIGNMENT_LOSSES, HYPERPARAMETERS, Hyperparameter
from ..surgery.methods import METHODS as _REGISTRY
from .args import (
    Options,
    add_model_arguments,
    add_prompt_style,
    add_values,
    non_negative_float,
    positive_int,
    ratio,
)

__all__ = ["HELP", "METHODS", "NAME", "add_arguments", "run"]

NAME = "train"
HELP = "LoRA fine-tuning of a local model with gradient surgery"

# The registry's names (the registry imports no transformers: `--help` stays fast).
METHODS = tuple(_REGISTRY)


def _flag(h: Hyperparameter) -> str:
    return "--" + h.name.replace("_", "-")


def _parse_hyperparameter(h: Hyperparameter):
    """An argparse type that converts, then applies the registry's one check."""

    def parse(text: str):
        # On the command line an int option that is unset by default reads 0 as unset
        # (SPF's --spf-refresh-every 0: the basis is computed once).
        if h.default is None and h.type is int and text.strip() == "0":
            return None
        try:
            value = h.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {h.type.__name__}, got {text!r}") from None
        try:
            return h.validate(value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = h.type.__name__  # argparse names the type in its messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `safegrad train` options (defaults: the SafeGrad authors' settings)."""
    _add_io_arguments(parser.add_argument_group("model and output"))
    _add_data_arguments(parser.add_argument_group("data (JSON array or JSON Lines)"))
    _add_method_arguments(parser.add_argument_group("method"))
    _add_lora_arguments(parser.add_argument_group("LoRA"))
    _add_optimisation_arguments(parser.add_argument_group("optimisation (Trainer)"))


def _add_io_arguments(io: Options) -> None:
    add_model_arguments(io)
    io.add_argument(
        "--output-dir", required=True, help="adapter, configs, metrics and checkpoints go here"
    )
    io.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CHECKPOINT",
        help="continue from the last checkpoint in --output-dir (or from CHECKPOINT)",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output-dir that is not a safegrad run (files with our names, "
        "e.g. README.md, are replaced), or start afresh in one that holds checkpoints "
        "(deletes them)",
    )
    io.add_argument(
        "--dry-run",
        action="store_true",
        help="check the data, paths and output folder, print the plan and stop (loads nothing)",
    )
    io.add_argument(
        "--model-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the frozen base weights (auto: bfloat16 when training in bf16, else float32)",
    )


def _add_data_arguments(data: Options) -> None:
    data.add_argument(
        "--task-data",
        help="user task, Alpaca instruction/input/output (or prompt/response, question/answer)",
    )
    data.add_argument(
        "--harmful-data",
        help="harmful prompt/response pairs (BeaverTails: is_safe=false rows are used)",
    )
    data.add_argument(
        "--alignment-data",
        help="harmful prompts with refusal answers (BeaverTails: is_safe=true rows)",
    )
    add_values(
        data,
        (
            ("--harmful-ratio", ratio, 0.1, "fraction p of harmful samples"),
            ("--samples", positive_int, 1000, "fine-tuning samples n"),
            (
                "--alignment-samples",
                positive_int,
                100,
                "alignment samples drawn from --alignment-data",
            ),
            ("--max-length", positive_int, 1024, "tokens per sample (prompt + response)"),
        ),
    )
    add_prompt_style(
        data, default="alpaca", help="prompt template (alpaca: as the literature's code)"
    )


def _add_method_arguments(method: Options) -> None:
    method.add_argument(
        "--method", choices=METHODS, default="safegrad", help="what happens to the task gradient"
    )
    # One option per registry hyperparameter: its name, type, default, choices and check.
    for h in HYPERPARAMETERS.values():
        unset = " (0 on the command line)" if h.default is None and h.type is int else ""
        method.add_argument(
            _flag(h), type=_parse_hyperparameter(h), default=h.default, choices=h.choices,
            help=h.help + unset,
        )  # fmt: skip
    method.add_argument(
        "--alignment-loss",
        choices=ALIGNMENT_LOSSES,
        help="KL to the adapter-free model, or cross-entropy on the refusals "
        "(default: kl; ce for spf, whose step-0 KL gradient is zero)",
    )
    method.add_argument(
        "--kl-positions",
        choices=("response", "all"),
        default="response",
        help="KL over response tokens (the paper's Eq. 6) or all positions (the authors' code)",
    )
    method.add_argument(
        "--alignment-batch-size",
        type=positive_int,
        help="alignment examples per micro-batch (default: --batch-size)",
    )
    method.add_argument(
        "--surgery-backend",
        choices=("triton", "cpp", "torch"),
        help="op backend for the surgery (default: auto, see `safegrad info`)",
    )
    method.add_argument(
        "--cache-reference",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute the reference log-probs of the alignment set once, before the first step, "
        "and keep them in host memory (4 x vocab bytes per response token, exact); auto: on when "
        "that fits 1 GiB; a bare --cache-reference means on",
    )
    method.add_argument(
        "--reference-top-k",
        type=positive_int,
        metavar="K",
        help="store only the top K reference log-probs per token plus the tail mass "
        "(8 K + 8 bytes a token; implies --cache-reference; 64: 53 MB for 100 x 1024 tokens)",
    )
    method.add_argument(
        "--fused-loss",
        action="store_true",
        help="compute the KL and cross-entropy from the LM head's input chunk by chunk, "
        "never materialising the [tokens, vocab] logits (same numbers, less memory)",
    )


def _add_lora_arguments(lora: Options) -> None:
    add_values(
        lora,
        (
            ("--lora-r", positive_int, 8, "LoRA rank"),
            ("--lora-alpha", float, 16.0, "LoRA scale numerator"),
            ("--lora-dropout", non_negative_float, 0.1, "LoRA dropout"),
            ("--lora-targets", str, "q_proj,k_proj,v_proj", "comma-separated module names"),
        ),
    )


def _add_optimisation_arguments(opt: Options) -> None:
    add_values(
        opt,
        (
            ("--learning-rate", non_negative_float, 1e-5, "AdamW"),
            ("--lr-scheduler", str, "constant_with_warmup", "a transformers scheduler name"),
            ("--warmup-ratio", ratio, 0.1, "of all steps"),
            ("--weight-decay", non_negative_float, 0.0, "AdamW"),
            ("--epochs", float, 10.0, "passes over the n samples"),
            ("--max-steps", int, -1, "stop after this many optimizer steps (smoke runs)"),
            ("--batch-size", positive_int, 10, "samples per device per micro-batch"),
            ("--gradient-accumulation-steps", positive_int, 1, "micro-batches per step"),
            ("--save-steps", int, 0, "checkpoint every N steps (0: every epoch)"),
            ("--save-total-limit", int, 2, "checkpoints kept (oldest deleted)"),
            ("--logging-steps", positive_int, 10, "log loss and surgery stats every N steps"),
            ("--seed", int, 42, "data mixture, LoRA init and Trainer seed"),
        ),
    )
    opt.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on where CUDA supports it",
    )
    opt.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (less memory)"
    )


def run(args: argparse.Namespace) -> int:
    training_run.run(args)
    return 0
