"""Fused linear losses: the alignment KL and the task cross-entropy from hidden states.

The logits path computes ``logits = hidden @ W.T + b`` for every token (``[B*T, V]``: 250 MiB
in fp32 for 2 x 256 tokens at Llama-3's vocabulary of 128,256, 5.3 GB at 10 x 1024) and
keeps them, their fp32 upcast and their gradient alive across the loss. Here the final
hidden states ``[B, T, H]`` and the LM head weight ``[V, H]`` go into one autograd Function
that walks the loss rows a chunk at a time: logits of the chunk, the loss, the gradient
w.r.t. the chunk's logits, and from it the gradients w.r.t. the hidden rows (``g @ W``) and,
when the head trains, w.r.t. ``W`` (``g.T @ h``, accumulated in fp32) and the bias. The
gradients are computed in the forward pass and stored (the idea of Liger-Kernel's fused
linear cross-entropy); backward only scales them by the incoming gradient. The largest
temporaries are a few fp32 ``[chunk, V]`` blocks sized by ``memory_budget``.

Only the rows the loss reads are computed: prompt and padding rows are skipped before the
matmul (``positions="all"`` reads every row). Finding them takes one ``nonzero`` on the
labels, a host synchronisation, unless the caller passes ``rows`` (``loss_rows`` on the
host-side labels) or the reference comes from a store (``ReferenceLogProbs.rows``).

Math and precision follow the logits-path twins exactly: ``losses.kl_alignment_loss``
(the label shift, ``positions``, the normaliser ``num_items_in_batch``, fp32 math) and the
trainer's causal cross-entropy (labels shifted, summed, divided by the count, 0 when the
count is 0). The matmuls run in the input dtype, as the model's ``lm_head`` does, so bf16
logits are rounded exactly as on the logits path; softmax, logs and sums run in fp32
(float64 inputs stay float64, for gradcheck). Each chunk's logit gradient is cast to the
head's dtype before ``g @ W``, as autograd does behind a bf16 ``lm_head``.

The reference side of the KL is either reference hidden states (the adapter-disabled
forward) pushed through the same head chunk by chunk, or stored reference log-probabilities
(``ReferenceLogProbs``, produced by ``reference_store.ReferenceStore``), dense or top-k with
the tail mass lumped into one bucket. ``kl_from_reference`` is the logits-path KL for the
same stored references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import Positions, _graph_is_freed_after_backward, _position_weights
from .losses import response_token_count as _response_token_count

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ReferenceLogProbs",
    "chunk_rows_for_budget",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "kl_from_reference",
    "loss_rows",
    "rows_without_sync",
]

# Bytes of one chunk's [rows, V] temporaries when memory_budget is None. Measured with
# benchmarks/kl_fused_memory.py (V = 128,256, fp32, 2 x 256 tokens, half of them prompt):
# the KL against reference hidden states peaks 191 MiB above its inputs at this budget (87
# rows a chunk), 61 MiB at 64 MiB (21 rows); the cross-entropy 95 and 30 MiB. The logits
# path needs 875 MiB (KL) and 760 MiB (CE) there. Each chunk re-reads the whole [V, H] head,
# so a GPU wants chunks of a few hundred rows to keep the matmul compute-bound (an estimate
# from flops / bandwidth, not measured): pass a larger budget there.
DEFAULT_MEMORY_BUDGET = 256 << 20

# Live [rows, V] blocks at the peak of one chunk: the logits (input dtype) and their fp32
# upcast, log p, the reference's fp32 log q, q, and the gradient cast to the head's dtype.
# An upper bound: measured peaks are 37-95% of the budget (numbers above).
_FP32_BLOCKS_PER_ROW = 5
_INPUT_BLOCKS_PER_ROW = 1


def chunk_rows_for_budget(vocab: int, itemsize: int, memory_budget: int | None = None) -> int:
    """Rows per chunk so that one chunk's ``[rows, vocab]`` temporaries fit the budget."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    per_row = max(vocab, 1) * (_FP32_BLOCKS_PER_ROW * 4 + _INPUT_BLOCKS_PER_ROW * itemsize)
    return max(1, budget // per_row)


# ----------------------------------------------------------------------------------------
# Stored references: what ReferenceStore.get hands to the KL.


@dataclass(frozen=True)
class ReferenceLogProbs:
    """Reference log-probabilities of one batch's loss rows.

    ``rows[i]`` is the flat row ``b * seq_len + t`` (position ``t`` of batch row ``b``)
    whose reference is entry ``i``; rows ascend. Either ``logprobs`` (``[N, V]``, dense) or
    the top-k triple is set: ``topk_logprobs`` ``[N, k]`` (fp32), ``topk_index`` ``[N, k]``
    (int64) and ``tail_logmass`` ``[N]`` = ``log(1 - sum(exp(topk_logprobs)))``, the log of
    the reference mass outside the top k. The error of the top-k KL is stated in
    ``reference_store``.
    """

    rows: Tensor
    batch_size: int
    seq_len: int
    vocab: int
    positions: Positions
    logprobs: Tensor | None = None
    topk_logprobs: Tensor | None = None
    topk_index: Tensor | None = None
    tail_logmass: Tensor | None = None

    def __post_init__(self) -> None:
        dense = self.logprobs is not None
        topk = (self.topk_logprobs, self.topk_index, self.tail_logmass)
        if dense == any(t is not None for t in topk) or (
            not dense and any(t is None for t in topk)
        ):
            raise ValueError("ReferenceLogProbs needs logprobs, or all three top-k tensors")
        n = self.rows.shape[0]
        shapes = [t.shape[0] for t in (self.logprobs, *topk) if t is not None]
        if any(s != n for s in shapes):
            raise ValueError(f"ReferenceLogProbs: {n} rows but tensors of {shapes} rows")

    @property
    def is_topk(self) -> bool:
        return self.logprobs is None

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ReferenceLogProbs:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            rows=move(self.rows),
            logprobs=move(self.logprobs),
            topk_logprobs=move(self.topk_logprobs),
            topk_index=move(self.topk_index),
            tail_logmass=move(self.tail_logmass),
        )

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[B, T, V]`` reference for ``losses.kl_alignment_loss``; unread rows hold 0.

        Dense stores only: a top-k reference has no full distribution to give.
        """
        if self.logprobs is None:
            raise ValueError("a top-k reference has no dense form; use kl_from_reference")
        values = self.logprobs if dtype is None else self.logprobs.to(dtype)
        out = values.new_zeros(self.batch_size * self.seq_len, self.vocab)
        out.index_copy_(0, self.rows, values)
        return out.view(self.batch_size, self.seq_len, self.vocab)


# ----------------------------------------------------------------------------------------
# Per-chunk loss math: fp32 logits of some rows in, per-row loss and logit gradient out.
#
# A row loss gets (start, end, z, row_scale): rows [start, end) of the loss rows, their
# logits z ([end - start, V], accumulation dtype, free to overwrite) and, when a gradient is
# wanted, row_scale = row weight x 1/count ([end - start]). It returns the per-row loss
# ([end - start]) and d(row_scale . per_row)/dz, or None when row_scale is None.

RowLoss = Callable[[int, int, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def _mask_rows_(grad: Tensor, row_scale: Tensor) -> Tensor:
    # Multiply by the row scale; a zero-weight row becomes exactly 0 even if it held NaN
    # (a padding row of an all -inf reference), as in kl_alignment_loss.
    scale = row_scale.unsqueeze(-1)
    return grad.mul_(scale).masked_fill_(scale == 0, 0.0)


class _DenseKL:
    """KL(softmax(ref) || softmax(z)) per row; ``ref_of(start, end)`` gives fp32 reference
    logits or log-probs of those rows (log_softmax renormalises either)."""

    def __init__(self, ref_of: Callable[[int, int], Tensor]) -> None:
        self.ref_of = ref_of

    def __call__(
        self, start: int, end: int, z: Tensor, row_scale: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        log_p = torch.log_softmax(z, dim=-1)
        del z
        log_q = torch.log_softmax(self.ref_of(start, end), dim=-1)
        q = log_q.exp()
        # q * (log q - log p) with 0 * anything = 0: a -inf reference token adds nothing.
        per_row = log_q.sub_(log_p).mul_(q).masked_fill_(q == 0, 0.0).sum(-1)
        del log_q
        if row_scale is None:
            return per_row, None
        return per_row, _mask_rows_(log_p.exp_().sub_(q), row_scale)


class _TopKKL:
    """KL of the coarsened distributions: the stored top-k tokens, plus the rest as one bucket.

    Per row, with K the stored tokens, q_K their reference probabilities, Q the reference
    tail mass and P = 1 - sum_K p the model's tail mass::

        L = sum_K q_k (log q_k - log p_k) + Q (log Q - log P)

    and dL/dz_j = S p_j - q_j [j in K] - Q p_j / P [j not in K], S = sum_K q_k + Q (1 up to
    the rounding of the stored values; kept so that the gradient is that of L exactly).
    log P is a logsumexp over the tail, not log(1 - sum_K p), which cancels to nothing when
    the top k hold all but 1e-7 of the mass.
    """

    def __init__(self, topk_logprobs: Tensor, topk_index: Tensor, tail_logmass: Tensor) -> None:
        self.topk_logprobs = topk_logprobs
        self.topk_index = topk_index
        self.tail_logmass = tail_logmass

    def __call__(
        self, start: int, end: int, z: Tensor, row_scale: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        acc = z.dtype
        idx = self.topk_index[start:end]
        log_qk = self.topk_logprobs[start:end].to(acc)
        log_qt = self.tail_logmass[start:end].to(acc)
        log_p = torch.log_softmax(z, dim=-1)
        del z
        log_pk = log_p.gather(1, idx)
        # The model's log tail mass, logsumexp over the tokens outside the top k.
        log_pt = torch.logsumexp(log_p.scatter(1, idx, float("-inf")), dim=-1)
        qk, qt = log_qk.exp(), log_qt.exp()
        head = torch.where(qk > 0, qk * (log_qk - log_pk), 0.0).sum(-1)
        tail = torch.where(qt > 0, qt * (log_qt - log_pt), 0.0)
        per_row = head + tail
        if row_scale is None:
            return per_row, None
        total = qk.sum(-1) + qt
        # Tail tokens: S p_j - Q p_j / P = p_j (S - Q / P), with p_j / P = exp(log p_j - log P).
        grad = log_p.exp_()
        tail_factor = total - torch.where(qt > 0, (log_qt - log_pt).exp(), 0.0)
        head_grad = grad.gather(1, idx).mul_(total.unsqueeze(-1)).sub_(qk)
        grad.mul_(tail_factor.unsqueeze(-1)).scatter_(1, idx, head_grad)
        return per_row, _mask_rows_(grad, row_scale)


class _CrossEntropy:
    """-log softmax(z)[target] per row; ``targets`` holds a valid class on every row."""

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets

    def __call__(
        self, start: int, end: int, z: Tensor, row_scale: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        target = self.targets[start:end].unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        per_row = (lse - z.gather(1, target)).squeeze(-1)
        if row_scale is None:
            return per_row, None
        grad = z.sub_(lse).exp_()  # softmax, in place of the logits
        grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
        return per_row, _mask_rows_(grad, row_scale)


def _run_chunks(
    n_rows: int,
    chunk_rows: int,
    logits_of: Callable[[int, int], Tensor],
    row_loss: RowLoss,
    row_weights: Tensor,
    scale: Tensor,
    consume_grad: Callable[[int, int, Tensor], None] | None,
) -> Tensor:
    """sum_rows w * row_loss * scale, chunk by chunk, handing each chunk's logit gradient
    (already scaled) to ``consume_grad``."""
    total = torch.zeros((), dtype=scale.dtype, device=scale.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        w = row_weights[start:end]
        row_scale = None if consume_grad is None else w * scale
        per_row, grad = row_loss(start, end, logits_of(start, end), row_scale)
        # where, not multiply: a zero-weight row may be NaN.
        total += torch.where(w != 0, per_row * w, 0.0).sum()
        if grad is not None:
            consume_grad(start, end, grad)
        del grad, per_row
    return total * scale


class _FusedLinearLoss(torch.autograd.Function):
    """loss(hidden_rows @ weight.T + bias) chunk by chunk, gradients computed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden_rows: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        row_weights: Tensor,
        scale: Tensor,
        chunk_rows: int,
        row_loss: RowLoss,
        needs: tuple[bool, bool, bool],
    ) -> Tensor:
        need_h, need_w, need_b = needs
        n_rows, hidden_size = hidden_rows.shape
        vocab = weight.shape[0]
        acc = scale.dtype
        grad_h = torch.empty_like(hidden_rows) if need_h else None
        # fp32 accumulators across chunks: summing bf16 partial products chunk by chunk
        # would add one bf16 rounding per chunk to the head's gradient.
        grad_w = weight.new_zeros((vocab, hidden_size), dtype=acc) if need_w else None
        grad_b = weight.new_zeros((vocab,), dtype=acc) if need_b else None

        def logits_of(start: int, end: int) -> Tensor:
            # In the input dtype, as the model's lm_head computes them; then fp32.
            return F.linear(hidden_rows[start:end], weight, bias).to(acc)

        def consume_grad(start: int, end: int, grad: Tensor) -> None:
            if grad_h is not None:
                torch.mm(grad.to(weight.dtype), weight, out=grad_h[start:end])
            if grad_w is not None:
                grad_w.addmm_(grad.T, hidden_rows[start:end].to(acc))
            if grad_b is not None:
                grad_b.add_(grad.sum(0))

        wanted = need_h or need_w or need_b
        loss = _run_chunks(
            n_rows,
            chunk_rows,
            logits_of,
            row_loss,
            row_weights,
            scale,
            consume_grad if wanted else None,
        )
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),  # type: ignore[union-attr]
        )
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        in_place = _graph_is_freed_after_backward()
        grads = []
        for g in ctx.saved_tensors:
            if g is None:
                grads.append(None)
                continue
            scale = grad_out.to(g.dtype)
            # The saved gradients die with the graph: scale them in place unless the graph
            # is retained (gradcheck), where they must survive for the next backward.
            grads.append(g.mul_(scale) if in_place else g * scale)
        return (*grads, None, None, None, None, None)


