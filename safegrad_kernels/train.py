"""`safegrad train`: LoRA fine-tuning of a local causal LM on a harmful mixture, with surgery.

The reference training script: the user's data (``--samples`` examples, a fraction
``--harmful-ratio`` of them harmful) is fine-tuned with ``SafeGradTrainer``, whose
``--method`` decides what happens to the task gradient (``sft``: nothing; ``safegrad``:
one-sided projection against the KL alignment gradient; ``spf``: low-rank safety-subspace
projection; ``mixed``: task + lambda * alignment loss). Defaults are the SafeGrad authors'
settings (BACKGROUND.md): LoRA r=8, alpha=16 on q/k/v, dropout 0.1; AdamW at 1e-5, constant
with 10% warmup; 10 epochs; batch 10; max length 1024; bf16 where supported; n=1000, p=0.1,
100 alignment samples, rho=1.

Order of work: every argument and every data record is validated, the mixture is drawn
and a resume checkpoint is found *before* the tokenizer or model loads, so a typo costs
seconds, not a model load. Because it is a ``transformers.Trainer``, ``torchrun`` /
``accelerate launch`` give multi-GPU data parallelism without code changes.

Output directory: the adapter (``adapter_model.safetensors``, ``adapter_config.json``),
``train_args.json`` (every option plus the drawn mixture's fingerprint), ``train_metrics.json``
and the Trainer's ``checkpoint-*`` folders (optimizer, scheduler and RNG states), from which
``--resume`` continues exactly.
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

from .data import (
    PROMPT_STYLES,
    DataError,
    Example,
    SupervisedCollator,
    SupervisedDataset,
    build_mixture,
    check_ratio,
    load_examples,
    sample_examples,
)

__all__ = ["METHODS", "add_arguments", "load_causal_lm", "load_tokenizer", "positive_int", "run"]

# The same names as integrations.trainer.METHODS, which cannot be imported here without
# importing transformers (seconds) for `safegrad --help`; a test checks they agree.
METHODS = ("sft", "safegrad", "spf", "mixed")

# Options that must equal the saved run's for ``--resume`` to continue the same experiment.
# Schedule length (--epochs, --max-steps) and bookkeeping may change: that extends a run.
_RESUME_INVARIANTS = (
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


def _ratio(text: str) -> float:
    try:
        return check_ratio(float(text))
    except (ValueError, DataError) as err:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from err


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `safegrad train` options (defaults: the SafeGrad authors' settings)."""
    io = parser.add_argument_group("model and output")
    io.add_argument(
        "--model", required=True, help="local Hugging Face causal LM directory (never downloaded)"
    )
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
        help="start afresh in an --output-dir that holds checkpoints (deletes them)",
    )
    io.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data, draw the mixture, print the plan and stop (no model load)",
    )
    io.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from --model's directory"
    )
    io.add_argument(
        "--model-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the frozen base weights (auto: bfloat16 when training in bf16, else float32)",
    )

    data = parser.add_argument_group("data (JSON array or JSON Lines)")
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
    data.add_argument(
        "--harmful-ratio",
        type=_ratio,
        default=0.1,
        help="fraction p of harmful samples",
    )
    data.add_argument("--samples", type=positive_int, default=1000, help="fine-tuning samples n")
    data.add_argument(
        "--alignment-samples",
        type=positive_int,
        default=100,
        help="alignment samples drawn from --alignment-data",
    )
    data.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="alpaca",
        help="prompt template (alpaca: as the literature's code)",
    )
    data.add_argument(
        "--max-length",
        type=positive_int,
        default=1024,
        help="tokens per sample (prompt + response)",
    )

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method", choices=METHODS, default="safegrad", help="what happens to the task gradient"
    )
    method.add_argument(
        "--rho", type=_non_negative_float, default=1.0, help="weight of g_a added back (safegrad)"
    )
    method.add_argument(
        "--lam", type=_non_negative_float, default=1.0, help="alignment loss weight (mixed)"
    )
    method.add_argument(
        "--spf-rank", type=positive_int, default=8, help="safety subspace rank per matrix (spf)"
    )
    method.add_argument(
        "--spf-refresh-every",
        type=_non_negative_int,
        default=0,
        help="recompute the safety subspace every k optimizer steps (spf; 0: once, at step 0)",
    )
    method.add_argument(
        "--spf-mode",
        choices=("conflicting", "always"),
        default="conflicting",
        help="remove the subspace component only when it conflicts, or always (spf)",
    )
    method.add_argument(
        "--alignment-loss",
        choices=("kl", "ce"),
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
        "--surgery-granularity",
        choices=("global", "per_tensor"),
        default="global",
        help="one projection over all LoRA tensors (the paper) or one per tensor",
    )
    method.add_argument(
        "--surgery-backend",
        choices=("triton", "cpp", "torch"),
        help="op backend for the surgery (default: auto, see `safegrad info`)",
    )
    method.add_argument(
        "--cache-reference",
        action="store_true",
        help="keep the reference model's logits for the alignment set in host memory "
        "(skips the reference forward after the first pass; costs samples x length x vocab x 2 bytes)",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator")
    lora.add_argument("--lora-dropout", type=_non_negative_float, default=0.1, help="LoRA dropout")
    lora.add_argument(
        "--lora-targets", default="q_proj,k_proj,v_proj", help="comma-separated module names"
    )

    opt = parser.add_argument_group("optimisation (Trainer)")
    opt.add_argument("--learning-rate", type=_non_negative_float, default=1e-5, help="AdamW")
    opt.add_argument(
        "--lr-scheduler", default="constant_with_warmup", help="a transformers scheduler name"
    )
    opt.add_argument("--warmup-ratio", type=_ratio, default=0.1, help="of all steps")
    opt.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW")
    opt.add_argument("--epochs", type=float, default=10.0, help="passes over the n samples")
    opt.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="stop after this many optimizer steps (smoke runs)",
    )
    opt.add_argument(
        "--batch-size", type=positive_int, default=10, help="samples per device per micro-batch"
    )
    opt.add_argument(
        "--gradient-accumulation-steps",
        type=positive_int,
        default=1,
        help="micro-batches per step",
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
    opt.add_argument(
        "--save-steps", type=int, default=0, help="checkpoint every N steps (0: every epoch)"
    )
    opt.add_argument(
        "--save-total-limit", type=int, default=2, help="checkpoints kept (oldest deleted)"
    )
    opt.add_argument(
        "--logging-steps",
        type=positive_int,
        default=10,
        help="log loss and surgery stats every N steps",
    )
    opt.add_argument(
        "--seed", type=int, default=42, help="data mixture, LoRA init and Trainer seed"
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
    check_ratio(args.harmful_ratio)
    n_harmful = round(args.harmful_ratio * args.samples)
    task = (
        load_examples(args.task_data, role="task")
        if args.task_data and n_harmful < args.samples
        else None
    )
    harmful = (
        load_examples(args.harmful_data, role="harmful")
        if args.harmful_data and n_harmful
        else None
    )
    mixture, counts = build_mixture(
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
        pool = load_examples(args.alignment_data, role="alignment")
        alignment = sample_examples(
            pool,
            args.alignment_samples,
            random.Random(args.seed + 1),
            what="alignment",
            source=args.alignment_data,
        )
    counts["alignment"] = len(alignment)
    return mixture, alignment, counts


def _find_checkpoint(args: argparse.Namespace) -> str | None:
    if args.resume is None:
        stale = sorted(Path(args.output_dir).glob("checkpoint-*"))
        if stale and not args.overwrite:
            raise DataError(
                f"{args.output_dir} holds checkpoints of an earlier run ({stale[-1].name}); "
                "pass --resume to continue it, --overwrite to start afresh, or use a new "
                "--output-dir"
            )
        return None
    if args.resume != "last":
        if not Path(args.resume).is_dir():
            raise DataError(f"--resume {args.resume}: no such checkpoint directory")
        return args.resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last is None:
        raise DataError(f"--resume: no checkpoint-* folder in {args.output_dir}")
    return last


def _check_resume_config(saved_path: Path, config: dict[str, Any]) -> None:
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    changed = [
        f"{key}: {saved.get(key)!r} -> {config.get(key)!r}"
        for key in _RESUME_INVARIANTS
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


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model directory, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padding is masked out of every loss and attention, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: the tokenizer has neither a pad nor an EOS token")
    return tokenizer


def load_causal_lm(path: str, *, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory only (``local_files_only``: never a download)."""
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, **{key: dtype}
    )


def _dtype(name: str, bf16: bool) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


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
    checkpoint = _find_checkpoint(args)
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
        for stale in Path(args.output_dir).glob("checkpoint-*"):
            shutil.rmtree(stale)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .integrations.trainer import SafeGradTrainer

    if args.bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = args.bf16 == "on"
    config["bf16_resolved"] = bf16
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    train_set = SupervisedDataset(
        mixture, tokenizer, max_length=args.max_length, style=args.prompt_style
    )
    align_set = SupervisedDataset(
        alignment, tokenizer, max_length=args.max_length, style=args.prompt_style
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
        args.model, dtype=_dtype(args.model_dtype, bf16), trust_remote_code=args.trust_remote_code
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

    method_kwargs = {
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
    }
    # Unset options fall through to SafeGradTrainer's own defaults.
    method_kwargs = {k: v for k, v in method_kwargs.items() if v is not None}
    trainer = SafeGradTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=SupervisedCollator(tokenizer.pad_token_id),
        alignment_dataset=align_set if args.method != "sft" else None,
        **method_kwargs,
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
