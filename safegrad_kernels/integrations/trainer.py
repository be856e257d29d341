"""``SafeGradTrainer``: a ``transformers.Trainer`` that fine-tunes a PEFT model with a defense.

Methods (``method=``), entries of the registry ``safegrad_kernels.surgery.METHODS``:

- ``"sft"``: plain fine-tuning, the baseline (no alignment data needed).
- ``"safegrad"``: SafeGrad surgery (arXiv 2508.07172) against the KL alignment gradient.
- ``"spf"``: safety-subspace projection (arXiv 2601.10141) of the task gradient.
- ``"mixed"``: multi-objective baseline, loss = task + ``lam`` * alignment loss.

The trainer reads from the entry what a method needs (its hyperparameters, alignment
loss and weight, surgeon, and on which steps it wants the alignment pass); it compares
no method name. Which alignment micro-batches a step uses, and where a resumed run goes
on, is ``alignment_batches.AlignmentSchedule``.

One optimizer step with ``gradient_accumulation_steps = k``, as this trainer runs it::

    for each of the k micro-batches (Trainer.training_step):
        align: one alignment micro-batch; its loss, normalised by the response tokens of
               all k alignment micro-batches, is backpropagated inside surgeon.reference()
               (g_a accumulates in the surgeon's buffers), or straight into p.grad times
               lam for "mixed"
        task:  the Trainer's own forward/backward (g_u accumulates in p.grad, normalised
               by the step's token count as the Trainer does)
    after the last micro-batch's backward (accelerator.sync_gradients):
        surgery: stats = surgeon.step()    p.grad <- update(g_u, g_a), on the device
    then the Trainer: clip p.grad to max_grad_norm, optimizer.step(), zero_grad()

So the surgery sees the *fully accumulated* raw gradients and runs once per optimizer
step (the authors' trainer overwrote ``p.grad`` on every micro-batch, which silently
breaks accumulation). Clipping comes after the surgery and applies to the combined
update, as in the authors' trainer (the Trainer clipped the gradient their surgery had
written). Why this order: the update's direction is then exactly SafeGrad's, only its
length is capped; clipping g_u first would shrink g_u relative to g_a on large-gradient
steps, so the weight of ``rho * g_a`` in the update would vary with the task gradient's
norm. ``test_update_is_safegrad_then_clip`` checks the gradient the optimizer receives
against this formula and shows the other order differs.

The reference distribution comes from the same PEFT model with its adapters disabled,
under ``torch.no_grad`` and in eval mode: no second model copy (the authors hold a full
bf16 copy, about 2x SFT memory). Surgery statistics (conflict rate, cosine, coefficient,
alignment loss) accumulate on the device and are read on the host only on logging steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from ..losses import (
    ReferenceCache,
    kl_alignment_loss,
    model_inputs,
    reference_logits,
    response_ce,
)
from ..surgery import Surgeon
from ..surgery.base import check_backend, check_choice
from ..surgery.methods import ALIGNMENT_LOSSES, get_method
from ..surgery.methods import METHODS as _REGISTRY
from .alignment_batches import AlignmentSchedule, alignment_loader
from .deepspeed import zero_surgery_for

# Written into each checkpoint-* folder when the surgeon carries state between steps (SPF).
SURGEON_STATE_FILE = "safegrad_surgeon.pt"

__all__ = ["METHODS", "SafeGradTrainer"]

# The registry's names, for ``--method`` choices and checks that need no Trainer.
METHODS = tuple(_REGISTRY)
# Stats whose log name says more than the field name (SafeGradStats.conflict is 0/1).
_STAT_LOG_NAMES = {"conflict": "conflict_rate"}


class SafeGradTrainer(Trainer):
    """``transformers.Trainer`` with SafeGrad / SPF / mixed-objective alignment.

    Args (besides the ``Trainer``'s own; ``model`` must be a ``peft.PeftModel`` whenever
    a KL reference is needed):
        alignment_dataset: examples with ``input_ids``, ``attention_mask``, ``labels``
            (-100 on the prompt), collated by the trainer's ``data_collator``. Required
            unless ``method="sft"``. Cycled, reshuffled on each pass (seed ``args.seed``).
        method: a name in ``METHODS``: ``"sft"``, ``"safegrad"``, ``"spf"`` or ``"mixed"``.
        rho: SafeGrad's weight of the alignment gradient added back (>= 0; paper: 1).
        lam: the mixed baseline's alignment-loss weight (>= 0).
        spf_rank, spf_refresh_every, spf_mode: SPF's subspace rank, basis refresh period
            in optimizer steps (``None``: computed once), ``"conflicting"``/``"always"``.
            The alignment pass runs only on steps whose basis is (re)computed.
        alignment_loss: ``"kl"`` = KL(P_ref || P_theta) against the adapter-free model, or
            ``"ce"`` = cross-entropy on the alignment answers. Default: the method's
            (``Method.alignment_loss``): ``"kl"``, except ``"ce"`` for SPF, whose
            once-computed basis would otherwise come from the all-zero KL gradient of a
            fresh LoRA (model == reference at step 0).
        kl_positions: ``"response"`` or ``"all"`` (the authors' choice); see
            ``kl_alignment_loss``.
        alignment_batch_size: alignment examples per micro-batch; default
            ``args.per_device_train_batch_size``.
        surgery_backend: op backend for the surgeon (``None`` = auto).
        surgery_granularity: SafeGrad's ``"global"`` (the paper) or ``"per_tensor"``.
        alignment_every: SafeGrad's alignment refresh period k in optimizer steps: the
            alignment pass (and its batches) runs on steps 0, k, 2k, ... only, the
            surgeon keeps that g_a in between (N extra elements resident) and projects
            each step's g_u against it; the kept g_a goes into checkpoints
            (``SURGEON_STATE_FILE``). 1 (default): every step. k > 1 is refused with
            fp16 (a dynamic loss scale) and under DeepSpeed.
        cache_reference: keep reference logits of the alignment set on the host
            (``ReferenceCache``), skipping the reference forward on later visits.

    Surgery acts on every trainable parameter (the LoRA factors, plus any
    ``modules_to_save``), as the authors' trainer does. Logged keys at ``logging_steps``:
    ``align_loss`` and ``surgery/<stat>`` means over the window (SafeGrad:
    ``conflict_rate``, ``cosine``, ``coef``, ``dot``, ``ref_norm_sq``, ``grad_norm_sq``;
    SPF: ``applied_fraction``, ``conflict_fraction``, ``removed_energy``).

    Supported: gradient accumulation, bf16/fp16 autocast (both losses go through the same
    ``accelerator.backward``, so a loss scale multiplies g_u and g_a alike and the update
    is scale-free), gradient checkpointing, clipping (after the surgery, see the module
    docstring), DDP with ``gradient_as_bucket_view=False``, DeepSpeed ZeRO-1/2 in fp32 for
    ``safegrad`` (global) and ``mixed``; other DeepSpeed settings raise ``ValueError`` at
    construction (see ``integrations/deepspeed.py``).
    """

    def __init__(
        self,
        *args: Any,
        alignment_dataset: Any = None,
        method: str = "safegrad",
        rho: float = 1.0,
        lam: float = 1.0,
        spf_rank: int = 8,
        spf_refresh_every: int | None = None,
        spf_mode: str = "conflicting",
        alignment_loss: str | None = None,
        kl_positions: str = "response",
        alignment_batch_size: int | None = None,
        surgery_backend: str | None = None,
        surgery_granularity: str = "global",
        alignment_every: int = 1,
        cache_reference: bool = False,
        **kwargs: Any,
    ) -> None:
        # Cheap argument checks first: a bad configuration fails before any set-up.
        self.method_spec = get_method(method)
        self.method = method
        # The method's own hyperparameters; the others are checked too, then unused.
        self.method_settings = self.method_spec.validate(
            rho=rho,
            lam=lam,
            spf_rank=spf_rank,
            spf_refresh_every=spf_refresh_every,
            spf_mode=spf_mode,
            surgery_granularity=surgery_granularity,
            alignment_every=alignment_every,
        )
        if alignment_loss is not None:
            check_choice("alignment_loss", alignment_loss, ALIGNMENT_LOSSES)
        self.alignment_loss = alignment_loss or self.method_spec.alignment_loss
        self.kl_positions = check_choice("kl_positions", kl_positions, ("response", "all"))
        self._uses_alignment = self.method_spec.needs_alignment
        if self._uses_alignment and alignment_dataset is None:
            raise ValueError(
                f"method={method!r} needs an alignment_dataset (only "
                f"{', '.join(m for m, e in _REGISTRY.items() if not e.needs_alignment)} runs without)"
            )
        if self._uses_alignment and len(alignment_dataset) == 0:
            raise ValueError("alignment_dataset is empty")
        if alignment_batch_size is not None and alignment_batch_size < 1:
            raise ValueError(f"alignment_batch_size must be >= 1, got {alignment_batch_size}")
        self.surgery_backend = check_backend(surgery_backend)
        self.alignment_dataset = alignment_dataset

        super().__init__(*args, **kwargs)

        # -- alignment refresh (issue 13): the kept g_a carries its refresh step's loss scale
        if self.method_settings.get("alignment_every", 1) > 1 and self.args.fp16:
            raise ValueError(
                "alignment_every > 1 with fp16 is not supported: the kept alignment "
                "gradient would carry the loss scale of its refresh step while the task "
                "gradient carries the current one; use bf16 or fp32, or alignment_every=1"
            )
        # -- end alignment refresh
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameter (empty parameter list)")
        self._needs_reference = self._uses_alignment and self.alignment_loss == "kl"
        if self._needs_reference and not hasattr(self.model, "disable_adapter"):
            raise TypeError(
                "the KL alignment loss takes its reference from the same model with adapters "
                f"disabled, which needs a peft.PeftModel; got {type(self.model).__name__} "
                "(use alignment_loss='ce' or wrap the model with peft)"
            )
        self.alignment_batch_size = alignment_batch_size or self.args.per_device_train_batch_size
        self.reference_cache = (
            ReferenceCache(positions=kl_positions)
            if cache_reference and self._needs_reference
            else None
        )

        self._surgeon: Surgeon | None = None
        self._pending_surgeon_state: dict[str, Any] | None = None
        self.alignment_schedule = AlignmentSchedule(
            lambda epoch: self.get_alignment_dataloader(epoch),
            consumed_before=self._alignment_batches_consumed,
        )
        # Logging window, on the device: sums and counts since the last log.
        self._stat_names: tuple[str, ...] = ()
        self._stat_sum: Tensor | None = None
        self._stat_steps = 0
        self._align_sum: Tensor | None = None
        self._align_steps = 0
        # DeepSpeed: ZeRO-1/2 surgery on DeepSpeed's partitions, or a ValueError right here
        # for what cannot run exactly (integrations/deepspeed.py).
        self._zero = zero_surgery_for(
            self,
            method,
            self.method_settings.get("surgery_granularity", "global"),
            alignment_every=self.method_settings.get("alignment_every", 1),
        )

    # -- surgeon and alignment data --------------------------------------------------------

    def _trainable_params(self) -> list[nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [p for p in model.parameters() if p.requires_grad]

    @property
    def surgeon(self) -> Surgeon | None:
        """The surgeon (built on first use, after the Trainer has placed the model)."""
        if self._surgeon is None and self.method_spec.surgeon is not None:
            self._surgeon = self.method_spec.build_surgeon(
                self._trainable_params(),
                self.method_settings,
                seed=self.args.seed,
                backend=self.surgery_backend,
            )
            if self._pending_surgeon_state is not None:
                self._surgeon.load_state_dict(self._pending_surgeon_state)
                self._pending_surgeon_state = None
        return self._surgeon

    # -- checkpoints: the surgeon's state (SPF's basis and step counters) -------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        state = self._surgeon.state_dict() if self._surgeon is not None else {}
        if state and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, SURGEON_STATE_FILE)
            torch.save(state, path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SURGEON_STATE_FILE)
        if not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self._surgeon is not None:
            self._surgeon.load_state_dict(state)
        else:  # applied when the surgeon is built, after the model has been placed
            self._pending_surgeon_state = state

    def get_alignment_dataloader(self, epoch: int | None = None) -> DataLoader:
        """Loader over ``(indices, batch)`` for alignment pass ``epoch`` (default: the current).

        Shuffled per pass with ``args.seed``; columns the model does not take are removed
        as the Trainer does for its own datasets.
        """
        dataset = self.alignment_dataset
        collate = self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="alignment")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="alignment")
        return alignment_loader(
            dataset,
            collate,
            batch_size=self.alignment_batch_size,
            seed=self.args.seed,
            epoch=self.alignment_schedule.epoch if epoch is None else epoch,
            world_size=self.args.world_size,
            rank=self.args.process_index,
        )

    def _alignment_batches_consumed(self) -> int:
        """Alignment micro-batches drawn before ``state.global_step`` (for exact resume).

        The method's entry says on how many of those steps it ran the alignment pass (SPF:
        its refresh steps only; its basis and step counters come back from the checkpoint,
        ``SURGEON_STATE_FILE``); each such step drew one batch per micro-batch.
        """
        steps = self.method_spec.alignment_steps_before(
            self.state.global_step, self.method_settings
        )
        return steps * self.args.gradient_accumulation_steps

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        # Called once per optimizer step with all of its micro-batches: the one place that
        # knows how many micro-batches follow, so the alignment side is planned here.
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        if self._uses_alignment:
            due = self.method_spec.alignment_due(self.surgeon)
            self.alignment_schedule.plan(len(batch_samples) if due else 0, self.args.device)
        return batch_samples, num_items_in_batch

    # -- the step ----------------------------------------------------------------------------

    def _reference(self, model: nn.Module, batch: dict[str, Any], indices: list[int]) -> Tensor:
        peft_model = self.accelerator.unwrap_model(model)
        if self.reference_cache is not None:
            return self.reference_cache.get(peft_model, batch, indices)
        return reference_logits(peft_model, batch)

    def alignment_loss_on(
        self, model: nn.Module, batch: dict[str, Any], indices: list[int], count: Tensor
    ) -> Tensor:
        """The alignment loss of one micro-batch, normalised by ``count`` response tokens."""
        inputs = model_inputs(batch)
        labels = batch["labels"]
        with self.compute_loss_context_manager():
            if self.alignment_loss == "kl":
                ref = self._reference(model, batch, indices)
                logits = model(**inputs).logits
                return kl_alignment_loss(
                    logits, ref, labels, positions=self.kl_positions, num_items_in_batch=count
                )
            return response_ce(model(**inputs).logits, labels, num_items_in_batch=count)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        surgeon = self.surgeon
        if self._uses_alignment:
            schedule = self.alignment_schedule
            if not schedule.planned:
                raise RuntimeError(
                    "SafeGradTrainer plans alignment batches in Trainer.get_batch_samples, "
                    "which this transformers version did not call before training_step"
                )
            planned = schedule.pop()
            if planned is not None:
                indices, batch = planned
                model.train()
                batch = self._prepare_inputs(batch)
                if self._zero is not None:  # -- DeepSpeed ZeRO-1/2 (integrations/deepspeed.py)
                    weight = self.method_spec.loss_weight(self.method_settings)
                    self._zero.install(
                        self.model_wrapped, self._trainable_params(), surgeon, weight
                    )
                    unwrapped = self.accelerator.unwrap_model(model)
                    loss = self.alignment_loss_on(unwrapped, batch, indices, schedule.num_items)
                    self._zero.capture(loss)
                    self._add_align_loss(loss.detach())
                    return self._zero_task_step(model, inputs, num_items_in_batch)
                capture = surgeon.reference() if surgeon is not None else contextlib.nullcontext()
                with capture:
                    loss = self.alignment_loss_on(model, batch, indices, schedule.num_items)
                    weight = self.method_spec.loss_weight(self.method_settings)
                    self.accelerator.backward(loss * weight if weight != 1.0 else loss)
                self._add_align_loss(loss.detach())

        task_loss = super().training_step(model, inputs, num_items_in_batch)

        # sync_gradients is True exactly on the micro-batch after which the Trainer clips
        # and steps (it sets it from the same do_sync_step flag), so the surgery runs once
        # per optimizer step, on the fully accumulated g_u and g_a, before clipping.
        if self.accelerator.sync_gradients:
            if surgeon is not None:
                self._add_stats(surgeon.step())
            self.alignment_schedule.end_step()
        return task_loss

    def _zero_task_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any) -> Tensor:
        # DeepSpeed steps inside the task backward of the last micro-batch; the surgery
        # ran there, on DeepSpeed's partitions (ZeroSurgery wraps its optimizer step).
        task_loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            stats = self._zero.finish_step()  # type: ignore[union-attr]
            if stats is not None:
                self._add_stats(stats)
            self.alignment_schedule.end_step()
        return task_loss

    # -- logging -------------------------------------------------------------------------------

    def _add_align_loss(self, loss: Tensor) -> None:
        loss = loss.float()
        self._align_sum = loss if self._align_sum is None else self._align_sum + loss
        if self.accelerator.sync_gradients:
            self._align_steps += 1

    def _add_stats(self, stats: Any) -> None:
        scalars = stats.scalars()
        vec = torch.stack([v.detach().reshape(()).float() for v in scalars.values()])
        if self._stat_sum is None or tuple(scalars) != self._stat_names:
            self._stat_names = tuple(scalars)
            self._stat_sum = torch.zeros_like(vec)
            self._stat_steps = 0
        self._stat_sum += vec
        self._stat_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; this is the only place the device sums are read.
        if "loss" in logs:
            if self._stat_steps:
                means = (self._stat_sum / self._stat_steps).tolist()
                for name, value in zip(self._stat_names, means):
                    logs[f"surgery/{_STAT_LOG_NAMES.get(name, name)}"] = value
                self._stat_sum.zero_()
                self._stat_steps = 0
            if self._align_steps:
                logs["align_loss"] = float(self._align_sum) / self._align_steps
                self._align_sum = None
                self._align_steps = 0
        super().log(logs, start_time)