class _RowsLoss(torch.autograd.Function):
    """loss(logits[rows]) chunk by chunk; the gradient is ``logits``-shaped, 0 off ``rows``."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        rows: Tensor,
        row_weights: Tensor,
        scale: Tensor,
        chunk_rows: int,
        row_loss: RowLoss,
        need_grad: bool,
    ) -> Tensor:
        acc = scale.dtype
        grad = torch.zeros_like(logits) if need_grad else None

        def logits_of(start: int, end: int) -> Tensor:
            return logits.index_select(0, rows[start:end]).to(acc)

        def consume_grad(start: int, end: int, g: Tensor) -> None:
            grad.index_copy_(0, rows[start:end], g.to(grad.dtype))  # type: ignore[union-attr]

        loss = _run_chunks(
            rows.shape[0],
            chunk_rows,
            logits_of,
            row_loss,
            row_weights,
            scale,
            consume_grad if need_grad else None,
        )
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        scale = grad_out.to(grad.dtype)
        grad = grad.mul_(scale) if _graph_is_freed_after_backward() else grad * scale
        return grad, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Validation and the public functions.


def _check_positions(positions: str) -> None:
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")


def _check_labels(labels: Tensor, batch: int, seq: int, device: torch.device) -> None:
    if labels.shape != (batch, seq):
        raise ValueError(f"labels shape {tuple(labels.shape)} != [batch, seq] {(batch, seq)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, the loss inputs on {device}")


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, seq, hidden], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [vocab, {hidden.shape[-1]}], got shape {tuple(weight.shape)}"
        )
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and weight must share a floating dtype, got {hidden.dtype}, {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    if bias is not None and (
        bias.shape != (weight.shape[0],)
        or bias.dtype != weight.dtype
        or bias.device != weight.device
    ):
        raise ValueError(
            f"bias must be [{weight.shape[0]}] {weight.dtype} on {weight.device}, got "
            f"{tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )


def _check_reference(
    ref: ReferenceLogProbs, batch: int, seq: int, vocab: int, positions: str
) -> None:
    if (ref.batch_size, ref.seq_len) != (batch, seq):
        raise ValueError(
            f"reference was laid out for [{ref.batch_size}, {ref.seq_len}], the batch is "
            f"[{batch}, {seq}]"
        )
    if ref.vocab != vocab:
        raise ValueError(f"reference vocabulary {ref.vocab} != the head's {vocab}")
    if ref.positions != positions:
        raise ValueError(f"reference stored for positions={ref.positions!r}, loss {positions!r}")
    if positions == "all" and ref.rows.shape[0] != batch * seq:
        raise ValueError(
            f"positions='all' reads all {batch * seq} rows, the reference has {ref.rows.shape[0]}"
        )


def _scale(count: Tensor | int, device: torch.device, acc: torch.dtype) -> Tensor:
    count = torch.as_tensor(count, device=device).to(acc)
    # 1/n with response tokens, else 0: the loss and its gradient vanish, no NaN.
    return torch.where(count > 0, 1.0 / count.clamp_min(1.0), 0.0)


def loss_rows(
    labels: Tensor, positions: Positions = "response", ignore_index: int = -100
) -> Tensor:
    """Flat row indices ``b * T + t`` that the loss reads (int64, ascending).

    ``"response"``: positions whose next label counts (a ``nonzero``: one host sync for
    device labels); ``"all"``: every row. Run it on the host-side labels and pass the
    result as ``rows`` to keep the loss free of host syncs.
    """
    _check_positions(positions)
    if positions == "all":
        return torch.arange(labels.numel(), device=labels.device)
    weights = _position_weights(labels, positions, ignore_index).reshape(-1)
    return weights.nonzero().squeeze(-1)


def rows_without_sync(
    labels: Tensor, host_labels: Tensor | None, positions: Positions = "response"
) -> Tensor | None:
    """The ``rows`` argument for a fused loss that keeps it free of host syncs.

    With host-side labels, the exact rows (``loss_rows`` on them). With device labels
    alone, every row (rows that do not count weigh 0), since finding them there would
    sync; ``None`` for CPU labels, where the loss finds them itself at no such cost.
    """
    if host_labels is not None:
        return loss_rows(host_labels, positions)
    if labels.device.type == "cpu":
        return None
    return torch.arange(labels.numel(), device=labels.device)


def _prepare(
    labels: Tensor,
    positions: Positions,
    ignore_index: int,
    rows: Tensor | None,
    acc: torch.dtype,
    num_items_in_batch: Tensor | int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss rows, their weights (0 or 1) and the scale 1/count."""
    if rows is None:
        rows = loss_rows(labels, positions, ignore_index)
        row_weights = torch.ones(rows.shape[0], dtype=acc, device=labels.device)
    else:
        rows = rows.to(labels.device, torch.long, non_blocking=True)
        weights = _position_weights(labels, positions, ignore_index, acc).reshape(-1)
        row_weights = weights.index_select(0, rows)
        # The rows must cover every row that counts (extra rows weigh 0). Checked on the
        # device, so no host sync on CUDA.
        torch._assert_async(
            row_weights.sum() == weights.sum(), "rows miss some of the positions the loss reads"
        )
    if num_items_in_batch is None:
        num_items_in_batch = _response_token_count(labels, ignore_index=ignore_index)
    return rows, row_weights, _scale(num_items_in_batch, labels.device, acc)


