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

The reference distribution (the KL's P_ref) is the starting model's: the same PEFT model
with its adapters disabled, under ``torch.no_grad`` and in eval mode, so there is no second
model copy (the authors hold a full bf16 copy, about 2x SFT memory). Surgery statistics
(conflict rate, cosine, coefficient, alignment loss) accumulate on the device and are read
on the host only on logging steps.

Reference store (``cache_reference``, ``reference_top_k``; ``integrations/reference.py``).
Before the first optimizer step (lazily, at the first ``training_step``, after a resumed
checkpoint has loaded) the starting model runs once over the whole alignment set and a
``ReferenceStore`` keeps, on the host, its log-probabilities at the positions the KL reads:
exact fp32 (``cache_reference=True``) or the top k plus the tail mass
(``reference_top_k=k``). Each alignment micro-batch then reads its rows from the store
instead of running the reference forward. Default (``cache_reference=None``): on, exact,
when ``kl_positions="response"`` and the exact store fits ``REFERENCE_STORE_BUDGET`` (1 GiB)
of host memory, ``rows x (4 V + 4)`` bytes; off otherwise (reason logged; the decision is
``trainer.reference_choice``). Sizes for 100 x 1024 loss rows at V = 128,256: 52.5 GB exact
fp32, 53.2 MB top-64. The store is also what lets a plain (non-PEFT) model, full-parameter
fine-tuning, train with the KL: its starting weights are gone after the first step, and no
second copy is held. Resume: a PEFT model whose trainable tensors are all adapters rebuilds
the store from the adapter-disabled model (the same numbers); any other model saves it in
each checkpoint (``REFERENCE_STORE_FILE``) and reloads it, and refuses to resume without it.

Error of a top-k store (from ``reference_store``): per row, with Q the reference mass
outside the stored k tokens and P the model's, the top-k KL is the KL of the two
distributions coarsened to the k tokens plus one tail bucket, so

  KL(q||p) - KL_topk = Q KL(q_tail / Q || p_tail / P)  in  [0, Q (log P - min_tail log p)]

(never an overestimate), and its logit gradient differs from the exact one only on the tail:
||error||_1 <= 2 Q, ||error||_2 <= sqrt(2) Q per row, times sigma_max(W) for the hidden
states. The store logs the largest Q it kept (``tail_mass_max``), so the bound is known
before the first step.

Fused losses (``fused_loss=True``; ``fused_losses``, ``integrations/fused_head.py``): the
alignment KL (or CE) and the task cross-entropy are computed from the LM head's input and
weight chunk by chunk, never materialising the ``[tokens, vocab]`` logits; the KL's
reference comes from the store or from the adapter-disabled hidden states. The task loss
reproduces ``Trainer.compute_loss`` of transformers 5.24: with a model that takes loss
kwargs and a step count ``num_items_in_batch``, sum / that count (times the process count
under ``average_tokens_across_devices``), else the micro-batch mean (the Trainer then
divides by the accumulation steps). Models ``fused_head`` cannot handle, and task losses
the Trainer would not compute itself (label smoothing, ``compute_loss_func``, a class
between this one and ``Trainer`` with its own ``compute_loss``, e.g. TRL's), stay on the
logits path with the reason logged. Rows for the fused losses come from the host-side
labels (alignment batches) or, for device-side task labels, are every row (prompt rows
weigh 0): no host synchronisation either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from ..compat import numpy_rng_state_globals
from ..fused_losses import (
    fused_linear_cross_entropy,
    fused_linear_kl,
    kl_from_reference,
    rows_without_sync,
)
from ..losses import (
    kl_alignment_loss,
    model_inputs,
    reference_logits,
    response_ce,
)
from ..reference_store import ReferenceStore
from ..surgery import Surgeon
from ..surgery.base import check_backend, check_choice
from ..surgery.methods import ALIGNMENT_LOSSES, get_method
from ..surgery.methods import METHODS as _REGISTRY
from .alignment_batches import AlignmentSchedule, alignment_loader
from .deepspeed import zero_surgery_for
from .fused_head import fused_head_unsupported, hidden_states_and_head, reference_hidden_states
from .reference import (
    StoreChoice,
    build_reference_store,
    check_store_arguments,
    choose_store,
    count_loss_rows,
    is_peft_model,
    model_vocab,
    store_is_rebuildable,
)

# Written into each checkpoint-* folder when the surgeon carries state between steps (SPF).
SURGEON_STATE_FILE = "safegrad_surgeon.pt"
# Written next to it when the reference store cannot be rebuilt on resume (full fine-tuning).
REFERENCE_STORE_FILE = "safegrad_reference_store.pt"

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "SafeGradTrainer"]

# The registry's names, for ``--method`` choices and checks that need no Trainer.
METHODS = tuple(_REGISTRY)
# Stats whose log name says more than the field name (SafeGradStats.conflict is 0/1).
_STAT_LOG_NAMES = {"conflict": "conflict_rate"}


def _checkpointing_requested(args: Any) -> bool:
    # transformers 5 renamed the flag to activation_checkpointing (the old name mirrors it).
    return bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing)


def _let_gradients_reach_checkpoints(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, as checkpointing a LoRA model needs.

    With every base weight frozen, a checkpointed layer's inputs do not require grad; a
    reentrant checkpoint (transformers 4.x's default) then returns outputs without a
    grad_fn and backward fails ("element 0 of tensors does not require grad"; seen with
    transformers 4.52 + peft 0.15). transformers 5 registers this hook itself when it
    enables checkpointing; a second registration is harmless (the hook only sets
    requires_grad). Models without the method (not a PreTrainedModel) are left alone.
    """
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()


class SafeGradTrainer(Trainer):
    """``transformers.Trainer`` with SafeGrad / SPF / mixed-objective alignment.

    Args (besides the ``Trainer``'s own; with the KL alignment loss ``model`` is a
    ``peft.PeftModel``, or any causal LM when the reference store is on):
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
            alignment pass (and its batches) runs on steps 0, 1, k, 2k, ... only (step 1
            too: step 0's g_a is zero when the model starts as its reference), the
            surgeon keeps that g_a in between (N extra elements resident) and projects
            each step's g_u against it; the kept g_a goes into checkpoints
            (``SURGEON_STATE_FILE``). 1 (default): every step. k > 1 is refused with
            fp16 (a dynamic loss scale) and under DeepSpeed, and logs a warning: in
            ``safegrad study`` (docs/study) the task accuracy fell significantly at k = 4
            in both runs of the study (by 15-22 points at p = 0.3 and 0.5), at k = 2 in
            one of the two (p = 0.5, on another CPU), and k = 8 broke fine-tuning down.
        cache_reference: the reference store (module docstring): ``True`` builds it,
            ``False`` recomputes the reference on every visit, ``None`` (default) builds an
            exact one when it fits ``REFERENCE_STORE_BUDGET`` (1 GiB) and
            ``kl_positions="response"``.
        reference_top_k: keep the top k reference log-probabilities per row plus the tail
            mass (``8 k + 8`` bytes a row) instead of all ``V``; implies the store. Error
            bound in the module docstring.
        fused_loss: compute the alignment loss and the task cross-entropy from the LM
            head's input without the ``[tokens, vocab]`` logits (module docstring).

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
        cache_reference: bool | None = None,
        reference_top_k: int | None = None,
        fused_loss: bool = False,
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
        default_ddp_find_unused_parameters(
            kwargs.get("args", args[1] if len(args) > 1 else None),
            _is_peft_model(kwargs.get("model", args[0] if args else None)),
        )
        check_store_arguments(cache_reference, reference_top_k)

        super().__init__(*args, **kwargs)

        # -- alignment refresh (issue 13): the kept g_a carries its refresh step's loss scale
        every = self.method_settings.get("alignment_every", 1)
        if every > 1 and self.args.fp16:
            raise ValueError(
                "alignment_every > 1 with fp16 is not supported: the kept alignment "
                "gradient would carry the loss scale of its refresh step while the task "
                "gradient carries the current one; use bf16 or fp32, or alignment_every=1"
            )
        if every > 1:
            logger.warning(
                "alignment_every=%d: the alignment gradient of steps 0, 1, %d, %d, ... is "
                "kept for up to %d steps; in safegrad study (docs/study) the task accuracy fell "
                "significantly at k = 4 (by 15-22 points at p = 0.3 and 0.5), at k = 2 in one "
                "of two runs, and k = 8 broke fine-tuning down. "
                "alignment_every=1 is the safe setting.",
                every, every, 2 * every, every - 1,
            )  # fmt: skip
        # -- end alignment refresh
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameter (empty parameter list)")
        self._needs_reference = self._uses_alignment and self.alignment_loss == "kl"
        self.alignment_batch_size = alignment_batch_size or self.args.per_device_train_batch_size
        if _checkpointing_requested(self.args):
            _let_gradients_reach_checkpoints(self.model)
        self._set_up_reference_and_fused_loss(cache_reference, reference_top_k, fused_loss)

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

    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        # 4.x passes `metrics=`, 5.x does not: whatever the caller gives, the parent takes.
        super()._save_checkpoint(model, trial, *args, **kwargs)
        state = self._surgeon.state_dict() if self._surgeon is not None else {}
        if state and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, SURGEON_STATE_FILE)
            torch.save(state, path)
        self._save_reference_store(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_reference_store(resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, SURGEON_STATE_FILE)
        if not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self._surgeon is not None:
            self._surgeon.load_state_dict(state)
        else:  # applied when the surgeon is built, after the model has been placed
            self._pending_surgeon_state = state

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # transformers 4.46 + torch >= 2.6 cannot read its own rng_state.pth (see there).
        with numpy_rng_state_globals():
            super()._load_rng_state(checkpoint)

    def get_alignment_dataloader(self, epoch: int | None = None) -> DataLoader:
        """Loader over ``(indices, batch)`` for alignment pass ``epoch`` (default: the current).

        Shuffled per pass with ``args.seed``; columns the model does not take are removed
        as the Trainer does for its own datasets.
        """
        dataset, collate = self._alignment_data_and_collator()
        return alignment_loader(
            dataset,
            collate,
            batch_size=self.alignment_batch_size,
            seed=self.args.seed,
            epoch=self.alignment_schedule.epoch if epoch is None else epoch,
            world_size=self.args.world_size,
            rank=self.args.process_index,
        )

    def _alignment_data_and_collator(self) -> tuple[Any, Any]:
        """The alignment set and collator, without the columns the model does not take."""
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
        return dataset, collate

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

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, *args: Any, **kwargs: Any
    ):
        # Called once per optimizer step with all of its micro-batches: the one place that
        # knows how many micro-batches follow, so the alignment side is planned here.
        # `*args`: newer releases pass `device` (4.52 does, 4.46 does not); the caller and the
        # parent come from the same release, so its arguments pass through unchanged.
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, *args, **kwargs
        )
        if self._uses_alignment:
            due = self.method_spec.alignment_due(self.surgeon)
            self.alignment_schedule.plan(len(batch_samples) if due else 0, self.args.device)
        return batch_samples, num_items_in_batch

    # -- the step ----------------------------------------------------------------------------

    def alignment_loss_on(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        indices: list[int],
        count: Tensor,
        *,
        host_labels: Tensor | None = None,
    ) -> Tensor:
        """The alignment loss of one micro-batch, normalised by ``count`` response tokens.

        ``host_labels``: the batch's labels before they were moved to the device; with them
        the store checks its rows and the fused losses find theirs without a host sync.
        """
        labels = batch["labels"]
        with self.compute_loss_context_manager(), self._head_autocast():
            if self.alignment_loss == "kl":
                return self._kl_alignment_loss(model, batch, indices, count, host_labels)
            head = self._fused_head(model, batch)
            if head is not None:
                hidden, weight, bias = head
                rows = rows_without_sync(labels, host_labels, "response")
                return fused_linear_cross_entropy(
                    hidden, weight, labels, bias=bias, num_items_in_batch=count, rows=rows
                )
            return response_ce(
                model(**model_inputs(batch)).logits, labels, num_items_in_batch=count
            )

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        surgeon = self.surgeon
        self._ensure_reference_store()
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
                host_labels = batch["labels"]
                batch = self._prepare_inputs(batch)
                if self._zero is not None:  # -- DeepSpeed ZeRO-1/2 (integrations/deepspeed.py)
                    weight = self.method_spec.loss_weight(self.method_settings)
                    self._zero.install(
                        self.model_wrapped, self._trainable_params(), surgeon, weight
                    )
                    unwrapped = self.accelerator.unwrap_model(model)
                    loss = self.alignment_loss_on(
                        unwrapped, batch, indices, schedule.num_items, host_labels=host_labels
                    )
                    self._zero.capture(loss)
                    self._add_align_loss(loss.detach())
                    return self._zero_task_step(model, inputs, num_items_in_batch)
                capture = surgeon.reference() if surgeon is not None else contextlib.nullcontext()
                with capture:
                    loss = self.alignment_loss_on(
                        model, batch, indices, schedule.num_items, host_labels=host_labels
                    )
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

    # -- reference store and fused losses (module docstring; integrations/reference.py) -----

    def _set_up_reference_and_fused_loss(
        self, cache_reference: bool | None, reference_top_k: int | None, fused_loss: bool
    ) -> None:
        """Decide the store (built later, at the first step) and the fused paths; refuse a
        plain model whose KL would have no reference."""
        model = self.accelerator.unwrap_model(self.model)
        positions = self.kl_positions
        if self._needs_reference:
            self.reference_choice = choose_store(
                cache_reference,
                reference_top_k,
                positions=positions,
                count_rows=lambda: count_loss_rows(self._reference_batches(), positions),
                vocab=model_vocab(model),
            )
            state = "on" if self.reference_choice.on else "off"
            logger.info("reference store %s: %s", state, self.reference_choice.reason)
        else:
            self.reference_choice = StoreChoice(False, None, "no KL alignment loss")
        self.reference_store: ReferenceStore | None = None
        if self._needs_reference and not self.reference_choice.on and not is_peft_model(model):
            raise TypeError(
                "the KL alignment loss needs the starting model's distribution: the same "
                "model with adapters disabled (a peft.PeftModel), or a reference store "
                f"computed before the first step; got {type(model).__name__} with the store "
                f"off ({self.reference_choice.reason}). For full fine-tuning pass "
                "cache_reference=True or reference_top_k=k; else use alignment_loss='ce' "
                "or wrap the model with peft"
            )

        self._fused_loss = bool(fused_loss)
        why = fused_head_unsupported(model) if fused_loss else None
        if why is not None:
            logger.warning("fused_loss=True: using the logits path: %s", why)
            self._fused_loss = False
        self._fused_task_loss = self._fused_loss
        why = self._task_loss_not_trainers() if self._fused_loss else None
        if why is not None:
            logger.warning("fused_loss=True: the task loss stays on the logits path: %s", why)
            self._fused_task_loss = False

    def _task_loss_not_trainers(self) -> str | None:
        """Why the task loss is not ``Trainer.compute_loss``'s plain cross-entropy, if so."""
        mro = type(self).__mro__
        for cls in mro[mro.index(SafeGradTrainer) + 1 :]:
            if "compute_loss" in vars(cls):
                if cls is not Trainer:
                    return f"{cls.__name__}.compute_loss computes it"
                break
        if self.label_smoother is not None:
            return "label smoothing (label_smoothing_factor)"
        if self.compute_loss_func is not None:
            return "a compute_loss_func computes it"
        parallel = getattr(self.accelerator, "parallelism_config", None)
        if parallel is not None and getattr(parallel, "sp_enabled", False):
            return "sequence parallelism computes it"
        return None

    def _reference_batches(self, device: bool = False) -> Iterator[tuple[list[int], Any]]:
        """The alignment set in index order, ``alignment_batch_size`` examples a batch (on
        the training device with ``device=True``): what the store is built from."""
        dataset, collate = self._alignment_data_and_collator()
        size = self.alignment_batch_size
        for start in range(0, len(dataset), size):
            indices = list(range(start, min(start + size, len(dataset))))
            batch = collate([dataset[i] for i in indices])
            yield indices, self._prepare_inputs(batch) if device else batch

    def _ensure_reference_store(self) -> None:
        """Build the store before the first update (no-op once built or loaded)."""
        if not self.reference_choice.on or self.reference_store is not None:
            return
        model = self.accelerator.unwrap_model(self.model)
        if self.state.global_step > 0 and not store_is_rebuildable(model):
            raise RuntimeError(
                f"resumed at step {self.state.global_step} without {REFERENCE_STORE_FILE} in "
                f"the checkpoint: {type(model).__name__}'s starting weights are gone (not a "
                "PEFT model with only adapters trainable), so the reference store cannot be "
                "rebuilt; resume from a checkpoint saved with the store on"
            )
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            self.reference_store = build_reference_store(
                model,
                self._reference_batches(device=True),
                positions=self.kl_positions,
                top_k=self.reference_choice.top_k,
            )

    def _save_reference_store(self, trial: Any) -> None:
        store = self.reference_store
        model = self.accelerator.unwrap_model(self.model)
        if store is None or not self.args.should_save or store_is_rebuildable(model):
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = os.path.join(self._get_output_dir(trial=trial), folder, REFERENCE_STORE_FILE)
        torch.save(store.state_dict(), path)

    def _load_reference_store(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, REFERENCE_STORE_FILE)
        if not (self.reference_choice.on and os.path.isfile(path)):
            return
        store = ReferenceStore()
        store.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if (store.top_k, store.positions) != (self.reference_choice.top_k, self.kl_positions):
            raise ValueError(
                f"{path} holds a store with top_k={store.top_k}, positions={store.positions!r}; "
                f"this run asks for top_k={self.reference_choice.top_k}, "
                f"positions={self.kl_positions!r}"
            )
        self.reference_store = store

    def _head_autocast(self) -> contextlib.AbstractContextManager:
        # accelerate runs the model's forward under autocast (it wraps model.forward), so
        # the model's own head multiplies in bf16/fp16 under mixed precision; the fused
        # losses multiply by the head outside that forward, and must too, to give the
        # logits path's numbers (and pass fused_head's output check).
        return self.accelerator.autocast() if self._fused_loss else contextlib.nullcontext()

    def _fused_head(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """``(hidden, weight, bias)`` of ``model`` on ``batch`` for the fused losses, or None
        (fused off, or the model failed ``fused_head``'s output check: off from now on)."""
        if not self._fused_loss:
            return None
        head = hidden_states_and_head(self.accelerator.unwrap_model(model), batch, run=model)
        if head is None:  # the reason was logged by fused_head
            self._fused_loss = self._fused_task_loss = False
        return head

    def _kl_alignment_loss(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        indices: list[int],
        count: Tensor,
        host_labels: Tensor | None,
    ) -> Tensor:
        labels = batch["labels"]
        settings = {"positions": self.kl_positions, "num_items_in_batch": count}
        if self.reference_store is not None:
            ref = self.reference_store.get(
                indices, labels=host_labels, seq_len=labels.shape[1], device=labels.device
            )
            head = self._fused_head(model, batch)
            if head is not None:
                hidden, weight, bias = head
                return fused_linear_kl(hidden, weight, labels, ref, bias=bias, **settings)
            logits = model(**model_inputs(batch)).logits
            return kl_from_reference(logits, ref, labels, **settings)
        peft_model = self.accelerator.unwrap_model(model)
        if self._fused_loss:
            ref_head = reference_hidden_states(peft_model, batch)
            if ref_head is None:
                self._fused_loss = self._fused_task_loss = False
            head = self._fused_head(model, batch) if ref_head is not None else None
            if head is not None:
                hidden, weight, bias = head
                rows = rows_without_sync(labels, host_labels, self.kl_positions)
                return fused_linear_kl(
                    hidden, weight, labels, ref_head[0], bias=bias, rows=rows, **settings
                )
        ref = reference_logits(peft_model, batch)
        return kl_alignment_loss(model(**model_inputs(batch)).logits, ref, labels, **settings)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        # fused_loss only; otherwise (and whenever outputs are wanted) the Trainer's own.
        if self._fused_task_loss and not return_outputs and "labels" in inputs:
            with self._head_autocast():
                loss = self._fused_task_cross_entropy(model, inputs, num_items_in_batch)
            if loss is not None:
                return loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _fused_task_cross_entropy(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
    ) -> Tensor | None:
        head = self._fused_head(model, inputs)
        if head is None:
            return None
        hidden, weight, bias = head
        labels = inputs["labels"]
        # Trainer.compute_loss (5.24): a model that takes loss kwargs gets num_items_in_batch
        # and divides its summed loss by it; otherwise it returns the micro-batch mean.
        step_count = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            num_items_in_batch=num_items_in_batch if step_count else None,
            rows=rows_without_sync(labels, None, "response"),
        )
        if step_count and self.args.average_tokens_across_devices:
            # The Trainer's own factor: the gradient all-reduce averages over the processes.
            world = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (world if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # `*args`: the start_time of newer releases (4.46 has none), passed through.
        # Training logs carry "loss"; this is the only place the device sums are read.
        if "loss" in logs and (self._stat_steps or self._align_steps):
            parts = [self._stat_sum] if self._stat_steps else []
            if self._align_steps:
                parts.append(self._align_sum.reshape(1))
            sums = self._mean_over_ranks(torch.cat(parts))
            n_stats = len(self._stat_names) if self._stat_steps else 0
            if n_stats:
                means = (sums[:n_stats] / self._stat_steps).tolist()
                for name, value in zip(self._stat_names, means):
                    logs[f"surgery/{_STAT_LOG_NAMES.get(name, name)}"] = value
                self._stat_sum.zero_()
                self._stat_steps = 0
            if self._align_steps:
                logs["align_loss"] = float(sums[n_stats]) / self._align_steps
                self._align_sum = None
                self._align_steps = 0
        super().log(logs, *args, **kwargs)

    # -- accelerate: logged values are means over ranks (issue 11) -----------------------------

    def _mean_over_ranks(self, sums: Tensor) -> Tensor:
        """The window's sums averaged over the processes, as the Trainer averages ``loss``.

        One all-reduce of this small vector (stats + alignment loss), on logging steps
        only; every rank logs on the same steps with the same stats, so all take part.
        A single process returns ``sums`` itself (values bit for bit as before).
        """
        if self.accelerator.num_processes == 1:
            return sums
        return self.accelerator.reduce(sums, reduction="mean")


# -- accelerate: DDP's find_unused_parameters for PEFT models (issue 11) -----------------------


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def default_ddp_find_unused_parameters(args: Any, is_peft: bool) -> None:
    """Set ``args.ddp_find_unused_parameters = False`` for a PEFT model the user left at None.

    The Trainer turns ``None`` into ``True`` for any model that is not a
    ``PreTrainedModel``, a ``PeftModel`` included, so every DDP run of a LoRA model paid
    DDP's extra traversal of the autograd graph after each backward and warned that
    ``find_unused_parameters=True`` found no unused parameter: every trainable LoRA
    factor is used by every forward (the reference forward, adapters disabled, runs
    under ``no_grad`` and needs no gradient). A value the user set is kept; so is
    ``True`` for adapters that really skip a forward (set it explicitly). Like TRL's own
    default for vision models, this writes to ``args``.
    """
    if is_peft and args is not None and getattr(args, "ddp_find_unused_parameters", 0) is None:
        args.ddp_find_unused_parameters = False
