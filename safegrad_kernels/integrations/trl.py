"""TRL: ``SafeGradConfig`` (an ``SFTConfig``) and ``SafeSFTTrainer`` (an ``SFTTrainer``).

TRL extends its trainers by subclassing and keeps a method's settings in a config
dataclass; this module does the same for the defenses of ``SafeGradTrainer``::

    trainer = SafeSFTTrainer(
        model=peft_model,
        args=SafeGradConfig(output_dir="runs/x", method="safegrad", rho=1.0),
        train_dataset=task_ds,          # any TRL format: messages, prompt/completion, text
        alignment_dataset=align_ds,     # the same formats, prepared by TRL the same way
        processing_class=tokenizer,
    )

``SafeSFTTrainer(SafeGradTrainer, SFTTrainer)``: in this order ``SafeGradTrainer``'s
``training_step`` (alignment pass, then the task step, then the surgery before clipping)
wraps TRL's, and TRL's ``compute_loss`` computes the task loss (its fused LM head, its
metrics). The alignment loss runs a plain forward (full logits) of the same model.

The alignment set goes through TRL's own ``_prepare_dataset`` with the run's config
(chat template, EOS, ``max_length`` truncation, ``assistant_only_loss``), so its
``labels`` are -100 exactly where TRL would leave a training example out of the loss;
the alignment loss reads those labels. Three differences from the train set: it is
never packed (the set is small, and cycled and cached by example index: each example
stays one row); ``completion_only_loss=None`` is decided from the alignment set's own
format (prompt/completion: masked prompt), not from the train set's; and a
``formatting_func`` (the user's task-data formatter) is not applied to it.

Unmasked alignment labels (plain text, ``messages`` without ``assistant_only_loss``, a
tokenized set without labels) leave no prompt to exclude. With the KL loss and
``kl_positions="response"`` that would silently put the KL on the prompt as well, so it
is a ``ValueError`` at construction naming the setting; ``kl_positions="all"`` asks for
every position explicitly. The cross-entropy loss (SPF) on such data trains the prompt
tokens too, which can be meant for plain-text refusals: a one-time warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, get_args

import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from ..losses import Positions
from ..surgery.base import check_backend, check_choice, check_int
from ..surgery.methods import ALIGNMENT_LOSSES, HYPERPARAMETERS, METHODS, get_method
from .reference import check_store_arguments
from .trainer import SafeGradTrainer, default_ddp_find_unused_parameters

__all__ = ["SafeGradConfig", "SafeSFTTrainer"]

# TRL builds the -100 labels during dataset preparation since 1.8 (before, its collator
# built them from mask columns, which the alignment loss never sees). Tested: trl 1.8.0,
# 1.10.0 and 1.16.0 with transformers 5.24.
MIN_TRL_VERSION = "1.8"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"safegrad_kernels.integrations.trl needs trl>={MIN_TRL_VERSION}, found {trl.__version__}"
    )

KL_POSITIONS = get_args(Positions)


def _with_method_hyperparameters(cls: type) -> type:
    """Adds one dataclass field per registry hyperparameter (``HYPERPARAMETERS``) to ``cls``.

    Name, type, default, help and choices are the registry's, so a new method option is
    a config field (and a command-line flag of ``HfArgumentParser`` / ``TrlParser``)
    without an edit here. Applied before ``@dataclass``; the fields follow ``method``.
    """
    own = dict(inspect.get_annotations(cls))
    annotations = {"method": own.pop("method")}
    for h in HYPERPARAMETERS.values():
        metadata = {"help": h.help}
        if h.choices is not None:
            metadata["choices"] = list(h.choices)
        annotations[h.name] = h.type if h.default is not None else h.type | None
        setattr(cls, h.name, field(default=h.default, metadata=metadata))
    cls.__annotations__ = {**annotations, **own}
    return cls


@dataclass
@_with_method_hyperparameters
class SafeGradConfig(SFTConfig):
    """``SFTConfig`` plus the settings of ``SafeGradTrainer`` (see its docstring).

    Added fields: ``method`` (a name in ``METHODS``), one field per method
    hyperparameter of the registry (``safegrad_kernels.surgery.methods.HYPERPARAMETERS``, now
    ``rho``, ``surgery_granularity``, ``spf_rank``, ``spf_refresh_every``, ``spf_mode``,
    ``lam``, with the registry's defaults), ``alignment_loss``, ``kl_positions``,
    ``alignment_batch_size`` and ``surgery_backend``. Every added field is passed to
    ``SafeGradTrainer`` under its own name (``trainer_kwargs()``), so a further trainer
    option (e.g. a reference store) is one field here. All are checked in
    ``__post_init__``: a bad value raises naming the field before any model is touched.

    TRL's defaults stay (``gradient_checkpointing=True``, ``bf16`` unless ``fp16``,
    ``logging_steps=10``).
    """

    method: str = field(
        default="safegrad",
        metadata={"help": "fine-tuning method: a registry entry", "choices": list(METHODS)},
    )
    alignment_loss: str | None = field(
        default=None,
        metadata={
            "help": "alignment loss: 'kl' (to the adapter-free model) or 'ce' (safe answers); "
            "default: the method's",
            "choices": list(ALIGNMENT_LOSSES),
        },
    )
    kl_positions: str = field(
        default="response",
        metadata={
            "help": "positions of the KL: 'response' (labels != -100) or 'all'",
            "choices": list(KL_POSITIONS),
        },
    )
    alignment_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "alignment examples per micro-batch; default per_device_train_batch_size"
        },
    )
    surgery_backend: str | None = field(
        default=None,
        metadata={"help": "op backend of the surgeon: 'triton', 'cpp', 'torch'; default: auto"},
    )
    cache_reference: bool | None = field(
        default=None,
        metadata={
            "help": "keep the alignment set's reference distribution, computed once before "
            "the first step (None: on where exact and within the trainer's memory budget)"
        },
    )
    reference_top_k: int | None = field(
        default=None,
        metadata={"help": "store only the top k reference log-probabilities per token (+ tail)"},
    )
    fused_loss: bool = field(
        default=False,
        metadata={"help": "alignment KL from the LM head's input, chunk by chunk (no logits)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = get_method(self.method)
        # The registry checks every hyperparameter (each its own check), the method's own
        # and the others alike, as the trainer does.
        spec.validate(**{name: getattr(self, name) for name in HYPERPARAMETERS})
        if self.alignment_loss is not None:
            check_choice("alignment_loss", self.alignment_loss, ALIGNMENT_LOSSES)
        check_choice("kl_positions", self.kl_positions, KL_POSITIONS)
        check_int("alignment_batch_size", self.alignment_batch_size, minimum=1, allow_none=True)
        check_backend(self.surgery_backend)
        check_store_arguments(self.cache_reference, self.reference_top_k)

    @classmethod
    def safegrad_fields(cls) -> tuple[str, ...]:
        """The fields this config adds to ``SFTConfig`` (all ``SafeGradTrainer`` options)."""
        base = {f.name for f in dataclasses.fields(SFTConfig)}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in base)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The added fields as ``SafeGradTrainer`` keyword arguments."""
        return {name: getattr(self, name) for name in self.safegrad_fields()}


