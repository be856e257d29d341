"""One rank of the accelerate check; started by ``accelerate launch`` in tests/integrations/test_accelerate.py.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_worker.py OUT``
(on a CPU-only machine: MULTI_CPU over gloo). SafeGrad on the tiny Llama + LoRA, 4
optimizer steps of one micro-batch, logging every 2 steps. Each rank writes
``OUT/rank<r>.pt``: its trainable weights after training, its own alignment loss per
step (recorded before any reduction), the log history, and the DDP settings it ran with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers_tiny_model import tiny_peft_model, tiny_training_args, toy_trainer_data

STEPS, LOGGING_STEPS, BATCH = 4, 2, 2
PER_STEP_ALIGN: list[float] = []  # this rank's alignment loss of each step


def main(out: Path) -> None:
    from transformers import TrainingArguments

    from safegrad_kernels.integrations import SafeGradTrainer

    class RecordingTrainer(SafeGradTrainer):
        """Records this rank's alignment loss of each step (a host read: test only)."""

        def _add_align_loss(self, loss):
            PER_STEP_ALIGN.append(float(loss))
            super()._add_align_loss(loss)

    args = TrainingArguments(
        **tiny_training_args(
            out / "run",
            per_device_train_batch_size=BATCH,
            max_steps=STEPS,
            logging_steps=LOGGING_STEPS,
            max_grad_norm=1.0,
        )
    )
    trainer = RecordingTrainer(
        model=tiny_peft_model(),
        args=args,
        **toy_trainer_data(16, 8),
        method="safegrad",
        surgery_backend="torch",
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save(
        {
            "rank": trainer.args.process_index,
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "args_find_unused": trainer.args.ddp_find_unused_parameters,
            "ddp_find_unused": getattr(trainer.model_wrapped, "find_unused_parameters", None),
            "weights": {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            },
            "per_step_align": PER_STEP_ALIGN,
            "logs": [row for row in trainer.state.log_history if "loss" in row],
        },
        out / f"rank{trainer.args.process_index}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # End as `safegrad` does after a distributed run: a gloo thread can abort the
    # interpreter's teardown (safegrad_kernels.cli.shutdown).
    from safegrad_kernels.cli import shutdown

    shutdown.end_process_group()
    shutdown.exit_without_finalizing(0)
