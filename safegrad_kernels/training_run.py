"""One `safegrad train` run: data, resume policy, Trainer arguments, LoRA model, training.

Order of work: every argument and every data record is validated, the mixture is drawn,
the model folder, the output folder and a resume checkpoint are checked and the plan is
printed *before* the tokenizer or model loads, so a typo costs seconds, not a model load.
Because it is a ``transformers.Trainer``, ``torchrun`` / ``accelerate launch`` give
multi-GPU data parallelism without code changes.

Output directory: ``.safegrad_run.json`` (the marker saying the folder is one of our runs,
written first), the adapter (``adapter_model.safetensors``, ``adapter_config.json``),
``train_args.json`` (every option plus the drawn mixture's fingerprint), ``train_metrics.json``,
``training_curves.png`` and the Trainer's ``checkpoint-*`` folders (optimizer, scheduler and
RNG states), from which ``--resume`` continues exactly. A non-empty folder without the
marker is the user's and is refused unless ``--overwrite``; ``--resume`` on a run that has
already reached its planned step count changes nothing.

``run`` takes the parsed ``safegrad train`` options (see ``cli.train``); transformers and
peft are imported only once the inputs have been checked.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import data
from .data import DataError, Example
from .hf_loading import (
    add_lora,
    bf16_supported,
    check_chat_template,
    check_model_dir,
    load_causal_lm,
    load_tokenizer,
    weights_dtype,
)
from .surgery.methods import HYPERPARAMETERS, get_method

__all__ = [
    "RESUME_INVARIANTS",
    "RUN_MARKER",
    "check_output_dir",
    "find_checkpoint",
    "finished_step",
    "planned_steps",
    "run",
]

# Written first into every --output-dir we train into: a folder holding it is ours to write.
RUN_MARKER = ".safegrad_run.json"

# Options that must equal the saved run's for ``--resume`` to continue the same experiment.
# Schedule length (--epochs, --max-steps) and bookkeeping may change: that extends a run.
RESUME_INVARIANTS = (
    "model",
    "mixture_sha256",
    "alignment_sha256",
    "method",
    *HYPERPARAMETERS,  # every method option of the registry
    "alignment_loss",
    "kl_positions",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "learning_rate",
    "batch_size",
    "alignment_batch_size",
    "reference_top_k",
    "gradient_accumulation_steps",
    "max_length",
    "prompt_style",
    "seed",
)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


def _fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        for part in (e.instruction, e.input, e.response):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def _load_data(args: argparse.Namespace) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Validate every input and draw the mixture; nothing heavy is imported yet."""
    data.check_ratio(args.harmful_ratio)
    n_harmful = round(args.harmful_ratio * args.samples)
    task = (
        data.load_examples(args.task_data, role="task")
        if args.task_data and n_harmful < args.samples
        else None
    )
    harmful = (
        data.load_examples(args.harmful_data, role="harmful")
        if args.harmful_data and n_harmful
        else None
    )
    mixture, counts = data.build_mixture(
        task,
        harmful,
        samples=args.samples,
        ratio=args.harmful_ratio,
        seed=args.seed,
        task_source=args.task_data or "--task-data",
        harmful_source=args.harmful_data or "--harmful-data",
    )
    alignment: list[Example] = []
    if get_method(args.method).needs_alignment:
        if not args.alignment_data:
            raise DataError(f"--alignment-data is required for --method {args.method}")
        pool = data.load_examples(args.alignment_data, role="alignment")
        alignment = data.sample_examples(
            pool,
            args.alignment_samples,
            random.Random(args.seed + 1),
            what="alignment",
            source=args.alignment_data,
        )
    counts["alignment"] = len(alignment)
    return mixture, alignment, counts


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder one of our runs wrote (its marker, or, for runs made
    before the marker existed, a ``train_args.json`` carrying the mixture fingerprint)."""
    folder = Path(path)
    if (folder / RUN_MARKER).is_file():
        return True
    saved = folder / "train_args.json"
    try:
        return saved.is_file() and "mixture_sha256" in json.loads(saved.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output_dir(path: str, *, overwrite: bool) -> str:
    """What ``--output-dir`` is: ``"new"``, ``"empty"``, ``"run"`` (ours) or ``"foreign"``.

    A file, or a non-empty folder that is not one of our runs (without ``overwrite``), is
    refused: writing there would replace the user's files (PEFT writes its model card to
    ``README.md``). Nothing is created here.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--output-dir {path}: is a file; expected a folder (new or empty)")
    if not folder.exists():
        return "new"
    if not any(folder.iterdir()):
        return "empty"
    if is_run_dir(folder):
        return "run"
    if overwrite:
        return "foreign"
    raise DataError(
        f"--output-dir {path}: not empty and not a safegrad run (no {RUN_MARKER}); its files "
        "(e.g. README.md) would be overwritten. Use a new or empty folder, or pass --overwrite"
    )