class SafeSFTTrainer(SafeGradTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with SafeGrad / SPF / mixed-objective alignment.

    Args: those of ``SFTTrainer``, with ``args`` a ``SafeGradConfig`` (required: the
    method and its settings live there, not in keyword arguments), plus
    ``alignment_dataset``: a ``datasets.Dataset`` in any format TRL trains on
    (``messages``, ``prompt``/``completion``, conversational or not, ``text``, or
    already tokenized), prepared as the module docstring says. Required unless
    ``method="sft"``.

    With ``method="sft"`` the run is ``SFTTrainer``'s, bit for bit (tested).
    """

    def __init__(
        self, model: Any, args: SafeGradConfig, *more: Any, alignment_dataset: Any = None, **kwargs
    ) -> None:
        if not isinstance(args, SafeGradConfig):
            raise TypeError(
                f"args must be a SafeGradConfig (an SFTConfig with the method settings), got "
                f"{type(args).__name__}"
            )
        settings = args.trainer_kwargs()
        clash = sorted(set(settings) & set(kwargs))
        if clash:
            raise TypeError(f"set {clash} in SafeGradConfig, not as trainer arguments")
        method_spec = get_method(args.method)
        if method_spec.needs_alignment:
            alignment_dataset = _check_alignment_dataset(alignment_dataset)
        # TRL wraps the model with peft_config inside SFTTrainer.__init__, after
        # SafeGradTrainer has looked at it: decide the DDP default here for that case.
        default_ddp_find_unused_parameters(args, kwargs.get("peft_config") is not None)
        super().__init__(
            model, args, *more, alignment_dataset=alignment_dataset, **settings, **kwargs
        )
        if method_spec.needs_alignment:
            self.alignment_dataset = self._prepare_alignment_dataset(alignment_dataset)
        # The reference-store decision reads the alignment set: now TRL has prepared it.
        self._alignment_prepared = True
        super()._set_up_reference_and_fused_loss(*self._pending_reference_setup)

    def _set_up_reference_and_fused_loss(self, *settings: Any) -> None:
        # Called by SafeGradTrainer.__init__ before the alignment set is TRL-prepared (its
        # rows counted there would be the raw text); deferred to the end of __init__.
        if getattr(self, "_alignment_prepared", False):
            super()._set_up_reference_and_fused_loss(*settings)
        else:
            self._pending_reference_setup = settings

    def _prepare_alignment_dataset(self, dataset: Any) -> Any:
        """TRL's preparation of ``dataset`` (no packing, no formatting_func), then the label check."""
        args = self.args
        if not self._skip_prepare_dataset:
            saved = self.completion_only_loss
            if args.completion_only_loss is None:
                first = dataset[0]
                self.completion_only_loss = "prompt" in first and "completion" in first
            try:
                dataset = self._prepare_dataset(
                    dataset, self.processing_class, args, False, None, "alignment"
                )
            finally:
                self.completion_only_loss = saved
        if len(dataset) == 0:
            raise ValueError(
                "alignment_dataset is empty after TRL's preparation (max_length truncation "
                "drops examples left without a label)"
            )
        if "labels" not in dataset.column_names:
            raise ValueError(
                "alignment_dataset has no 'labels' column and dataset_kwargs skips TRL's "
                "preparation: add labels (-100 on the prompt)"
            )
        self._check_alignment_labels(dataset)
        return dataset

    def _check_alignment_labels(self, dataset: Any) -> None:
        """Unmasked labels with response positions: an error (KL) or a warning (CE)."""
        if self.alignment_loss == "kl" and self.kl_positions == "all":
            return
        unmasked = sum(1 for labels in dataset["labels"] if -100 not in labels)
        if not unmasked:
            return
        what = (
            f"{unmasked} of {len(dataset)} alignment examples have no masked (prompt) token "
            "after TRL's preparation"
        )
        how = (
            "use prompt/completion data (conversational or not), or messages with "
            "assistant_only_loss=True and a chat template with {% generation %} markers"
        )
        if self.alignment_loss == "kl":
            raise ValueError(
                f"{what}, so kl_positions='response' would put the KL on the prompt as well: "
                f"{how}; or set kl_positions='all' to constrain every position deliberately"
            )
        warnings.warn(
            f"{what}, so the alignment cross-entropy trains on the prompt tokens as well "
            f"(right for plain-text refusals; otherwise {how})",
            UserWarning,
            stacklevel=3,
        )


def _check_alignment_dataset(dataset: Any) -> Any:
    import datasets

    if dataset is None:
        return None  # SafeGradTrainer names the missing argument
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            "alignment_dataset must be a datasets.Dataset (it is cycled and indexed), "
            "not an IterableDataset"
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"alignment_dataset must be a datasets.Dataset, got {type(dataset).__name__} "
            "(datasets.Dataset.from_list(rows) converts a list of dicts)"
        )
    return dataset