def _gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, rows)


def _fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    row_weights: Tensor,
    scale: Tensor,
    row_loss: RowLoss,
    memory_budget: int | None,
) -> Tensor:
    """``row_loss`` of ``hidden[rows] @ weight.T + bias``, in chunks that fit the budget."""
    # Known only out here: Function.forward runs with grad mode off.
    on = torch.is_grad_enabled()
    needs = (
        on and hidden.requires_grad,
        on and weight.requires_grad,
        on and bias is not None and bias.requires_grad,
    )
    chunk_rows = chunk_rows_for_budget(weight.shape[0], hidden.element_size(), memory_budget)
    return _FusedLinearLoss.apply(
        _gather_rows(hidden, rows), weight, bias, row_weights, scale, chunk_rows, row_loss, needs
    )


def _stored_row_loss(ref: ReferenceLogProbs, acc: torch.dtype) -> RowLoss:
    if ref.is_topk:
        return _TopKKL(ref.topk_logprobs, ref.topk_index.long(), ref.tail_logmass)  # type: ignore[arg-type,union-attr]
    dense = ref.logprobs
    return _DenseKL(lambda s, e: dense[s:e].to(acc))  # type: ignore[index]


def fused_linear_kl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    reference: Tensor | ReferenceLogProbs,
    *,
    bias: Tensor | None = None,
    positions: Positions = "response",
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
    rows: Tensor | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """``kl_alignment_loss(hidden @ weight.T + bias, ref_logits, labels)`` without the logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states of the model being trained (the input of
            its LM head: after the final norm).
        weight, bias: the LM head, ``[V, H]`` and ``[V]`` or None, in ``hidden``'s dtype.
            Gradients flow to each that requires grad.
        labels: ``[B, T]`` causal-LM labels, ``ignore_index`` on prompt and padding.
        reference: either the reference hidden states ``[B, T, H]`` (e.g. the
            adapter-disabled forward; a constant, pushed through the same head), or
            ``ReferenceLogProbs`` from a ``ReferenceStore`` (then ``rows`` comes from it).
            With a trainable head, the same head is the current one, not the starting
            one: use stored references there.
        positions, ignore_index, num_items_in_batch: as in ``kl_alignment_loss``.
        rows: optional flat indices of the rows to compute (``loss_rows``), e.g. from the
            host-side labels, to avoid the host sync of finding them on the device. Must
            cover every row the loss reads (checked on the device).
        memory_budget: bytes for one chunk's ``[rows, V]`` temporaries
            (``DEFAULT_MEMORY_BUDGET`` when None).

    Returns a float32 scalar (float64 for float64 inputs); 0 with gradient 0 when there are
    no response tokens.
    """
    _check_positions(positions)
    _check_head(hidden, weight, bias)
    batch, seq, _ = hidden.shape
    vocab = weight.shape[0]
    _check_labels(labels, batch, seq, hidden.device)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if isinstance(reference, ReferenceLogProbs):
        _check_reference(reference, batch, seq, vocab, positions)
        if rows is not None:
            raise ValueError("rows come from the stored reference; do not pass both")
        if reference.device != hidden.device:
            raise ValueError(f"reference is on {reference.device}, hidden on {hidden.device}")
        rows = reference.rows
    elif isinstance(reference, Tensor):
        if reference.shape != hidden.shape or reference.dtype != hidden.dtype:
            raise ValueError(
                f"reference hidden states {tuple(reference.shape)} {reference.dtype} must "
                f"match hidden {tuple(hidden.shape)} {hidden.dtype}"
            )
        if reference.device != hidden.device:
            raise ValueError(f"reference is on {reference.device}, hidden on {hidden.device}")
    else:
        raise TypeError(
            f"reference must be hidden states or ReferenceLogProbs, got {type(reference).__name__}"
        )

    rows, row_weights, scale = _prepare(
        labels, positions, ignore_index, rows, acc, num_items_in_batch
    )
    if isinstance(reference, ReferenceLogProbs):
        row_loss = _stored_row_loss(reference, acc)
    else:
        ref_rows = _gather_rows(reference.detach(), rows)
        head_w, head_b = weight.detach(), None if bias is None else bias.detach()
        row_loss = _DenseKL(lambda s, e: F.linear(ref_rows[s:e], head_w, head_b).to(acc))
    return _fused_linear_loss(
        hidden, weight, bias, rows, row_weights, scale, row_loss, memory_budget
    )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
    rows: Tensor | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T + bias``, summed / count, no logits.

    The label at ``t + 1`` is the target of row ``t`` (labels shifted, not logits); rows
    whose target is ``ignore_index`` are skipped. The count is ``num_items_in_batch``, by
    default the number of targets in ``labels`` (``response_token_count``); 0 when it is 0.
    Arguments as in ``fused_linear_kl``.
    """
    _check_head(hidden, weight, bias)
    batch, seq, _ = hidden.shape
    _check_labels(labels, batch, seq, hidden.device)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    rows, row_weights, scale = _prepare(
        labels, "response", ignore_index, rows, acc, num_items_in_batch
    )
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1).index_select(0, rows)
    # Extra rows (weight 0) may carry ignore_index: any valid class keeps gather in range.
    targets = torch.where(targets == ignore_index, 0, targets)
    return _fused_linear_loss(
        hidden, weight, bias, rows, row_weights, scale, _CrossEntropy(targets), memory_budget
    )


def kl_from_reference(
    logits: Tensor,
    reference: ReferenceLogProbs,
    labels: Tensor,
    *,
    positions: Positions = "response",
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """The logits-path KL against stored references (dense or top-k), rows of ``reference``.

    For a dense reference this equals ``kl_alignment_loss(logits, reference.dense(),
    labels)`` without materialising the ``[B, T, V]`` reference; the gradient is
    ``logits``-shaped and in ``logits.dtype``.
    """
    _check_positions(positions)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not isinstance(reference, ReferenceLogProbs):
        raise TypeError(f"reference must be ReferenceLogProbs, got {type(reference).__name__}")
    batch, seq, vocab = logits.shape
    _check_labels(labels, batch, seq, logits.device)
    _check_reference(reference, batch, seq, vocab, positions)
    if reference.device != logits.device:
        raise ValueError(f"reference is on {reference.device}, logits on {logits.device}")
    acc = torch.promote_types(logits.dtype, torch.float32)
    rows, row_weights, scale = _prepare(
        labels, positions, ignore_index, reference.rows, acc, num_items_in_batch
    )
    return _RowsLoss.apply(
        logits.reshape(batch * seq, vocab),
        rows,
        row_weights,
        scale,
        chunk_rows_for_budget(vocab, logits.element_size(), memory_budget),
        _stored_row_loss(reference, acc),
        logits.requires_grad and torch.is_grad_enabled(),
    )
