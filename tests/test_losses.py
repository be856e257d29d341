"""Response-token losses: KL (float64 reference, gradcheck, chunking, half precision, edge
cases), the response cross-entropy, reference logits and their cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_tiny_model import collate, tiny_llama, tiny_peft_model, toy_examples

from safegrad_kernels.losses import (
    ReferenceCache,
    kl_alignment_loss,
    reference_logits,
    response_ce,
    response_token_count,
)


def kl_reference(logits, ref, labels, positions, ignore_index=-100):
    """Direct float64 KL(P_ref || P_theta) with explicit shifted masks."""
    lp = logits.double().log_softmax(-1)
    lq = ref.double().log_softmax(-1)
    q = lq.exp()
    per_token = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)  # [B, T]
    if positions == "all":
        weights = torch.ones_like(per_token)
    else:
        weights = torch.zeros_like(per_token)
        weights[:, :-1] = (labels[:, 1:] != ignore_index).double()
    n = (labels[:, 1:] != ignore_index).sum()
    total = torch.where(weights > 0, per_token * weights, 0.0).sum()
    return total / n if n > 0 else total * 0


def make_batch(b, t, v, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(b, t, v) * scale).to(dtype)
    ref = (logits.double() + torch.randn(b, t, v)).to(dtype)
    labels = torch.randint(0, v, (b, t))
    labels[:, : max(1, t // 3)] = -100  # prompt
    labels[0, -2:] = -100  # right padding on one row
    if b > 1:
        labels[1, t // 2] = -100  # a hole
    return logits, ref, labels


SHAPES = [(1, 5, 7), (3, 7, 11), (2, 13, 37), (4, 9, 129)]


@pytest.mark.parametrize("positions", ["response", "all"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_direct(shape, positions):
    logits, ref, labels = make_batch(*shape)
    x = logits.clone().requires_grad_()
    loss = kl_alignment_loss(x, ref, labels, positions=positions, chunk_size=4)
    loss.backward()
    x64 = logits.double().requires_grad_()
    expected = kl_reference(x64, ref, labels, positions)
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_gradcheck(positions):
    logits, ref, labels = make_batch(2, 4, 5, dtype=torch.float64)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: kl_alignment_loss(z, ref, labels, positions=positions, chunk_size=3), (x,)
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 17, 1000])
def test_chunked_equals_unchunked(chunk_size):
    logits, ref, labels = make_batch(3, 11, 23)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    whole = kl_alignment_loss(x1, ref, labels, chunk_size=10**6)
    chunked = kl_alignment_loss(x2, ref, labels, chunk_size=chunk_size)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    # Per-row gradients do not depend on the chunking at all.
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_close_to_float64(dtype):
    """Error vs float64 at most 2x that of plain PyTorch computing in the same dtype."""
    logits, ref, labels = make_batch(3, 9, 67, dtype=dtype)
    x = logits.clone().requires_grad_()
    loss = kl_alignment_loss(x, ref, labels)
    loss.backward()
    assert x.grad.dtype == dtype
    x64 = logits.double().requires_grad_()
    expected = kl_reference(x64, ref, labels, "response")
    expected.backward()
    xp = logits.clone().requires_grad_()
    plain = kl_reference_same_dtype(xp, ref, labels)
    plain.backward()
    loss_err = (loss.double() - expected).abs().item()
    plain_err = (plain.double() - expected).abs().item()
    assert loss_err <= 2 * plain_err + 1e-5
    grad_err = (x.grad.double() - x64.grad).abs().max().item()
    plain_grad_err = (xp.grad.double() - x64.grad).abs().max().item()
    assert grad_err <= 2 * plain_grad_err + 1e-5


def kl_reference_same_dtype(logits, ref, labels):
    """What a plain PyTorch implementation computes when it stays in the input dtype."""
    lp = logits.log_softmax(-1)
    lq = ref.log_softmax(-1)
    per_token = (lq.exp() * (lq - lp)).sum(-1)
    weights = torch.zeros_like(per_token)
    weights[:, :-1] = labels[:, 1:] != -100
    return (per_token * weights).sum() / (labels[:, 1:] != -100).sum()


@pytest.mark.parametrize("positions", ["response", "all"])
def test_zero_response_tokens_gives_zero_loss_and_grad(positions):
    logits, ref, _ = make_batch(2, 6, 9)
    labels = torch.full((2, 6), -100)
    x = logits.clone().requires_grad_()
    loss = kl_alignment_loss(x, ref, labels, positions=positions)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_stable_for_large_logits_and_minus_inf_reference():
    logits, ref, labels = make_batch(2, 8, 19, scale=1e3)
    ref[0, :, :5] = float("-inf")  # the reference rules tokens out
    ref[1, 3, :] = -1e30  # very negative, not -inf
    x = logits.clone().requires_grad_()
    loss = kl_alignment_loss(x, ref, labels, positions="all")
    loss.backward()
    expected = kl_reference(logits, ref, labels, "all")
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_masked_rows_may_hold_nan_without_poisoning_the_loss():
    logits, ref, labels = make_batch(2, 7, 13)
    ref[0, -1, :] = float("-inf")  # last position: weight 0 in "response" mode -> NaN row
    x = logits.clone().requires_grad_()
    loss = kl_alignment_loss(x, ref, labels, positions="response")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_num_items_in_batch_sums_micro_batches():
    """Two halves normalised by the whole batch's count add up to the whole batch's loss."""
    logits, ref, labels = make_batch(4, 7, 11)
    n = response_token_count(labels)
    whole = kl_alignment_loss(logits, ref, labels)
    halves = sum(
        kl_alignment_loss(logits[s], ref[s], labels[s], num_items_in_batch=n)
        for s in (slice(0, 2), slice(2, 4))
    )
    torch.testing.assert_close(halves, whole)


def test_bad_arguments_raise():
    logits, ref, labels = make_batch(2, 5, 7)
    with pytest.raises(ValueError, match="positions"):
        kl_alignment_loss(logits, ref, labels, positions="prompt")
    with pytest.raises(ValueError, match="ref_logits shape"):
        kl_alignment_loss(logits, ref[:, :-1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        kl_alignment_loss(logits, ref, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        kl_alignment_loss(logits, ref, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        kl_alignment_loss(logits[0], ref[0], labels)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda x, ref, labels: kl_alignment_loss(x, ref, labels, chunk_size=5),
        lambda x, ref, labels: response_ce(
            x, labels, num_items_in_batch=response_token_count(labels), label_smoothing=0.1
        ),
    ],
    ids=["kl_alignment_loss", "response_ce"],
)
def test_no_host_sync(monkeypatch, loss_fn):
    """The loss and its backward never read a device value on the host."""
    logits, ref, labels = make_batch(2, 9, 13)
    x = logits.clone().requires_grad_()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the loss")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = loss_fn(x, ref, labels)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


# -- reference logits from the same PEFT model ------------------------------------------------


def test_reference_logits_disable_adapters_without_grad():
    model = tiny_peft_model(vocab=32, seed=5).train()
    batch = collate(toy_examples(3, vocab=32))
    base = tiny_llama(vocab=32, seed=5)  # the same weights, never wrapped
    ref = reference_logits(model, batch)
    assert not ref.requires_grad
    assert model.training  # mode restored
    with torch.no_grad():
        base_logits = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref, base_logits)
    assert not torch.allclose(adapted, base_logits)  # random B: the adapters matter


def test_reference_logits_needs_peft():
    with pytest.raises(TypeError, match="PeftModel"):
        reference_logits(tiny_llama(vocab=32), collate(toy_examples(2, vocab=32)))


@pytest.mark.parametrize("positions", ["response", "all"])
def test_reference_cache_hits_reproduce_the_forward(positions):
    model = tiny_peft_model(vocab=32)
    examples = toy_examples(4, vocab=32)
    cache = ReferenceCache(positions=positions)
    batch = collate(examples[:3])
    first = cache.get(model, batch, [0, 1, 2])
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 3)
    again = cache.get(model, batch, [0, 1, 2])
    assert cache.hits == 1 and cache.nbytes > 0
    labels = batch["labels"]
    x = torch.randn_like(first)
    torch.testing.assert_close(
        kl_alignment_loss(x, again, labels, positions=positions),
        kl_alignment_loss(x, first, labels, positions=positions),
    )
    # A different example under a cached index is recomputed, not served stale.
    changed = collate([examples[3], examples[1], examples[2]])
    cache.get(model, changed, [0, 1, 2])
    assert cache.misses == 2


def test_reference_cache_rejects_left_padding():
    batch = collate(toy_examples(2, vocab=32))
    batch["attention_mask"][0] = torch.roll(batch["attention_mask"][0], 1)
    batch["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        ReferenceCache().get(tiny_peft_model(vocab=32), batch, [0, 1])


# -- response cross-entropy ---------------------------------------------------------------------


def ce_reference(logits, labels, label_smoothing=0.0, ignore_index=-100):
    """Float64 next-token CE with smoothing, per response token, averaged (0 if none)."""
    lp = logits.double().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    keep = target != ignore_index
    nll = -lp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per_token = (1 - label_smoothing) * nll - label_smoothing * lp.mean(-1)
    n = keep.sum()
    return torch.where(keep, per_token, 0.0).sum() / n if n > 0 else per_token.sum() * 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.37])
@pytest.mark.parametrize("shape", SHAPES)
def test_response_ce_matches_float64(shape, label_smoothing):
    logits, _, labels = make_batch(*shape)
    got = response_ce(logits, labels, label_smoothing=label_smoothing)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), ce_reference(logits, labels, label_smoothing), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(3, 7, 11), (5, 13, 37), (16, 25, 200)])
def test_response_ce_gradient_is_bitwise_the_mean_over_shifted_logits(shape, label_smoothing):
    """Same gradient, bit for bit, as F.cross_entropy(logits[:, :-1], ...) (the demo's form)."""
    logits, _, labels = make_batch(*shape)
    x = logits.clone().requires_grad_()
    (ours,) = torch.autograd.grad(response_ce(x, labels, label_smoothing=label_smoothing), x)
    shifted_mean = F.cross_entropy(
        x[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
    (theirs,) = torch.autograd.grad(shifted_mean, x)
    assert torch.equal(ours, theirs)


def test_response_ce_num_items_in_batch_sums_micro_batches():
    logits, _, labels = make_batch(4, 9, 17)
    whole = response_ce(logits, labels)
    n = response_token_count(labels)
    parts = sum(
        response_ce(logits[s], labels[s], num_items_in_batch=n) for s in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_response_ce_half_logits(dtype):
    logits, _, labels = make_batch(3, 11, 29, dtype=dtype)
    x = logits.clone().requires_grad_()
    loss = response_ce(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ce_reference(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_response_ce_without_response_tokens_is_zero(label_smoothing):
    x = torch.randn(2, 6, 9, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[:, 0] = 4  # no position predicts the first token: still no response token
    loss = response_ce(x, labels, label_smoothing=label_smoothing)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
