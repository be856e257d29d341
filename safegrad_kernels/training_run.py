"""One `safegrad train` run: data, resume policy, Trainer arguments, LoRA model, training.

Order of work: every argument and every data record is validated, the mixture is drawn
and a resume checkpoint is found *before* the tokenizer or model loads, so a typo costs
seconds, not a model load. Because it is a ``transformers.Trainer``, ``torchrun`` /
``accelerate launch`` give multi-GPU data parallelism without code changes.

Output directory: the adapter (``adapter_model.safetensors``, ``adapter_config.json``),
``train_args.json`` (every option plus the drawn mixture's fingerprint), ``train_metrics.json``
and the Trainer's ``checkpoint-*`` folders (optimizer, scheduler and RNG states), from which
``--resume`` continues exactly.

``run`` takes the parsed ``safegrad train`` options (see ``cli.train``); transformers and
peft are imported only once the inputs have been checked.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from . import data
from .data import DataError, Example
from .hf_loading import bf16_supported, load_causal_lm, load_tokenizer, weights_dtype

__all__ = ["RESUME_INVARIANTS", "find_checkpoint", "run"]

# Options that must equal the saved run's for ``--resume`` to continue the same experiment.
# Schedule length (--epochs, --max-steps) and bookkeeping may change: that extends a run.
RESUME_INVARIANTS = (
    "model",
    "mixture_sha256",
    "alignment_sha256",
    "method",
    "rho",
    "lam",
    "spf_rank",
    "spf_refresh_every",
    "spf_mode",
    "alignment_loss",
    "kl_positions",
    "surgery_granularity",
    "alignment_every",  # issue 13: the refresh schedule and the kept g_a
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "learning_rate",
    "batch_size",
    "alignment_batch_size",
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
    if args.method != "sft":
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


def find_checkpoint(output_dir: str, resume: str | None, *, overwrite: bool) -> str | None:
    """The checkpoint to continue from (``resume``: None, ``"last"`` or a path), or None.

    Without ``resume``, an ``output_dir`` that already holds checkpoints is refused unless
    ``overwrite``: starting there would mix two runs' checkpoints.
    """
    if resume is None:
        stale = sorted(Path(output_dir).glob("checkpoint-*"))
        if stale and not overwrite:
            raise DataError(
                f"{output_dir} holds checkpoints of an earlier run ({stale[-1].name}); "
                "pass --resume to continue it, --overwrite to start afresh, or use a new "
                "--output-dir"
            )
        return None
    if resume != "last":
        if not Path(resume).is_dir():
            raise DataError(f"--resume {resume}: no such checkpoint directory")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise DataError(f"--resume: no checkpoint-* folder in {output_dir}")
    return last


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
        "rho": args.rho,
        "lam": args.lam,
        "spf_rank": args.spf_rank,
        "spf_refresh_every": args.spf_refresh_every or None,
        "spf_mode": args.spf_mode,
        "alignment_loss": args.alignment_loss,
        "kl_positions": args.kl_positions,
        "alignment_batch_size": args.alignment_batch_size,
        "surgery_backend": args.surgery_backend,
        "surgery_granularity": args.surgery_granularity,
        "cache_reference": args.cache_reference,
        "alignment_every": args.alignment_every,  # issue 13
    }
    return {k: v for k, v in kwargs.items() if v is not None}


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
    if args.method == "sft" and args.alignment_data:
        _say("note: --method sft ignores --alignment-data")
    mixture, alignment, counts = _load_data(args)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        raise DataError("--lora-targets is empty")
    checkpoint = find_checkpoint(args.output_dir, args.resume, overwrite=args.overwrite)
    output_dir = Path(args.output_dir)
    config = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    config.update(
        lora_targets=targets,
        counts=counts,
        mixture_sha256=_fingerprint(mixture),
        alignment_sha256=_fingerprint(alignment),
    )
    if checkpoint is not None:
        _check_resume_config(output_dir / "train_args.json", config)
    _say(
        f"data: {counts['task']} task + {counts['harmful']} harmful samples "
        f"(p={args.harmful_ratio}), {counts['alignment']} alignment samples; method {args.method}"
        + (f"; resuming from {checkpoint}" if checkpoint else "")
    )

    if args.dry_run:
        return {"dry_run": True, "counts": counts, "resume_from": checkpoint, "config": config}
    if args.overwrite and checkpoint is None and _is_main_process():
        # A later --resume must not pick up a checkpoint of the run being replaced.
        for stale in output_dir.glob("checkpoint-*"):
            shutil.rmtree(stale)

    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .integrations.trainer import SafeGradTrainer

    bf16 = bf16_supported() if args.bf16 == "auto" else args.bf16 == "on"
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
    model = get_peft_model(model, lora)
    trainer = SafeGradTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=data.SupervisedCollator(tokenizer.pad_token_id),
        alignment_dataset=align_set if args.method != "sft" else None,
        **_method_kwargs(args),
    )
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
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
        _say(f"saved adapter, train_args.json and train_metrics.json to {output_dir}")
    return metrics
