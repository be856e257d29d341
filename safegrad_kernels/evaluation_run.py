"""One `safegrad eval` run: harmful score (HS) and fine-tune accuracy (FA) of a model + adapter.

HS is the percentage of held-out harmful prompts whose greedy answer is judged harmful, by
the keyword judge of ``metrics`` or by the classifier of ``moderation`` (``--moderation-model``);
the refusal rate is reported either way. FA is scored by ``metrics`` as label match or
GSM8K final-number match.

Every input is validated before the model loads. ``run`` takes the parsed ``safegrad eval``
options (see ``cli.eval``) and writes the metrics JSON (and optionally every generation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import metrics as scoring
from .data import DataError, Example, load_examples
from .generation import generate
from .hf_loading import (
    bf16_supported,
    check_adapter_dir,
    check_chat_template,
    check_model_dir,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    weights_dtype,
)
from .moderation import moderation_flags

__all__ = ["run"]

# More distinct gold answers than this is not a label set: ask for --labels or gsm8k.
_MAX_IMPLICIT_LABELS = 20


def _first(examples: list[Example], n: int, flag: str) -> list[Example]:
    if n < 1:
        raise DataError(f"{flag} must be at least 1, got {n}")
    return examples[:n]


def _load_sets(args: argparse.Namespace) -> tuple[list[Example], list[Example], list[str] | None]:
    """The harmful prompts, the task examples and the class labels, all checked."""
    if not args.harmful_eval_data and not args.task_eval_data:
        raise DataError("nothing to evaluate: pass --harmful-eval-data and/or --task-eval-data")
    harmful = (
        _first(
            load_examples(args.harmful_eval_data, role="prompts"),
            args.harmful_samples,
            "--harmful-samples",
        )
        if args.harmful_eval_data
        else []
    )
    task = (
        _first(load_examples(args.task_eval_data, role="eval"), args.task_samples, "--task-samples")
        if args.task_eval_data
        else []
    )
    labels = [x.strip().lower() for x in args.labels.split(",")] if args.labels else None
    if task and args.task_type == "classification" and labels is None:
        distinct = {e.response.strip().lower() for e in task}
        if len(distinct) > _MAX_IMPLICIT_LABELS:
            raise DataError(
                f"{args.task_eval_data}: {len(distinct)} distinct gold answers; a classification "
                "task needs --labels (or use --task-type gsm8k)"
            )
    return harmful, task, labels


def _prompt_style(args: argparse.Namespace) -> str:
    """``--prompt-style``, else the one the adapter was trained with, else alpaca."""
    if args.prompt_style:
        return args.prompt_style
    saved = Path(args.adapter) / "train_args.json" if args.adapter else None
    if saved is not None and saved.is_file():
        return json.loads(saved.read_text()).get("prompt_style") or "alpaca"
    return "alpaca"


def _check_paths(args: argparse.Namespace, style: str) -> None:
    """Every folder and output path, checked before anything loads (one line each)."""
    trust = args.trust_remote_code
    check_model_dir("--model", args.model, trust_remote_code=trust)
    if args.adapter:
        check_adapter_dir("--adapter", args.adapter)
    if args.moderation_model:
        check_model_dir("--moderation-model", args.moderation_model, trust_remote_code=trust)
    if style == "chat":
        check_chat_template("--prompt-style chat", args.model)
    for flag, path in (("--output", args.output), ("--save-generations", args.save_generations)):
        if path and Path(path).is_dir():
            raise DataError(f"{flag} {path}: is a folder; expected a file path")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = weights_dtype("auto", bf16=device.type == "cuda" and bf16_supported())
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    model.to(device).eval()
    return model, tokenizer, device


def _harmful_flags(
    args: argparse.Namespace, harmful: list[Example], answers: list[str], device: Any
) -> tuple[list[bool], str]:
    """Per answer, whether it is harmful, and which judge said so."""
    if not args.moderation_model:
        return [scoring.keyword_harmful(a) for a in answers], scoring.KEYWORD_DETECTOR

    prompts = [e.instruction + (f"\n{e.input}" if e.input else "") for e in harmful]
    labels = args.moderation_unsafe_labels
    flags = moderation_flags(
        args.moderation_model,
        prompts,
        answers,
        device=device,
        batch_size=args.batch_size,
        template=args.moderation_template,
        unsafe_labels=[n.strip() for n in labels.split(",") if n.strip()] if labels else None,
        threshold=args.moderation_threshold,
        trust_remote_code=args.trust_remote_code,
    )
    return flags, f"moderation classifier {args.moderation_model}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `safegrad eval`; returns (and writes) the metrics dict."""
    harmful, task, labels = _load_sets(args)
    style = _prompt_style(args)
    _check_paths(args, style)

    started = time.perf_counter()
    model, tokenizer, device = _load_model(args)
    gen = {
        "style": style,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "device": device,
    }
    metrics: dict[str, Any] = {
        "model": str(args.model),
        "adapter": str(args.adapter) if args.adapter else None,
        "prompt_style": style,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
    }
    records: list[dict[str, Any]] = []
    if harmful:
        answers = generate(model, tokenizer, harmful, **gen)
        flags, detector = _harmful_flags(args, harmful, answers, device)
        metrics["harmful"] = {
            "data": str(args.harmful_eval_data),
            "n": len(harmful),
            "harmful_score": scoring.percent(flags),
            "refusal_rate": scoring.percent([scoring.is_refusal(a) for a in answers]),
            "detector": detector,
        }
        records += [
            {
                "set": "harmful",
                "source": e.source,
                "prompt": e.instruction,
                "answer": a,
                "flagged": f,
            }
            for e, a, f in zip(harmful, answers, flags)
        ]
    if task:
        answers = generate(model, tokenizer, task, **gen)
        golds = [e.response for e in task]
        if args.task_type == "gsm8k":
            accuracy, correct = scoring.gsm8k_accuracy(answers, golds)
        else:
            accuracy, correct = scoring.classification_accuracy(answers, golds, labels)
        metrics["task"] = {
            "data": str(args.task_eval_data),
            "task_type": args.task_type,
            "n": len(task),
            "accuracy": accuracy,
        }
        records += [
            {
                "set": "task",
                "source": e.source,
                "prompt": e.instruction,
                "gold": e.response,
                "answer": a,
                "correct": c,
            }
            for e, a, c in zip(task, answers, correct)
        ]
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)

    output = Path(args.output or Path(args.adapter or ".") / "eval_metrics.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["output"] = str(output)
    if args.save_generations:
        with open(args.save_generations, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics
