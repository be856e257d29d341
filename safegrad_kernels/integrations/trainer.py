"""``SafeGradTrainer``: a ``transformers.Trainer`` that fine-tunes a PEFT model with a defense.

Methods (``method=``):

- ``"sft"``: plain fine-tuning, the baseline (no alignment data needed).
- ``"safegrad"``: SafeGrad surgery (arXiv 2508.07172) against the KL alignment gradient.
- ``"spf"``: safety-subspace projection (arXiv 2601.10141) of the task gradient.
- ``"mixed"``: multi-objective baseline, loss = task + ``lam`` * alignment loss.

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
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from transformers import Trainer

from ..compat import numpy_rng_state_globals
from ..losses import ReferenceCache, kl_alignment_loss, reference_logits, response_token_count
from ..surgery import SPF, SafeGrad, Surgeon
from ..surgery.base import check_backend, check_choice
from ..surgery.safegrad import GRANULARITIES
from ..surgery.spf import MODES as SPF_MODES

# Written into each checkpoint-* folder when the surgeon carries state between steps (SPF).
SURGEON_STATE_FILE = "safegrad_surgeon.pt"

__all__ = ["METHODS", "SafeGradTrainer"]

METHODS = ("sft", "safegrad", "spf", "mixed")
ALIGNMENT_LOSSES = ("kl", "ce")
_NON_MODEL_KEYS = ("labels", "num_items_in_batch")
# Stats whose log name says more than the field name (SafeGradStats.conflict is 0/1).
_STAT_LOG_NAMES = {"conflict": "conflict_rate"}


class _Indexed(Dataset):
    """Yields ``(index, example)`` so that cached reference logits can be keyed by index."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class _IndexedCollator:
    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], dict[str, Any]]:
        return [i for i, _ in items], self.collate([x for _, x in items])


def _causal_ce(logits: Tensor, labels: Tensor, count: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed next-token cross-entropy / ``count`` (0 when ``count`` is 0)."""
    # Shift the labels, not the logits: slicing [B, T, V] logits would copy them.
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    count = count.to(total.device, torch.float32)
    return torch.where(count > 0, total / count.clamp_min(1.0), 0.0)


def _check_nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


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

    Args (besides the ``Trainer``'s own; ``model`` must be a ``peft.PeftModel`` whenever
    a KL reference is needed):
        alignment_dataset: examples with ``input_ids``, ``attention_mask``, ``labels``
            (-100 on the prompt), collated by the trainer's ``data_collator``. Required
            unless ``method="sft"``. Cycled, reshuffled on each pass (seed ``args.seed``).
        method: ``"sft"``, ``"safegrad"``, ``"spf"`` or ``"mixed"``.
        rho: SafeGrad's weight of the alignment gradient added back (>= 0; paper: 1).
        lam: the mixed baseline's alignment-loss weight (>= 0).
        spf_rank, spf_refresh_every, spf_mode: SPF's subspace rank, basis refresh period
            in optimizer steps (``None``: computed once), ``"conflicting"``/``"always"``.
            The alignment pass runs only on steps whose basis is (re)computed.
        alignment_loss: ``"kl"`` = KL(P_ref || P_theta) against the adapter-free model, or
            ``"ce"`` = cross-entropy on the alignment answers. Default: ``"kl"``, except
            ``"ce"`` for SPF, whose once-computed basis would otherwise come from the
            all-zero KL gradient of a fresh LoRA (model == reference at step 0).
        kl_positions: ``"response"`` or ``"all"`` (the authors' choice); see
            ``kl_alignment_loss``.
        alignment_batch_size: alignment examples per micro-batch; default
            ``args.per_device_train_batch_size``.
        surgery_backend: op backend for the surgeon (``None`` = auto).
        surgery_granularity: SafeGrad's ``"global"`` (the paper) or ``"per_tensor"``.
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
    docstring), DDP with ``gradient_as_bucket_view=False``. Not supported: DeepSpeed.
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
        cache_reference: bool = False,
        **kwargs: Any,
    ) -> None:
        # Cheap argument checks first: a bad configuration fails before any set-up.
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.rho = _check_nonneg("rho", rho)
        self.lam = _check_nonneg("lam", lam)
        if alignment_loss is None:
            alignment_loss = "ce" if method == "spf" else "kl"
        if alignment_loss not in ALIGNMENT_LOSSES:
            raise ValueError(
                f"alignment_loss must be one of {ALIGNMENT_LOSSES}, got {alignment_loss!r}"
            )
        self.alignment_loss = alignment_loss
        if kl_positions not in ("response", "all"):
            raise ValueError(f"kl_positions must be 'response' or 'all', got {kl_positions!r}")
        self.kl_positions = kl_positions
        if method != "sft" and alignment_dataset is None:
            raise ValueError(
                f"method={method!r} needs an alignment_dataset (only 'sft' runs without)"
            )
        if method != "sft" and len(alignment_dataset) == 0:
            raise ValueError("alignment_dataset is empty")
        if alignment_batch_size is not None and alignment_batch_size < 1:
            raise ValueError(f"alignment_batch_size must be >= 1, got {alignment_batch_size}")
        if not isinstance(spf_rank, int) or spf_rank < 1:
            raise ValueError(f"spf_rank must be an int >= 1, got {spf_rank!r}")
        if spf_refresh_every is not None and (
            not isinstance(spf_refresh_every, int) or spf_refresh_every < 1
        ):
            raise ValueError(
                f"spf_refresh_every must be None or an int >= 1, got {spf_refresh_every!r}"
            )
        self.spf_rank = spf_rank
        self.spf_refresh_every = spf_refresh_every
        self.spf_mode = check_choice("spf_mode", spf_mode, SPF_MODES)
        self.surgery_backend = check_backend(surgery_backend)
        self.surgery_granularity = check_choice(
            "surgery_granularity", surgery_granularity, GRANULARITIES
        )
        self.alignment_dataset = alignment_dataset

        super().__init__(*args, **kwargs)

        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameter (empty parameter list)")
        self._uses_alignment = method != "sft"
        self._needs_reference = self._uses_alignment and alignment_loss == "kl"
        if self._needs_reference and not hasattr(self.model, "disable_adapter"):
            raise TypeError(
                "the KL alignment loss takes its reference from the same model with adapters "
                f"disabled, which needs a peft.PeftModel; got {type(self.model).__name__} "
                "(use alignment_loss='ce' or wrap the model with peft)"
            )
        self.alignment_batch_size = alignment_batch_size or self.args.per_device_train_batch_size
        if _checkpointing_requested(self.args):
            _let_gradients_reach_checkpoints(self.model)
        self.reference_cache = (
            ReferenceCache(positions=kl_positions)
            if cache_reference and self._needs_reference
            else None
        )

        self._surgeon: Surgeon | None = None
        self._pending_surgeon_state: dict[str, Any] | None = None
        self._alignment_iter: Iterator[tuple[list[int], dict[str, Any]]] | None = None
        self._alignment_epoch = 0
        self._alignment_positioned = False
        # Per optimizer step: the alignment micro-batches still to run and their token count.
        self._alignment_plan: list[tuple[list[int], dict[str, Any]]] | None = None
        self._alignment_items: Tensor | None = None
        # Logging window, on the device: sums and counts since the last log.
        self._stat_names: tuple[str, ...] = ()
        self._stat_sum: Tensor | None = None
        self._stat_steps = 0
        self._align_sum: Tensor | None = None
        self._align_steps = 0

    # -- surgeon and alignment data --------------------------------------------------------

    def _trainable_params(self) -> list[nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [p for p in model.parameters() if p.requires_grad]

    @property
    def surgeon(self) -> Surgeon | None:
        """The surgeon (built on first use, after the Trainer has placed the model)."""
        if self._surgeon is None and self.method in ("safegrad", "spf"):
            params = self._trainable_params()
            if self.method == "safegrad":
                self._surgeon = SafeGrad(
                    params,
                    rho=self.rho,
                    granularity=self.surgery_granularity,
                    backend=self.surgery_backend,
                )
            else:
                self._surgeon = SPF(
                    params,
                    rank=self.spf_rank,
                    refresh_every=self.spf_refresh_every,
                    mode=self.spf_mode,
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

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # transformers 4.46 + torch >= 2.6 cannot read its own rng_state.pth (see there).
        with numpy_rng_state_globals():
            super()._load_rng_state(checkpoint)

    def get_alignment_dataloader(self) -> DataLoader:
        """Loader over ``(indices, batch)``; reshuffled per pass with ``args.seed``."""
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
        indexed = _Indexed(dataset)
        if self.args.world_size > 1:
            sampler = DistributedSampler(
                indexed,
                num_replicas=self.args.world_size,
                rank=self.args.process_index,
                shuffle=True,
                seed=self.args.seed,
            )
            sampler.set_epoch(self._alignment_epoch)
        else:
            gen = torch.Generator().manual_seed(self.args.seed + self._alignment_epoch)
            sampler = RandomSampler(indexed, generator=gen)
        return DataLoader(
            indexed,
            batch_size=self.alignment_batch_size,
            sampler=sampler,
            collate_fn=_IndexedCollator(collate),
            num_workers=0,
            # Without its own generator a new iterator draws its base seed from the global
            # RNG, after a checkpoint saved that RNG: a resumed run's dropout would shift.
            generator=torch.Generator().manual_seed(self.args.seed + self._alignment_epoch),
        )

    def _alignment_batches_consumed(self) -> int:
        """Alignment micro-batches drawn before ``state.global_step`` (for exact resume).

        safegrad and mixed draw one per micro-batch on every step. SPF draws only on its
        refresh steps, 0, k, 2k, ... for ``refresh_every = k`` (or step 0 alone), since
        the trainer supplies a reference whenever SPF wants one; its basis and step
        counters come back from the checkpoint (``SURGEON_STATE_FILE``).
        """
        steps = self.state.global_step
        if self.method == "spf":
            k = self.spf_refresh_every
            steps = min(steps, 1) if k is None else -(-steps // k)
        return steps * self.args.gradient_accumulation_steps

    def _next_alignment_batch(self) -> tuple[list[int], dict[str, Any]]:
        skip = 0
        if not self._alignment_positioned:
            # First draw of this process: continue where a resumed run left off.
            self._alignment_positioned = True
            per_epoch = len(self.get_alignment_dataloader())
            self._alignment_epoch, skip = divmod(self._alignment_batches_consumed(), per_epoch)
        while True:
            if self._alignment_iter is None:
                self._alignment_iter = iter(self.get_alignment_dataloader())
                for _ in range(skip):
                    next(self._alignment_iter)
                skip = 0
            try:
                return next(self._alignment_iter)
            except StopIteration:
                self._alignment_iter = None
                self._alignment_epoch += 1

    def _plan_alignment(self, num_micro_batches: int) -> None:
        """Draw this optimizer step's alignment micro-batches and their token count."""
        plan: list[tuple[list[int], dict[str, Any]]] = []
        wanted = self._uses_alignment and (
            self.method != "spf" or self.surgeon.wants_reference  # type: ignore[union-attr]
        )
        if wanted:
            plan = [self._next_alignment_batch() for _ in range(num_micro_batches)]
            # Counted on the host-side collated labels: no device sync.
            count = sum(response_token_count(batch["labels"]) for _, batch in plan)
            self._alignment_items = torch.as_tensor(count).to(self.args.device)
        self._alignment_plan = plan

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
            self._plan_alignment(len(batch_samples))
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
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        labels = batch["labels"]
        with self.compute_loss_context_manager():
            if self.alignment_loss == "kl":
                ref = self._reference(model, batch, indices)
                logits = model(**inputs).logits
                return kl_alignment_loss(
                    logits, ref, labels, positions=self.kl_positions, num_items_in_batch=count
                )
            return _causal_ce(model(**inputs).logits, labels, count)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        surgeon = self.surgeon
        if self._uses_alignment:
            if self._alignment_plan is None:
                raise RuntimeError(
                    "SafeGradTrainer plans alignment batches in Trainer.get_batch_samples, "
                    "which this transformers version did not call before training_step"
                )
            if self._alignment_plan:
                indices, batch = self._alignment_plan.pop(0)
                model.train()
                batch = self._prepare_inputs(batch)
                capture = surgeon.reference() if surgeon is not None else contextlib.nullcontext()
                with capture:
                    loss = self.alignment_loss_on(model, batch, indices, self._alignment_items)
                    weight = self.lam if self.method == "mixed" else 1.0
                    self.accelerator.backward(loss * weight if weight != 1.0 else loss)
                self._add_align_loss(loss.detach())

        task_loss = super().training_step(model, inputs, num_items_in_batch)

        # sync_gradients is True exactly on the micro-batch after which the Trainer clips
        # and steps (it sets it from the same do_sync_step flag), so the surgery runs once
        # per optimizer step, on the fully accumulated g_u and g_a, before clipping.
        if self.accelerator.sync_gradients:
            if surgeon is not None:
                self._add_stats(surgeon.step())
            self._alignment_plan = None
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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # `*args`: the start_time of newer releases (4.46 has none), passed through.
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
        super().log(logs, *args, **kwargs)
