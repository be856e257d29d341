"""One rank of the DeepSpeed checks; spawned twice by tests/integrations/test_deepspeed.py.

Usage: ``python tests/_deepspeed_worker.py OUT_DIR RUN [RUN ...]`` with the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
``DS_ACCELERATOR=cpu`` set by the caller. A RUN is ``ENGINE:METHOD`` with ENGINE one of
``ddp`` (plain Trainer data parallelism, the reference) or ``zero0`` .. ``zero3``.

All runs share one process and one process group (start-up dominates, ~10 s a process),
each on the same tiny Llama + LoRA and the same data: 2 optimizer steps of gradient
accumulation 2, clipping at 0.05 (so it bites), AdamW, the CE alignment loss (on these
data the second step conflicts, so the projection runs). Rank 0 writes
``OUT_DIR/<run>.pt`` with the trainable weights and the logged surgery stats, or
``OUT_DIR/<run>.err`` with the phase ("construction" or "training") and the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers_tiny_model import tiny_peft_model, tiny_training_args, toy_trainer_data

STEPS, ACCUM, BATCH, CLIP = 2, 2, 2, 0.05
PHASE = ""  # where the current run failed, for the .err file


def ds_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "zero_allow_untested_optimizer": True,
    }


def reset_accelerate() -> None:
    """Forget the previous run's accelerate state (one state per process otherwise)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    del PartialState  # the process group stays: every run shares it


def run(out_dir: Path, spec: str) -> None:
    from transformers import TrainingArguments

    from safegrad_kernels.integrations.trainer import SafeGradTrainer

    engine, method = spec.split(":")
    reset_accelerate()
    extra = {} if engine == "ddp" else {"deepspeed": ds_config(int(engine.removeprefix("zero")))}
    args = TrainingArguments(
        **tiny_training_args(
            out_dir / spec.replace(":", "_"),
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUM,
            max_steps=STEPS,
            optim="adamw_torch",
            weight_decay=0.0,
            max_grad_norm=CLIP,
            ddp_backend="gloo",
            **extra,
        )
    )
    model = tiny_peft_model(seed=3)
    global PHASE
    PHASE = "construction"
    trainer = SafeGradTrainer(
        model=model,
        args=args,
        **toy_trainer_data(16, 16),
        method=method,
        alignment_loss="ce",
        lam=0.5,
        rho=1.0,
    )
    PHASE = "training"
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        weights = {
            n: p.detach().clone()
            for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
            if p.requires_grad
        }
        logs = [h for h in trainer.state.log_history if "loss" in h]
        torch.save({"weights": weights, "logs": logs}, out_dir / f"{spec}.pt")


def main() -> None:
    out_dir, specs = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for spec in specs:
        try:
            run(out_dir, spec)
        except Exception:
            if rank == 0:
                (out_dir / f"{spec}.err").write_text(f"{PHASE}\n{traceback.format_exc()}")
        print(f"rank {rank}: {spec} done", flush=True)


if __name__ == "__main__":
    main()
    # End as `safegrad` does after a distributed run: a gloo thread can abort the
    # interpreter's teardown (safegrad_kernels.cli.shutdown).
    from safegrad_kernels.cli import shutdown

    shutdown.end_process_group()
    shutdown.exit_without_finalizing(0)
