"""Response-token losses: cross-entropy, the chunked KL(P_ref || P_theta), reference logits.

SafeGrad's alignment objective (BACKGROUND.md) keeps the fine-tuned model close to the
aligned starting model on a small alignment set::

    L_align = sum_{positions, vocab} P_ref * (log P_ref - log P_theta) / (#response tokens)

Positions follow Hugging Face's causal-LM convention: the logits at position ``t`` predict
``labels[:, t + 1]``. So ``positions="response"`` weights position ``t`` by
``labels[:, t + 1] != ignore_index`` (the last position predicts nothing), and the
normaliser, in both modes, is ``(labels[:, 1:] != ignore_index).sum()``: the number of
tokens the cross-entropy loss of the same batch would average over. ``positions="all"``
sums over every position of every row, prompt, padding and the last token included, as the
authors' public trainer does (``F.kl_div(..., reduction="sum")`` on the full logits).

Memory: a direct implementation upcasts ``[B, T, V]`` logits to fp32 and keeps several
fp32 ``[B, T, V]`` temporaries alive for backward (log-probs of both sides, the ref
probabilities, their product). Here the work is done ``chunk_size`` rows at a time and
the gradient w.r.t. the logits is produced in the same pass (in the logits' dtype, the
tensor autograd would materialise anyway), so the extra memory is the gradient plus a few
fp32 ``chunk x V`` blocks, independent of batch x sequence.

``response_ce`` is the next-token cross-entropy with the same convention and normaliser
(the task loss, and SPF's safe-answer loss).

Reference logits for a PEFT model come from the same model with its adapters disabled
(``reference_logits``); ``ReferenceCache`` keeps them on the host for a fixed alignment
set so that repeated epochs skip the no-grad reference forward (deprecated:
``reference_store.ReferenceStore``, which ``SafeGradTrainer`` uses, computes everything
before the first step, stores log-probabilities exactly or as top-k and survives a resume).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ReferenceCache",
    "kl_alignment_loss",
    "model_inputs",
    "reference_logits",
    "response_ce",
    "response_token_count",
]

Positions = Literal["response", "all"]

# Rows per chunk when chunk_size is None: about 4M logits, so each fp32 temporary is
# ~16 MiB (32 rows at Llama-3's 128,256-token vocabulary), small next to any model's
# activations while keeping kernel launches per chunk amortised.
_CHUNK_ELEMENTS = 1 << 22


def response_token_count(labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Number of predicted tokens in ``labels`` (shifted causal convention), int64 scalar.

    This is the normaliser of ``kl_alignment_loss``. Sum it over the micro-batches of one
    optimizer step and pass it as ``num_items_in_batch`` to normalise over the whole step.
    """
    return (labels[:, 1:] != ignore_index).sum()


def response_ce(
    logits: Tensor,
    labels: Tensor,
    *,
    num_items_in_batch: Tensor | int | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Next-token cross-entropy summed over the response tokens / their number.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts ``labels[:, t + 1]``.
        labels: ``[B, T]``, ``ignore_index`` on prompt and padding.
        num_items_in_batch: the normaliser, e.g. the response tokens of all micro-batches
            of one optimizer step; default ``response_token_count(labels)``.
        label_smoothing: as ``F.cross_entropy``'s (the demo's alignment stage uses 0.1).

    Returns:
        A float32 scalar; 0 (with a zero gradient) when there are no response tokens.

    The labels are shifted, not the logits: slicing ``logits[:, :-1]`` would copy the
    ``[B, T, V]`` logits (the last position gets ``ignore_index`` instead). Measured on
    fp32 ``[4, 512, 32000]``, one thread, forward + backward: 0.6-0.9 s against 1.7 s
    for the slicing form, the same peak RSS (~755 MiB above the inputs). The terms
    are the ones ``F.cross_entropy(..., reduction="mean")`` composes, scaled in its order,
    so that with the default normaliser the gradient is bitwise that of the mean over
    ``logits[:, :-1]`` (the demo's published numbers came from that form).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)
    log_p = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    if num_items_in_batch is None:
        count = response_token_count(labels, ignore_index=ignore_index)
    else:
        count = torch.as_tensor(num_items_in_batch)
    count = count.to(log_p.device, torch.float32)
    n = count.clamp_min(1.0)
    loss = F.nll_loss(log_p, shifted, ignore_index=ignore_index, reduction="sum") / n
    if label_smoothing:
        # Uniform-target term: sum over the vocabulary of -log p, on response positions.
        smooth = (-log_p.sum(-1)).masked_fill_(shifted == ignore_index, 0.0).sum() / n
        loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / log_p.shape[-1])
    return torch.where(count > 0, loss, 0.0)


