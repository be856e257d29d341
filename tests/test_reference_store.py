"""ReferenceStore: exact stores reproduce the live reference; quantised and top-k stores
stay within their stated error bounds; state_dict round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_tiny_model import collate, tiny_peft_model, toy_examples

from safegrad_kernels.fused_losses import fused_linear_kl, kl_from_reference, loss_rows
from safegrad_kernels.integrations.fused_head import (
    hidden_states_and_head,
    reference_hidden_states,
)
from safegrad_kernels.losses import kl_alignment_loss, reference_logits, response_token_count
from safegrad_kernels.reference_store import ReferenceStore

VOCAB = 32


def pad_to(batch, seq):
    """Right-pad a collated batch to ``seq`` positions (pad id 0, label -100, mask 0)."""
    extra = seq - batch["labels"].shape[1]
    values = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: F.pad(v, (0, extra), value=values[k]) for k, v in batch.items()}


def alignment_set(n=7):
    examples = toy_examples(n, vocab=VOCAB, seed=4)
    examples[2]["labels"][:] = -100  # an example without a response
    return examples


def build_batches(examples, size=3):
    for start in range(0, len(examples), size):
        indices = list(range(start, min(start + size, len(examples))))
        yield indices, collate([examples[i] for i in indices])


@pytest.mark.parametrize("source", ["logits", "hidden"])
@pytest.mark.parametrize("positions", ["response", "all"])
def test_exact_store_reproduces_the_live_reference(positions, source):
    model = tiny_peft_model(vocab=VOCAB, seed=2).train()
    examples = alignment_set()

    def model_fn(batch):
        if source == "logits":
            return reference_logits(model, batch)
        return reference_hidden_states(model, batch)

    store = ReferenceStore.build(model_fn, build_batches(examples), positions)
    assert len(store) == len(examples)
    assert store.nbytes == ReferenceStore.nbytes_for(store.num_rows, VOCAB)
    # A batch composed differently from the build, longer for "response" (more padding).
    indices = [5, 2, 0, 6]
    batch = collate([examples[i] for i in indices])
    if positions == "response":
        batch = pad_to(batch, 15)
    labels = batch["labels"]
    ref = store.get(indices, labels=labels)
    live = reference_logits(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    params = [p for p in model.parameters() if p.requires_grad]

    def value_and_grads(loss):
        return loss.detach(), torch.autograd.grad(loss, params)

    want = value_and_grads(
        kl_alignment_loss(model(**inputs).logits, live, labels, positions=positions)
    )
    hidden, weight, bias = hidden_states_and_head(model, batch)
    candidates = [
        kl_from_reference(model(**inputs).logits, ref, labels, positions=positions),
        kl_alignment_loss(model(**inputs).logits, ref.dense(), labels, positions=positions),
        fused_linear_kl(hidden, weight, labels, ref, bias=bias, positions=positions),
    ]
    for loss in candidates:
        got = value_and_grads(loss)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def synthetic_store(logits, labels, **kw):
    """A store over single-batch 'model' outputs ``logits`` (fixed tensors)."""
    batch = {"labels": labels}
    return ReferenceStore.build(lambda b: logits, [(list(range(labels.shape[0])), batch)], **kw)


def distributions(kind, rows, vocab):
    if kind == "random":
        return torch.randn(rows, vocab)
    # peaked: a Zipf-like ranking, shuffled per row, plus noise
    zipf = -1.5 * torch.arange(1, vocab + 1).log()
    return torch.stack([zipf[torch.randperm(vocab)] for _ in range(rows)]) + 0.3 * torch.randn(
        rows, vocab
    )


def make_pair(kind, batch=3, seq=11, vocab=257):
    ref = distributions(kind, batch * seq, vocab).view(batch, seq, vocab) * 2
    model = ref + 0.7 * torch.randn_like(ref)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, :3] = -100
    labels[0, -2:] = -100
    return ref, model, labels


def per_row_logit_grads(loss_fn, logits):
    x = logits.clone().requires_grad_()
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), x.grad.reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_topk_error_within_the_stated_bound(kind, k):
    ref, model, labels = make_pair(kind)
    vocab = ref.shape[-1]
    store = synthetic_store(ref, labels, top_k=k)
    assert store.nbytes == ReferenceStore.nbytes_for(store.num_rows, vocab, top_k=k)
    stored = store.get(range(labels.shape[0]))
    exact, exact_grad = per_row_logit_grads(lambda z: kl_alignment_loss(z, ref, labels), model)
    approx, approx_grad = per_row_logit_grads(lambda z: kl_from_reference(z, stored, labels), model)

    rows = stored.rows
    scale = 1.0 / response_token_count(labels).item()
    log_p = model.reshape(-1, vocab)[rows].double().log_softmax(-1)
    tail_q = stored.tail_logmass.double().exp()  # Q per row
    in_tail = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, stored.topk_index, False)
    log_tail_p = torch.where(in_tail, log_p, -math.inf).logsumexp(-1)  # log P
    min_tail_log_p = torch.where(in_tail, log_p, math.inf).min(-1).values
    loss_bound = scale * (tail_q * (log_tail_p - min_tail_log_p)).sum()
    gap = (exact.double() - approx.double()).item()
    slack = 1e-6 * exact.abs().item()  # fp32 rounding of the two losses
    assert -slack <= gap <= loss_bound.item() + slack
    delta = (exact_grad[rows] - approx_grad[rows]).double()
    l1_bound = 2 * tail_q * scale
    assert (delta.abs().sum(-1) <= l1_bound + 1e-6).all()
    assert (delta.norm(dim=-1) <= math.sqrt(2) * tail_q * scale + 1e-6).all()
    # Off the loss rows the gradient is exactly 0 on both paths.
    off = torch.ones(exact_grad.shape[0], dtype=torch.bool)
    off[rows] = False
    assert not approx_grad[off].any()
    assert store.tail_mass_max == pytest.approx(tail_q.max().item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_topk_hidden_gradient_within_the_stated_bound(kind):
    batch, seq, hidden_size, vocab = 2, 7, 12, 129
    hidden = torch.randn(batch, seq, hidden_size)
    weight = torch.randn(vocab, hidden_size) * (1.0 if kind == "random" else 3.0)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, :2] = -100
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    store = ReferenceStore.build(
        lambda b: (ref_hidden, weight, None), [([0, 1], {"labels": labels})], top_k=5
    )
    stored = store.get([0, 1])
    h1 = hidden.clone().requires_grad_()
    fused_linear_kl(h1, weight, labels, ref_hidden).backward()
    h2 = hidden.clone().requires_grad_()
    fused_linear_kl(h2, weight, labels, stored).backward()
    scale = 1.0 / response_token_count(labels).item()
    sigma = torch.linalg.matrix_norm(weight, ord=2).item()
    delta = (h1.grad - h2.grad).reshape(-1, hidden_size)[stored.rows].norm(dim=-1)
    bound = math.sqrt(2) * stored.tail_logmass.exp() * sigma * scale
    assert (delta <= bound + 1e-6).all()


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL_HALF_SPACING = {torch.bfloat16: 0.0, torch.float16: 2.0**-25}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_half_precision_store_within_the_stated_bound(kind, dtype):
    ref, model, labels = make_pair(kind)
    vocab = ref.shape[-1]
    store = synthetic_store(ref, labels, dtype=dtype)
    stored = store.get(range(labels.shape[0]))
    assert stored.logprobs.dtype == dtype
    assert store.nbytes == ReferenceStore.nbytes_for(store.num_rows, vocab, dtype=dtype)
    rows = stored.rows
    scale = 1.0 / response_token_count(labels).item()
    exact, exact_grad = per_row_logit_grads(lambda z: kl_alignment_loss(z, ref, labels), model)
    approx, approx_grad = per_row_logit_grads(lambda z: kl_from_reference(z, stored, labels), model)

    log_q = ref.reshape(-1, vocab)[rows].double().log_softmax(-1)
    log_p = model.reshape(-1, vocab)[rows].double().log_softmax(-1)
    q = log_q.exp()
    d = UNIT_ROUNDOFF[dtype] * log_q.abs() + SUBNORMAL_HALF_SPACING[dtype]
    c = (q * d.exp()).sum(-1, keepdim=True).log()
    grad_bound = (2 * c.squeeze(-1)).exp() - 1
    row_bound = (
        (q * ((d + c).exp() - 1) * (log_q - log_p).abs()).sum(-1)
        + c.squeeze(-1).exp() * (q * d.exp() * d).sum(-1)
        + c.squeeze(-1)
    )
    slack = 2e-6 * exact.abs().item()
    assert abs(exact.item() - approx.item()) <= scale * row_bound.sum().item() + slack
    delta = (exact_grad[rows] - approx_grad[rows]).double().abs().sum(-1)
    assert (delta <= scale * grad_bound + 1e-6).all()
    # The gradient bound is ~2 u H(q) (module docstring): at least that (Jensen), and
    # within 10% above it at these entropies (0.3-4.4 nats).
    first_order = 2 * UNIT_ROUNDOFF[dtype] * -(q * log_q).sum(-1)
    assert (grad_bound >= first_order).all()
    assert (grad_bound <= 1.1 * first_order + 1e-6).all()


@pytest.mark.parametrize("top_k", [None, 6])
def test_state_dict_round_trip(top_k):
    ref, _, labels = make_pair("peaked", vocab=41)
    store = synthetic_store(ref, labels, top_k=top_k)
    buffer = io.BytesIO()
    torch.save(store.state_dict(), buffer)
    buffer.seek(0)
    restored = ReferenceStore()
    restored.load_state_dict(torch.load(buffer))
    assert (restored.top_k, restored.vocab, len(restored)) == (top_k, 41, len(store))
    a, b = store.get([2, 0]), restored.get([2, 0])
    for name in ("rows", "logprobs", "topk_logprobs", "topk_index", "tail_logmass"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y)
    bad = store.state_dict()
    bad["offsets"] = bad["offsets"][:-1]
    with pytest.raises(ValueError, match="offsets"):
        restored.load_state_dict(bad)


def test_get_validates_and_lays_out_rows():
    ref, _, labels = make_pair("random", vocab=23)
    store = synthetic_store(ref, labels)
    seq = labels.shape[1]
    got = store.get([1, 0], seq_len=seq + 4)
    # Batch row 0 is example 1 (its positions), row 1 is example 0 (positions + T).
    want = torch.cat([loss_rows(labels[1:2]), loss_rows(labels[0:1]) + seq + 4])
    assert torch.equal(got.rows, want)
    assert (got.batch_size, got.seq_len) == (2, seq + 4)
    with pytest.raises(KeyError, match="not in the reference store"):
        store.get([7])
    changed = labels[:2].clone()
    changed[0, 5] = -100
    with pytest.raises(ValueError, match="changed"):
        store.get([0, 1], labels=changed)
    with pytest.raises(ValueError, match="beyond a batch"):
        store.get([0], seq_len=5)
    all_store = synthetic_store(ref, labels, positions="all")
    with pytest.raises(ValueError, match="built with length"):
        all_store.get([0], seq_len=seq + 1)
    with pytest.raises(ValueError, match="top-k values are stored in float32"):
        ReferenceStore(top_k=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="twice"):
        ReferenceStore.build(lambda b: ref, [([0, 0, 1], {"labels": labels})])


def test_size_for_the_llama3_vocabulary():
    rows, vocab = 100 * 1024, 128256
    exact = ReferenceStore.nbytes_for(rows, vocab)
    assert exact == rows * (4 * vocab + 4)
    assert ReferenceStore.nbytes_for(rows, vocab, dtype=torch.bfloat16) == rows * (2 * vocab + 4)
    assert ReferenceStore.nbytes_for(rows, vocab, top_k=64) == rows * (8 * 64 + 4 + 4)
