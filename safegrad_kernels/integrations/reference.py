"""The alignment set's reference distribution for ``SafeGradTrainer``: when it is stored, how.

The KL alignment loss compares the model with its starting point on a small fixed set (100
examples in the papers). The trainer either recomputes the reference on every visit (a
no-grad forward of the same PEFT model with its adapters disabled) or computes it once,
before the first optimizer step, into a ``reference_store.ReferenceStore``: exact fp32
log-probabilities, or the top k of them plus the tail mass. The store is what makes
full-parameter fine-tuning possible without a second model (the starting weights are gone
after the first step) and removes the reference forward from every step.

The default rule (``cache_reference=None``, "auto"), decided at construction:

* on, exact (dense fp32), when the KL is used, ``kl_positions="response"`` and the store of
  the whole alignment set fits ``REFERENCE_STORE_BUDGET`` (1 GiB) of host memory:
  ``rows x (4 V + 4)`` bytes, ``rows`` the positions the loss reads (the response tokens);
* off otherwise, with the reason logged. ``kl_positions="all"`` reads padding positions,
  whose reference depends on how much padding the batch has, so a store is exact there only
  for fixed-length batches: ask for it with ``cache_reference=True``.

Sizes (``ReferenceStore.nbytes_for``): 100 x 1024 loss rows at V = 128,256 take 52.5 GB
dense fp32 (off under the rule; the trainer then refuses a plain model unless asked for a
store explicitly) and 53.2 MB top-64; at 100 x 40 response tokens, V = 32,000: 512 MB (on).

``build_reference_store`` runs the starting model: a PEFT model with its adapters disabled,
a plain model as it is (call it before any update). Where ``fused_head`` can read the head's
input, only the loss rows go through the head, ``DEFAULT_MEMORY_BUDGET`` bytes of logits at
a time, so building never holds ``[batch, seq, V]`` logits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..losses import Positions, _eval_mode, model_inputs, response_token_count
from ..reference_store import ReferenceStore
from .fused_head import fused_head_unsupported, hidden_states_and_head
from .peft import _is_lora_name

__all__ = [
    "REFERENCE_STORE_BUDGET",
    "StoreChoice",
    "build_reference_store",
    "check_store_arguments",
    "choose_store",
    "count_loss_rows",
    "is_peft_model",
    "model_vocab",
    "starting_model_fn",
    "store_is_rebuildable",
]

logger = logging.getLogger(__name__)

# Host bytes the "auto" rule lets an exact store take: 2^30 / (4 V + 4) rows, i.e. 100
# examples of 83 response tokens at V = 32,000, but only 21 at Llama-3's V = 128,256 (a
# longer alignment set at that vocabulary needs reference_top_k).
REFERENCE_STORE_BUDGET = 1 << 30

Batches = Iterable[tuple[Sequence[int], Mapping[str, Any]]]


@dataclass(frozen=True)
class StoreChoice:
    """Whether the trainer keeps a reference store, which kind, and why (for the log)."""

    on: bool
    top_k: int | None
    reason: str


def check_store_arguments(cache_reference: bool | None, reference_top_k: int | None) -> None:
    """Argument checks for ``SafeGradTrainer(cache_reference=, reference_top_k=)``."""
    if cache_reference is not None and not isinstance(cache_reference, bool):
        raise TypeError(
            f"cache_reference must be True, False or None (auto), got {cache_reference!r}"
        )
    if reference_top_k is not None:
        if isinstance(reference_top_k, bool) or not isinstance(reference_top_k, int):
            raise TypeError(
                f"reference_top_k must be an int or None, got {type(reference_top_k).__name__}"
            )
        if reference_top_k < 1:
            raise ValueError(f"reference_top_k must be >= 1, got {reference_top_k}")
        if cache_reference is False:
            raise ValueError(
                "reference_top_k keeps the top-k reference in the store, which "
                "cache_reference=False turns off"
            )


def model_vocab(model: nn.Module) -> int | None:
    """Rows of the LM head (the logits' width), else ``config.vocab_size``, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
        return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def count_loss_rows(batches: Batches, positions: Positions) -> int:
    """Positions the KL reads over ``batches`` (host batches): the store's row count."""
    rows = 0
    for _, batch in batches:
        labels = batch["labels"]
        rows += labels.numel() if positions == "all" else int(response_token_count(labels))
    return rows


def choose_store(
    cache_reference: bool | None,
    reference_top_k: int | None,
    *,
    positions: Positions,
    count_rows: Callable[[], int],
    vocab: int | None,
    budget: int | None = None,
) -> StoreChoice:
    """The module's rule (``budget``: default ``REFERENCE_STORE_BUDGET``, read at the call).
    ``count_rows`` is called only when the size decides."""
    budget = REFERENCE_STORE_BUDGET if budget is None else budget
    if cache_reference is False:
        return StoreChoice(False, None, "cache_reference=False")
    if reference_top_k is not None:
        return StoreChoice(True, reference_top_k, f"top-{reference_top_k} store requested")
    if cache_reference is True:
        return StoreChoice(True, None, "exact store requested (cache_reference=True)")
    if positions != "response":
        return StoreChoice(
            False,
            None,
            "kl_positions='all' reads padding positions, whose reference depends on the "
            "batch's padding; pass cache_reference=True if every batch has the same length",
        )
    if vocab is None:
        return StoreChoice(False, None, "the model's vocabulary size is unknown")
    rows = count_rows()
    need = ReferenceStore.nbytes_for(rows, vocab)
    sizes = (
        f"{rows} rows x vocabulary {vocab}: {need / 2**20:.1f} MiB exact, "
        f"{ReferenceStore.nbytes_for(rows, vocab, top_k=64) / 2**20:.1f} MiB top-64"
    )
    if need <= budget:
        return StoreChoice(True, None, f"exact store fits {budget / 2**20:.0f} MiB ({sizes})")
    return StoreChoice(
        False,
        None,
        f"an exact store exceeds {budget / 2**20:.0f} MiB ({sizes}); pass reference_top_k=k "
        "or cache_reference=True",
    )


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter")


def store_is_rebuildable(model: nn.Module) -> bool:
    """Whether the starting model can be recovered later: a PEFT model whose trainable
    tensors are all adapters (LoRA factors, ``modules_to_save`` copies), so that disabling
    them gives back the starting weights. Otherwise the store goes into each checkpoint."""
    if not is_peft_model(model):
        return False
    return all(
        _is_lora_name(name) or "modules_to_save" in name.split(".")
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def starting_model_fn(model: nn.Module) -> Callable[[Mapping[str, Any]], Any]:
    """``model_fn`` for ``ReferenceStore.build``: the starting model, eval mode, no grad.

    Returns the head's ``(hidden, weight, bias)`` where ``fused_head`` supports the model,
    else the logits.
    """
    use_hidden = fused_head_unsupported(model) is None
    adapters_off = model.disable_adapter if is_peft_model(model) else contextlib.nullcontext

    def model_fn(batch: Mapping[str, Any]) -> Any:
        with torch.no_grad(), adapters_off(), _eval_mode(model):
            if use_hidden:
                head = hidden_states_and_head(model, batch)
                if head is not None:
                    return head
            return model(**model_inputs(batch)).logits

    return model_fn


def build_reference_store(
    model: nn.Module,
    batches: Batches,
    *,
    positions: Positions,
    top_k: int | None,
) -> ReferenceStore:
    """The store of ``batches`` (on the model's device) from the starting ``model``."""
    store = ReferenceStore.build(starting_model_fn(model), batches, positions, top_k)
    tail = f", reference tail mass max {store.tail_mass_max:.3g}" if top_k is not None else ""
    logger.info(
        "reference store: %d examples, %d rows, %.1f MiB on the host%s",
        len(store),
        store.num_rows,
        store.nbytes / 2**20,
        tail,
    )
    return store