def _position_weights(
    labels: Tensor, positions: Positions, ignore_index: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[B, T]`` weight per logit row: 1 where the row counts, 0 where it does not."""
    if positions == "all":
        return torch.ones(labels.shape, dtype=dtype, device=labels.device)
    weights = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    weights[:, :-1] = labels[:, 1:] != ignore_index
    return weights


class _ChunkedKL(torch.autograd.Function):
    """sum_rows w_row * KL(softmax(ref_row) || softmax(logit_row)) * scale, chunk by chunk.

    The gradient d/dlogits = w * scale * (softmax(logits) - softmax(ref)) is computed in the
    forward pass (one read of the inputs instead of two) and kept in the logits' dtype.
    ``ref`` is a constant: no gradient flows to it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        ref: Tensor,
        weights: Tensor,
        scale: Tensor,
        chunk_rows: int,
        need_grad: bool,
    ) -> Tensor:
        n_rows = logits.shape[0]
        grad = torch.empty_like(logits) if need_grad else None
        acc = scale.dtype  # float32, or float64 for float64 logits (gradcheck)
        total = torch.zeros((), dtype=acc, device=logits.device)
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            # In-place steps keep ~4 fp32 [chunk, V] blocks alive: measured peak 128 MiB
            # above the gradient at 131-row chunks of V = 32000, 172 MiB out of place.
            log_p = torch.log_softmax(logits[start:end].to(acc), dim=-1)
            log_q = torch.log_softmax(ref[start:end].to(acc), dim=-1)
            q = log_q.exp()
            # q * (log q - log p) with 0 * anything = 0, so a reference that puts -inf on a
            # token (q = 0) contributes nothing instead of 0 * (-inf - x) = NaN.
            per_token = log_q.sub_(log_p).mul_(q).masked_fill_(q == 0, 0.0)
            w = weights[start:end]
            # where, not multiply: a masked row may be NaN (e.g. an all -inf padding row).
            total += torch.where(w != 0, per_token.sum(-1) * w, 0.0).sum()
            del per_token, log_q
            if grad is not None:
                row_scale = (w * scale).unsqueeze(-1)
                g = log_p.exp_().sub_(q).mul_(row_scale).masked_fill_(row_scale == 0, 0.0)
                grad[start:end].copy_(g)
        if grad is not None:
            ctx.save_for_backward(grad)
        # --- issue 12: the reported KL is never negative ---------------------------------
        # The exact KL is >= 0; summed in fp32 over near-identical distributions (a LoRA
        # model just off its reference) it can round to e.g. -3.8e-8. Clamp the value only:
        # the gradient above is the exact one, whatever the rounding of the sum.
        total = total.clamp_min(0.0)
        # --- end issue 12 ------------------------------------------------------------------
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        grad_out = grad_out.to(grad.dtype)
        if _graph_is_freed_after_backward():
            # The saved gradient dies with the graph: scale it in place rather than holding
            # a second [rows, V] buffer (250 MiB at bf16 [8, 512, 32000]).
            return grad.mul_(grad_out), None, None, None, None, None
        # retain_graph=True (e.g. gradcheck): the saved gradient must survive for reuse.
        return grad * grad_out, None, None, None, None, None


def _graph_is_freed_after_backward() -> bool:
    # Private autograd query (torch >= 2.1); answer "kept" (the safe side) if it is missing.
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return query is not None and not query()