def _mark_output_dir(path: str) -> None:
    """Create ``path`` and its marker (kept if present: it records the run's first start)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--output-dir {path}: cannot create it ({err.strerror})") from None
    marker = folder / RUN_MARKER
    if not marker.exists():
        from . import __version__

        created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        info = {"written_by": "safegrad train", "safegrad_kernels": __version__, "created": created}
        marker.write_text(json.dumps(info, indent=2) + "\n")


def find_checkpoint(output_dir: str, resume: str | None, *, overwrite: bool) -> str | None:
    """The checkpoint to continue from (``resume``: None, ``"last"`` or a path), or None.

    Without ``resume``, an ``output_dir`` that already holds checkpoints is refused unless
    ``overwrite``: starting there would mix two runs' checkpoints.
    """
    if resume is None:
        stale = sorted(Path(output_dir).glob("checkpoint-*")) if Path(output_dir).is_dir() else []
        if stale and not overwrite:
            raise DataError(
                f"{output_dir} holds checkpoints of an earlier run ({stale[-1].name}); "
                "pass --resume to continue it, --overwrite to start afresh, or use a new "
                "--output-dir"
            )
        return None
    if resume != "last":
        if not (Path(resume) / "trainer_state.json").is_file():
            raise DataError(
                f"--resume {resume}: not a checkpoint folder (no trainer_state.json)"
                if Path(resume).is_dir()
                else f"--resume {resume}: no such checkpoint folder"
            )
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise DataError(f"--resume: no checkpoint-* folder in {output_dir}")
    return last


def finished_step(output_dir: str) -> int | None:
    """The step at which a run in ``output_dir`` finished (its ``train_metrics.json``, written
    last), or None if none finished there."""
    try:
        return int(json.loads((Path(output_dir) / "train_metrics.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def planned_steps(args: argparse.Namespace, samples: int, world_size: int = 1) -> dict[str, Any]:
    """Optimizer steps the Trainer will run, computed as ``transformers.Trainer`` does.

    A process sees ``ceil(batches / world_size)`` of the ``ceil(samples / batch)``
    micro-batches of an epoch; ``gradient_accumulation_steps`` of them make a step (a
    shorter last one included); ``--max-steps`` > 0 overrides ``--epochs``.
    """
    batches = -(-samples // args.batch_size)
    per_process = -(-batches // world_size)
    per_epoch = max(-(-per_process // args.gradient_accumulation_steps), 1)
    if args.max_steps > 0:
        total = args.max_steps
        epochs = total / per_epoch
    else:
        total = math.ceil(args.epochs * per_epoch)
        epochs = args.epochs
    return {"total": total, "per_epoch": per_epoch, "epochs": epochs, "world_size": world_size}


def _check_resume_config(saved_path: Path, config: dict[str, Any]) -> None:
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    changed = [
        f"{key}: {saved.get(key)!r} -> {config.get(key)!r}"
        for key in RESUME_INVARIANTS
        if key in saved and saved.get(key) != config.get(key)
    ]
    if changed:
        raise DataError(
            f"--resume would change the experiment saved in {saved_path} ({'; '.join(changed)}); "
            "use a new --output-dir"
        )


def _check_schedule(args: argparse.Namespace) -> None:
    if args.max_steps == 0 or args.max_steps < -1:
        raise DataError(
            f"--max-steps must be a positive integer or -1 (use --epochs), got {args.max_steps}"
        )
    if args.max_steps < 0 and not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise DataError(f"--epochs must be a positive number, got {args.epochs}")


def _has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu is not None and xpu.is_available())
    )


def _training_arguments(args: argparse.Namespace, bf16: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    kwargs: dict[str, Any] = {
        "output_dir": args.output_dir,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": args.lr_scheduler,
        "weight_decay": args.weight_decay,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "optim": "adamw_torch",
        "bf16": bf16,
        "logging_steps": args.logging_steps,
        "save_strategy": "steps" if args.save_steps > 0 else "epoch",
        "save_total_limit": args.save_total_limit,
        "seed": args.seed,
        "report_to": "none",
        # Our datasets are plain torch datasets already holding exactly the model inputs.
        "remove_unused_columns": False,
        # LoRA leaves most of the model frozen; scanning for unused params costs a pass.
        "ddp_find_unused_parameters": False,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    if args.save_steps > 0:
        kwargs["save_steps"] = args.save_steps
    if not _has_accelerator():
        # Without this, transformers refuses bf16 (CPU autocast) and a CPU `torchrun` gets a
        # process group but no DistributedDataParallel: every rank trains on all the data.
        kwargs["use_cpu"] = True
    if args.gradient_checkpointing:
        # transformers 5 renamed the option (the old name still works but warns).
        prefix = "activation" if "activation_checkpointing" in params else "gradient"
        kwargs[f"{prefix}_checkpointing"] = True
        kwargs[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    # transformers 5 folded `warmup_ratio` into `warmup_steps` (a float < 1 is a ratio).
    if "warmup_ratio" in params:
        kwargs["warmup_ratio"] = args.warmup_ratio
    elif args.warmup_ratio < 1:
        kwargs["warmup_steps"] = args.warmup_ratio
    else:
        raise DataError("--warmup-ratio 1.0 is not supported by this transformers version")
    return TrainingArguments(**kwargs)


def _method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SafeGradTrainer's method options; unset ones fall through to its own defaults."""
    kwargs = {
        "method": args.method,
        **{name: getattr(args, name) for name in HYPERPARAMETERS},
        "alignment_loss": args.alignment_loss,
        "kl_positions": args.kl_positions,
        "alignment_batch_size": args.alignment_batch_size,
        "surgery_backend": args.surgery_backend,
        # -- reference store and fused losses (SafeGradTrainer's module docstring)
        "cache_reference": _CACHE_REFERENCE[args.cache_reference],
        "reference_top_k": args.reference_top_k,
        "fused_loss": args.fused_loss,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


# --cache-reference: auto (the trainer's default rule), on, off; a bool (the flag was one)
# keeps its literal meaning.
_CACHE_REFERENCE = {"auto": None, "on": True, "off": False, True: True, False: False}


def _plan(
    args: argparse.Namespace,
    counts: dict[str, int],
    steps: dict[str, Any],
    targets: list[str],
    *,
    checkpoint: str | None,
    resume_step: int | None,
    out_state: str,
    bf16: bool,
) -> list[str]:
    """The plan of the run, printed before anything loads (and by ``--dry-run``)."""
    # The method's own options (the rest do not act on it), then the alignment options for
    # every method that uses alignment data.
    spec = get_method(args.method)
    # As typed on the command line (an unset int option reads 0 there).
    method = {
        h.name: (0 if getattr(args, h.name) is None and h.type is int else getattr(args, h.name))
        for h in spec.hyperparameters
    }
    if spec.needs_alignment:
        loss = args.alignment_loss or spec.alignment_loss  # SafeGradTrainer's default
        method["alignment_loss"] = loss
        if loss == "kl":
            method["kl_positions"] = args.kl_positions
        method["alignment_batch_size"] = args.alignment_batch_size or args.batch_size
    per_step = args.batch_size * args.gradient_accumulation_steps * steps["world_size"]
    schedule = (
        f"{steps['total']} optimizer steps ({steps['epochs']:g} epochs x {steps['per_epoch']} "
        f"steps; {per_step} samples per step = batch {args.batch_size} x accumulation "
        f"{args.gradient_accumulation_steps} x {steps['world_size']} process(es))"
    )
    if checkpoint:
        schedule += f"; resuming at step {resume_step} from {checkpoint}"
    saving = f"every {args.save_steps} steps" if args.save_steps > 0 else "every epoch"
    out_note = {"new": "new", "empty": "empty", "run": "an earlier safegrad run",
                "foreign": "not a safegrad run: --overwrite"}[out_state]  # fmt: skip
    return [
        f"safegrad train: {args.method} on {args.model}",
        f"  data        {counts['task']} task + {counts['harmful']} harmful samples "
        f"(p={args.harmful_ratio}), {counts['alignment']} alignment samples; "
        f"--prompt-style {args.prompt_style}, --max-length {args.max_length}",
        f"  schedule    {schedule}",
        f"  optimizer   AdamW lr {args.learning_rate:g}, {args.lr_scheduler}, warmup "
        f"{args.warmup_ratio:g} of the steps, weight decay {args.weight_decay:g}; bf16 "
        + ("on" if bf16 else "off")
        + (" (auto)" if args.bf16 == "auto" else ""),
        f"  LoRA        r {args.lora_r}, alpha {args.lora_alpha:g}, dropout "
        f"{args.lora_dropout:g}, on {','.join(targets)}",
        f"  method      {args.method}"
        + (
            "".join(f" --{k.replace('_', '-')} {v}" for k, v in method.items()) or " (no alignment)"
        ),
        f"  output      {args.output_dir} ({out_note}); checkpoints {saving}, "
        f"keep {args.save_total_limit}; logs every {args.logging_steps} steps",
    ]


def _summarise_logs(history: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the run's logging windows of the surgery statistics and alignment loss."""
    sums: dict[str, list[float]] = {}
    for row in history:
        for key, value in row.items():
            if (key.startswith("surgery/") or key == "align_loss") and isinstance(value, float):
                sums.setdefault(key.removeprefix("surgery/"), []).append(value)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `safegrad train`; returns the metrics written to ``train_metrics.json``."""
    started = time.perf_counter()
    _check_schedule(args)
    mixture, alignment, counts = _load_data(args)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        raise DataError("--lora-targets is empty")
    check_model_dir("--model", args.model, trust_remote_code=args.trust_remote_code)
    if args.prompt_style == "chat":
        check_chat_template("--prompt-style chat", args.model)
    out_state = check_output_dir(args.output_dir, overwrite=args.overwrite)
    output_dir = Path(args.output_dir)
    config = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    config.update(
        lora_targets=targets,
        counts=counts,
        mixture_sha256=_fingerprint(mixture),
        alignment_sha256=_fingerprint(alignment),
    )
    steps = planned_steps(args, len(mixture), int(os.environ.get("WORLD_SIZE", "1")))
    if args.resume is not None:
        _check_resume_config(output_dir / "train_args.json", config)
        done = finished_step(args.output_dir)
        if done is not None and done >= steps["total"]:
            # Resuming a finished run must not train, rotate checkpoints or rewrite metrics.
            _say(
                f"{args.output_dir}: already finished at step {done} (this schedule plans "
                f"{steps['total']}); nothing to train, nothing changed. Raise --max-steps or "
                "--epochs to train further."
            )
            saved = json.loads((output_dir / "train_metrics.json").read_text())
            return {**saved, "already_finished": True}
    checkpoint = find_checkpoint(args.output_dir, args.resume, overwrite=args.overwrite)
    resume_step = _checkpoint_step(checkpoint) if checkpoint else None
    bf16 = bf16_supported() if args.bf16 == "auto" else args.bf16 == "on"
    for line in _plan(
        args, counts, steps, targets, checkpoint=checkpoint, resume_step=resume_step,
        out_state=out_state, bf16=bf16,
    ):  # fmt: skip
        _say(line)
    if not get_method(args.method).needs_alignment and args.alignment_data:
        _say("note: --method sft ignores --alignment-data")

    if args.dry_run:
        _say("dry run: nothing loaded, nothing written")
        return {
            "dry_run": True,
            "counts": counts,
            "resume_from": checkpoint,
            "steps": steps,
            "config": config,
        }
    if _is_main_process():
        _mark_output_dir(args.output_dir)
        if args.overwrite and checkpoint is None:
            # A later --resume must not pick up a checkpoint of the run being replaced.
            for stale in output_dir.glob("checkpoint-*"):
                shutil.rmtree(stale)

    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from .integrations.progress import TrainingConsole
    from .integrations.trainer import SafeGradTrainer

    config["bf16_resolved"] = bf16
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    train_set, align_set = (
        data.SupervisedDataset(
            examples, tokenizer, max_length=args.max_length, style=args.prompt_style
        )
        for examples in (mixture, alignment)
    )
    for name, dataset in (("fine-tuning", train_set), ("alignment", align_set)):
        if dataset.n_without_response:
            _say(
                f"warning: {dataset.n_without_response} {name} samples have no response token "
                f"left after truncation to --max-length {args.max_length}"
            )

    training_args = _training_arguments(args, bf16)
    set_seed(args.seed)  # the LoRA init below must not depend on what ran before
    model = load_causal_lm(
        args.model,
        dtype=weights_dtype(args.model_dtype, bf16=bf16),
        trust_remote_code=args.trust_remote_code,
    )
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = add_lora(model, lora)
    trainer = SafeGradTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=data.SupervisedCollator(tokenizer.pad_token_id),
        alignment_dataset=align_set if get_method(args.method).needs_alignment else None,
        **_method_kwargs(args),
    )
    # One readable line per logging step instead of the Trainer's dict of strings.
    console = TrainingConsole(bar=not training_args.disable_tqdm)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(console)
    if get_method(
        args.method
    ).needs_alignment:  # -- reference store: the trainer's decision and its reason
        state = "on" if trainer.reference_choice.on else "off"
        _say(f"reference store {state}: {trainer.reference_choice.reason}")
    if trainer.is_world_process_zero():
        (output_dir / "train_args.json").write_text(
            json.dumps(config, indent=2, default=str) + "\n"
        )

    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(args.output_dir)  # a PeftModel saves only the adapter
    trainer.save_state()
    metrics: dict[str, Any] = dict(result.metrics)
    metrics.update(
        global_step=trainer.state.global_step,
        method=args.method,
        counts=counts,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        resumed_from=checkpoint,
        wall_seconds=round(time.perf_counter() - started, 3),
    )
    surgery = _summarise_logs(trainer.state.log_history)
    if surgery:
        metrics["surgery_mean"] = surgery
    if trainer.is_world_process_zero():
        (output_dir / "train_metrics.json").write_text(
            json.dumps(metrics, indent=2, default=str) + "\n"
        )
        for line in console.summary(metrics["wall_seconds"], output_dir):
            _say(line)
    return metrics


def _checkpoint_step(checkpoint: str) -> int | None:
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