def kl_alignment_loss(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    *,
    positions: Positions = "response",
    chunk_size: int | None = None,
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """KL(P_ref || P_theta) summed over positions and vocabulary / number of response tokens.

    Args:
        logits: ``[B, T, V]`` logits of the model being trained (fp32, bf16 or fp16; the math
            runs in fp32 and the gradient comes back in ``logits.dtype``).
        ref_logits: ``[B, T, V]`` reference logits (or log-probs), same shape; a constant.
        labels: ``[B, T]`` causal-LM labels, ``ignore_index`` on prompt and padding.
        positions: ``"response"`` sums over the positions that predict a label;
            ``"all"`` over every position (the authors' trainer). Both divide by the
            number of response tokens.
        chunk_size: rows (tokens) processed at a time; ``None`` picks ~4M logits per chunk.
        num_items_in_batch: overrides the normaliser, e.g. the response-token count of all
            micro-batches of one optimizer step (``response_token_count``).

    Returns:
        A float32 scalar (float64 for float64 logits), clamped at 0: a negative sum is fp32
        rounding (about -4e-8 next to the reference), not a KL. With zero response tokens
        the loss is 0 and its gradient is 0.

    No host synchronisation: masked positions are computed and weighted by zero rather than
    selected (selecting needs their count on the host); the softmax work is ~1/400 of the
    lm_head matmul that produced the logits at hidden size 4096.

    Peak memory above the inputs, forward + backward, bf16 logits with grad, measured on CPU
    (peak RSS, ``benchmarks/kl_memory.py``): ``[8, 512, 32000]`` (250 MiB of logits):
    378-433 MiB over 5 runs, 250 of which is the gradient itself, vs 2,504 MiB for the
    direct fp32 ``F.kl_div(log_softmax(x.float()), softmax(ref.float()), reduction="sum")``;
    ``[4, 1024, 128256]`` (1,002 MiB): 1,161 MiB vs 10,024 MiB.
    """
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(
            f"ref_logits shape {tuple(ref_logits.shape)} != logits shape {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits[:2] {tuple(logits.shape[:2])}"
        )
    if not (logits.is_floating_point() and ref_logits.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {logits.dtype}, {ref_logits.dtype}")
    if ref_logits.device != logits.device or labels.device != logits.device:
        raise ValueError(
            f"logits ({logits.device}), ref_logits ({ref_logits.device}) and labels "
            f"({labels.device}) must share a device"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    batch, seq, vocab = logits.shape
    n_rows = batch * seq
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    chunk_size = min(chunk_size, max(n_rows, 1))

    if num_items_in_batch is None:
        count = response_token_count(labels, ignore_index=ignore_index)
    else:
        count = torch.as_tensor(num_items_in_batch, device=logits.device)
    # fp32 math for half inputs; float64 inputs keep float64 (gradcheck, references).
    acc = torch.promote_types(logits.dtype, torch.float32)
    count = count.to(device=logits.device, dtype=acc)
    # 1/n when there are response tokens, else 0: the loss and its gradient vanish, no NaN.
    scale = torch.where(count > 0, 1.0 / count.clamp_min(1.0), 0.0)

    weights = _position_weights(labels, positions, ignore_index, acc).reshape(n_rows)
    return _ChunkedKL.apply(
        logits.reshape(n_rows, vocab),
        ref_logits.detach().reshape(n_rows, vocab),
        weights,
        scale,
        chunk_size,
        # Known only out here (Function.forward runs with grad mode off): no gradient
        # buffer under no_grad / inference, e.g. when evaluating the alignment loss.
        logits.requires_grad and torch.is_grad_enabled(),
    )


# ----------------------------------------------------------------------------------------
# Reference logits: the same PEFT model with its adapters disabled.


def _require_peft(model: nn.Module) -> nn.Module:
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"reference logits need a peft.PeftModel (adapters disabled = the reference "
            f"model, no second copy); got {type(model).__name__}"
        )
    return model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # The reference is the frozen starting model, evaluated without dropout, as the
    # authors' separately loaded reference (from_pretrained returns eval mode) was.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Batch entries a Hugging Face causal LM must not receive as keyword arguments here:
# ``labels`` would make it compute its own loss.
_NON_MODEL_KEYS = ("labels", "num_items_in_batch")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without the entries that are not model inputs (``labels``, ...)."""
    return {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}


def reference_logits(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Logits of ``model`` with its LoRA adapters disabled, in eval mode, without autograd.

    ``model`` is a ``peft.PeftModel``; ``batch`` holds the model inputs (``labels`` is
    dropped so no loss is computed). No second copy of the model exists at any time.
    """
    peft_model = _require_peft(model)
    with torch.no_grad(), peft_model.disable_adapter(), _eval_mode(peft_model):
        return peft_model(**model_inputs(batch)).logits


class ReferenceCache:
    """Reference logits of a fixed alignment set, kept on the host, keyed by example index.

    Deprecated: kept importable for existing code; ``SafeGradTrainer`` no longer uses it.
    Prefer ``reference_store.ReferenceStore`` (built once before the first step from the
    starting model, so it also serves full fine-tuning; exact fp32 or top-k with a stated
    error bound; ``state_dict`` for resume).

    Pays off when the same alignment examples are visited many times (SafeGrad's 10-100
    alignment examples cycle every few steps): a hit replaces the no-grad reference forward
    (~1/3 of the alignment step's compute) with a host-to-device copy of the cached rows.

    What is stored per example: with ``positions="response"`` only the rows that the loss
    reads (positions ``t`` with ``labels[t + 1] != ignore_index``), in the logits' own dtype,
    so a hit returns exactly what the forward returned. Host memory is
    ``sum_i n_resp_i * V * itemsize``: 100 examples x 40 response tokens x 128,256 vocab x
    2 B (bf16) = 1.03 GB. With ``positions="all"`` every position of the padded row is
    stored (the loss reads them all): ``T`` times more, usually too much for a large
    vocabulary; prefer ``"response"``.

    Requirements: right padding (or none), and the model must not change between calls
    except through its adapters (the reference has them disabled). A hit is checked against
    the stored token ids; a changed example is recomputed and replaced.
    """

    def __init__(
        self,
        *,
        positions: Positions = "response",
        ignore_index: int = -100,
        pin_memory: bool = False,
    ) -> None:
        if positions not in ("response", "all"):
            raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
        self.positions = positions
        self.ignore_index = ignore_index
        self.pin_memory = pin_memory
        # index -> (token ids the entry was computed for, row positions, rows [n, V])
        self._entries: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the cached logits."""
        return sum(rows.numel() * rows.element_size() for _, _, rows in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def _key_rows(self, input_ids: Tensor, labels: Tensor, mask: Tensor | None) -> list[Tensor]:
        """Per example, the ids and labels an entry must match (unpadded for "response")."""
        keys = []
        for b, (ids, lab) in enumerate(zip(input_ids, labels)):
            length = ids.shape[0]
            if self.positions == "response" and mask is not None:
                length = int(mask[b].sum())
                if not bool(mask[b, :length].all()):
                    raise ValueError(
                        "ReferenceCache needs right-padded batches (attention_mask 1...1 0...0)"
                    )
            keys.append(torch.cat([ids[:length], lab[:length]]))
        return keys

    def _row_positions(self, labels: Tensor) -> list[Tensor]:
        if self.positions == "all":
            return [torch.arange(labels.shape[1]) for _ in range(labels.shape[0])]
        weights = _position_weights(labels, "response", self.ignore_index)
        return [row.nonzero().squeeze(-1) for row in weights]

    def get(self, model: nn.Module, batch: Mapping[str, Any], indices: Sequence[int]) -> Tensor:
        """Reference logits ``[B, T, V]`` for ``batch``; rows the loss never reads are 0.

        ``indices[b]`` is the dataset index of row ``b``. Misses run one reference forward
        for the whole batch and are stored. This path reads labels and ids on the host
        (one small transfer per batch), unlike the rest of the training step.
        """
        labels = batch["labels"]
        labels_cpu = labels.cpu()
        mask = batch.get("attention_mask")
        keys = self._key_rows(
            batch["input_ids"].cpu(), labels_cpu, None if mask is None else mask.cpu()
        )
        if len(indices) != len(keys):
            raise ValueError(f"{len(indices)} indices for a batch of {len(keys)} rows")
        cached = [self._entries.get(int(i)) for i in indices]
        hit = all(
            e is not None and e[0].shape == k.shape and torch.equal(e[0], k)
            for e, k in zip(cached, keys)
        )
        if not hit:
            self.misses += 1
            ref = reference_logits(model, batch)
            positions = self._row_positions(labels_cpu)
            for b, (i, key, pos) in enumerate(zip(indices, keys, positions)):
                rows = ref[b, pos.to(ref.device)].cpu()
                if self.pin_memory:
                    rows = rows.pin_memory()
                self._entries[int(i)] = (key.clone(), pos, rows)
            return ref
        self.hits += 1
        batch_size, seq = labels.shape
        vocab = cached[0][2].shape[-1]
        ref = torch.zeros((batch_size, seq, vocab), dtype=cached[0][2].dtype, device=labels.device)
        for b, (_, pos, rows) in enumerate(cached):
            ref[b, pos.to(labels.device)] = rows.to(labels.device, non_blocking=True)
        return ref
