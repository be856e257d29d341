"""Fused linear KL / cross-entropy: equal to their logits-path twins in value and gradient."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers_tiny_model import collate, tiny_llama, tiny_peft_model, toy_examples

from safegrad_kernels.fused_losses import (
    ReferenceLogProbs,
    chunk_rows_for_budget,
    fused_linear_cross_entropy,
    fused_linear_kl,
    kl_from_reference,
    loss_rows,
)
from safegrad_kernels.integrations.fused_head import (
    fused_head_unsupported,
    hidden_states_and_head,
    reference_hidden_states,
)
from safegrad_kernels.losses import (
    kl_alignment_loss,
    reference_logits,
    response_ce,
    response_token_count,
)

# (batch, seq, hidden, vocab): seq prime, vocab not a multiple of any chunk.
SHAPES = [(1, 7, 5, 11), (3, 13, 8, 37), (2, 17, 16, 129)]
# memory budgets: 1 byte -> one row a chunk; a few rows; everything in one chunk.
BUDGETS = [1, 3 * 24 * 129, None]


def make_case(b, t, h, v, dtype=torch.float32, bias=True):
    hidden = torch.randn(b, t, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 2).to(dtype)
    head_bias = (torch.randn(v) * 0.5).to(dtype) if bias else None
    ref_hidden = (hidden.double() + 0.5 * torch.randn(b, t, h)).to(dtype)
    labels = torch.randint(0, v, (b, t))
    labels[:, : max(1, t // 3)] = -100  # prompt
    labels[0, -3:] = -100  # right padding
    if b > 2:
        labels[1] = -100  # a row with no response at all
    return hidden, weight, head_bias, ref_hidden, labels


def leaves(*tensors, head_grad=True):
    out = []
    for i, x in enumerate(tensors):
        if x is None:
            out.append(None)
            continue
        x = x.detach().clone()
        out.append(x.requires_grad_(i == 0 or head_grad))
    return out


def grads(*tensors):
    return [None if x is None or x.grad is None else x.grad for x in tensors]


def logits_path_kl(hidden, weight, bias, ref_hidden, labels, positions, **kw):
    ref = F.linear(ref_hidden, weight.detach(), None if bias is None else bias.detach())
    return kl_alignment_loss(F.linear(hidden, weight, bias), ref, labels, positions=positions, **kw)


def logits_path_ce(hidden, weight, bias, labels, count=None):
    if count is None:
        count = response_token_count(labels)
    return response_ce(F.linear(hidden, weight, bias), labels, num_items_in_batch=count)


def run(fn, *args):
    loss = fn(*args)
    loss.backward()
    return loss.detach(), grads(*args[:3])


@pytest.mark.parametrize("head_grad", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("positions", ["response", "all"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_equals_logits_path_fp32(shape, positions, budget, head_grad):
    hidden, weight, bias, ref_hidden, labels = make_case(*shape)
    fused_args = leaves(hidden, weight, bias, head_grad=head_grad)
    plain_args = leaves(hidden, weight, bias, head_grad=head_grad)
    fused, fused_grads = run(
        lambda h, w, b: fused_linear_kl(
            h, w, labels, ref_hidden, bias=b, positions=positions, memory_budget=budget
        ),
        *fused_args,
    )
    plain, plain_grads = run(
        lambda h, w, b: logits_path_kl(h, w, b, ref_hidden, labels, positions), *plain_args
    )
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    for got, want in zip(fused_grads, plain_grads):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (fused_grads[1] is not None) == head_grad


@pytest.mark.parametrize("head_grad", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_equals_trainer_ce_fp32(shape, budget, head_grad):
    hidden, weight, bias, _, labels = make_case(*shape, bias=head_grad)
    fused, fused_grads = run(
        lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, memory_budget=budget),
        *leaves(hidden, weight, bias, head_grad=head_grad),
    )
    plain, plain_grads = run(
        lambda h, w, b: logits_path_ce(h, w, b, labels),
        *leaves(hidden, weight, bias, head_grad=head_grad),
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    for got, want in zip(fused_grads, plain_grads):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _max_err(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("loss", ["kl", "ce"])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_bf16_error_at_most_twice_the_logits_paths(shape, loss):
    """Both paths from the same bf16 inputs vs float64 from those inputs: the fused error is
    at most 2x the logits path's own, plus a floor of 1/8 bf16 ulp of the largest value."""
    hidden, weight, bias, ref_hidden, labels = make_case(*shape, dtype=torch.bfloat16)
    if loss == "kl":

        def fused_fn(h, w, b):
            return fused_linear_kl(h, w, labels, ref_hidden, bias=b, memory_budget=5 * 24 * 129)

        def plain_fn(h, w, b):
            return logits_path_kl(h, w, b, ref_hidden, labels, "response")

        def exact_fn(h, w, b):
            return logits_path_kl(h, w, b, ref_hidden.double(), labels, "response")
    else:

        def fused_fn(h, w, b):
            return fused_linear_cross_entropy(h, w, labels, bias=b, memory_budget=5 * 24 * 129)

        def plain_fn(h, w, b):
            return logits_path_ce(h, w, b, labels)

        def exact_fn(h, w, b):
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
            logits = F.linear(h, w, b).reshape(-1, w.shape[0])
            return F.cross_entropy(logits, shifted, reduction="sum") / response_token_count(labels)

    fused, fused_grads = run(fused_fn, *leaves(hidden, weight, bias))
    plain, plain_grads = run(plain_fn, *leaves(hidden, weight, bias))
    exact, exact_grads = run(exact_fn, *leaves(hidden.double(), weight.double(), bias.double()))
    assert fused_grads[0].dtype == torch.bfloat16 and fused_grads[1].dtype == torch.bfloat16
    for got, base, want in [(fused, plain, exact), *zip(fused_grads, plain_grads, exact_grads)]:
        floor = want.abs().max().item() * 2**-11
        assert _max_err(got, want) <= 2 * _max_err(base, want) + floor


@pytest.mark.parametrize("positions", ["response", "all"])
def test_gradcheck(positions):
    hidden, weight, bias, ref_hidden, labels = make_case(2, 5, 3, 7, dtype=torch.float64)
    args = tuple(leaves(hidden, weight, bias))
    # The reference goes through the same head but is a constant: perturbing the head would
    # move it too, so only the hidden states are checked here (the head's gradient is
    # gradchecked with stored references below).
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_kl(
            h, weight, labels, ref_hidden, bias=bias, positions=positions, memory_budget=2 * 28 * 7
        ),
        args[:1],
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, memory_budget=1), args
    )


def _topk_reference(ref_logits, labels, k, positions="response"):
    """A ReferenceLogProbs holding the top-k of ``ref_logits`` at the loss rows."""
    batch, seq, vocab = ref_logits.shape
    rows = loss_rows(labels, positions)
    log_q = ref_logits.reshape(-1, vocab).index_select(0, rows).log_softmax(-1)
    top, index = log_q.topk(k, dim=-1)
    tail = log_q.scatter(1, index, float("-inf")).logsumexp(-1)
    return ReferenceLogProbs(
        rows, batch, seq, vocab, positions, topk_logprobs=top, topk_index=index, tail_logmass=tail
    )


def test_gradcheck_topk_reference_both_paths():
    hidden, weight, bias, ref_hidden, labels = make_case(2, 5, 3, 9, dtype=torch.float64)
    ref = _topk_reference(F.linear(ref_hidden, weight, bias), labels, k=3)
    args = tuple(leaves(hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_kl(h, w, labels, ref, bias=b, memory_budget=1), args
    )
    logits = F.linear(hidden, weight, bias).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kl_from_reference(z, ref, labels), (logits,))


@pytest.mark.parametrize("k", [1, 4, 37])
def test_topk_fused_equals_topk_logits_path(k):
    hidden, weight, bias, ref_hidden, labels = make_case(3, 13, 8, 37)
    ref = _topk_reference(F.linear(ref_hidden, weight, bias), labels, k)
    fused, fused_grads = run(
        lambda h, w, b: fused_linear_kl(h, w, labels, ref, bias=b, memory_budget=24 * 37 * 4),
        *leaves(hidden, weight, bias),
    )
    plain, plain_grads = run(
        lambda h, w, b: kl_from_reference(F.linear(h, w, b), ref, labels),
        *leaves(hidden, weight, bias),
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if k == 37:  # the whole vocabulary: the exact KL
        exact = logits_path_kl(hidden, weight, bias, ref_hidden, labels, "response")
        torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_dense_stored_reference_equals_logits_path(positions):
    hidden, weight, bias, ref_hidden, labels = make_case(3, 11, 6, 29)
    batch, seq, _ = hidden.shape
    ref_logits = F.linear(ref_hidden, weight, bias)
    rows = loss_rows(labels, positions)
    log_q = ref_logits.reshape(-1, 29).index_select(0, rows).log_softmax(-1)
    ref = ReferenceLogProbs(rows, batch, seq, 29, positions, logprobs=log_q)
    want, want_grads = run(
        lambda h, w, b: logits_path_kl(h, w, b, ref_hidden, labels, positions),
        *leaves(hidden, weight, bias),
    )
    for fn in (
        lambda h, w, b: fused_linear_kl(h, w, labels, ref, bias=b, positions=positions),
        lambda h, w, b: kl_from_reference(F.linear(h, w, b), ref, labels, positions=positions),
        lambda h, w, b: kl_alignment_loss(
            F.linear(h, w, b), ref.dense(), labels, positions=positions
        ),
    ):
        got, got_grads = run(fn, *leaves(hidden, weight, bias))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_no_response_tokens_gives_zero_loss_and_grad(positions):
    hidden, weight, bias, ref_hidden, _ = make_case(2, 7, 4, 13)
    labels = torch.full((2, 7), -100)
    for fn in (
        lambda h, w, b: fused_linear_kl(h, w, labels, ref_hidden, bias=b, positions=positions),
        lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b),
    ):
        args = leaves(hidden, weight, bias)
        loss, got = run(fn, *args)
        assert loss.item() == 0.0
        for g in got:
            assert torch.equal(g, torch.zeros_like(g))


def test_num_items_in_batch_is_the_normaliser():
    hidden, weight, bias, ref_hidden, labels = make_case(3, 13, 8, 37)
    n = response_token_count(labels).item()
    whole = fused_linear_kl(hidden, weight, labels, ref_hidden, bias=bias)
    step = fused_linear_kl(hidden, weight, labels, ref_hidden, bias=bias, num_items_in_batch=3 * n)
    torch.testing.assert_close(step * 3, whole)
    ce = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(2 * n))
    torch.testing.assert_close(
        ce, logits_path_ce(hidden, weight, None, labels, torch.tensor(2 * n))
    )


def test_rows_from_host_labels_and_a_missing_row_is_caught():
    hidden, weight, _, ref_hidden, labels = make_case(3, 13, 8, 37)
    rows = loss_rows(labels)
    want = fused_linear_kl(hidden, weight, labels, ref_hidden)
    torch.testing.assert_close(fused_linear_kl(hidden, weight, labels, ref_hidden, rows=rows), want)
    extra = torch.cat([rows, torch.tensor([0, 1])]).sort().values  # prompt rows: weight 0
    torch.testing.assert_close(
        fused_linear_kl(hidden, weight, labels, ref_hidden, rows=extra), want
    )
    with pytest.raises(RuntimeError, match="rows miss"):
        fused_linear_cross_entropy(hidden, weight, labels, rows=rows[1:])


def test_no_host_sync_when_rows_are_given(monkeypatch, forbid_host_sync):
    hidden, weight, bias, ref_hidden, labels = make_case(3, 13, 8, 37)
    rows = loss_rows(labels)
    stored = _topk_reference(F.linear(ref_hidden, weight, bias), labels, k=5)
    h, w, b = leaves(hidden, weight, bias)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the hot path")

    # nonzero() is how rows would be found from the labels: a sync the guard does not cover.
    monkeypatch.setattr(torch.Tensor, "nonzero", forbidden)
    with forbid_host_sync():
        losses = [
            fused_linear_kl(h, w, labels, ref_hidden, bias=b, rows=rows, memory_budget=1 << 12),
            fused_linear_kl(h, w, labels, stored, bias=b, memory_budget=1 << 12),
            fused_linear_cross_entropy(h, w, labels, bias=b, rows=rows, memory_budget=1 << 12),
        ]
        sum(losses).backward()
    monkeypatch.undo()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_chunk_rows_follow_the_budget():
    assert chunk_rows_for_budget(128256, 4, 1) == 1
    big = chunk_rows_for_budget(128256, 4, 1 << 30)
    assert chunk_rows_for_budget(128256, 4, 1 << 28) < big
    assert chunk_rows_for_budget(128256, 2, 1 << 28) >= chunk_rows_for_budget(128256, 4, 1 << 28)
    with pytest.raises(ValueError, match="memory_budget"):
        chunk_rows_for_budget(10, 4, 0)


def test_bad_arguments_raise():
    hidden, weight, bias, ref_hidden, labels = make_case(2, 5, 4, 7)
    with pytest.raises(ValueError, match="positions"):
        fused_linear_kl(hidden, weight, labels, ref_hidden, positions="prompt")
    with pytest.raises(ValueError, match=r"weight must be \[vocab, 4\]"):
        fused_linear_kl(hidden, weight[:, :3], labels, ref_hidden)
    with pytest.raises(TypeError, match="share a floating dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels shape"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="reference hidden states"):
        fused_linear_kl(hidden, weight, labels, ref_hidden[:, :-1])
    with pytest.raises(TypeError, match="ReferenceLogProbs"):
        fused_linear_kl(hidden, weight, labels, "ref")
    ref = _topk_reference(F.linear(ref_hidden, weight), labels, 3)
    with pytest.raises(ValueError, match="positions='response'"):
        fused_linear_kl(hidden, weight, labels, ref, positions="all")
    with pytest.raises(ValueError, match="do not pass both"):
        fused_linear_kl(hidden, weight, labels, ref, rows=ref.rows)
    with pytest.raises(ValueError, match="no dense form"):
        ref.dense()
    with pytest.raises(ValueError, match="laid out for"):
        kl_from_reference(F.linear(hidden, weight)[:1], ref, labels[:1])


# -- hidden states from Hugging Face causal LMs ----------------------------------------------


def _batch(vocab=32, n=3, seed=0):
    return collate(toy_examples(n, vocab=vocab, seed=seed))


@pytest.mark.parametrize("peft", [False, True])
def test_hidden_states_from_hf_model_reproduce_the_logits_path(peft):
    model = (tiny_peft_model(vocab=32, seed=3) if peft else tiny_llama(vocab=32, seed=3)).train()
    batch = _batch()
    labels = batch["labels"]
    params = [p for p in model.parameters() if p.requires_grad]

    def param_grads(loss):
        return torch.autograd.grad(loss, params)

    out = hidden_states_and_head(model, batch)
    assert out is not None
    hidden, weight, bias = out
    assert hidden.shape == (*labels.shape, 32) and hidden.requires_grad
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    fused_ce = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    plain_ce = response_ce(logits, labels, num_items_in_batch=response_token_count(labels))
    torch.testing.assert_close(fused_ce, plain_ce, rtol=1e-5, atol=1e-7)
    for got, want in zip(param_grads(fused_ce), param_grads(plain_ce)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    if peft:  # the KL against the adapter-disabled reference, both ways
        ref_hidden, ref_weight, _ = reference_hidden_states(model, batch)
        assert not ref_hidden.requires_grad and model.training
        assert ref_weight is weight
        hidden, weight, bias = hidden_states_and_head(model, batch)
        logits = model(**inputs).logits
        fused_kl = fused_linear_kl(hidden, weight, labels, ref_hidden, bias=bias)
        plain_kl = kl_alignment_loss(logits, reference_logits(model, batch), labels)
        assert plain_kl.item() > 0
        torch.testing.assert_close(fused_kl, plain_kl, rtol=1e-5, atol=1e-7)
        for got, want in zip(param_grads(fused_kl), param_grads(plain_kl)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class _ScaledLogits(torch.nn.Module):
    """A causal LM whose forward rescales its head's output (as Cohere's logit_scale does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **inputs):
        out = self.inner(**inputs)
        out.logits = out.logits * 0.5
        return out


def test_unsupported_models_fall_back_with_a_logged_reason(caplog):
    batch = _batch()
    capped = tiny_llama(vocab=32)
    capped.config.final_logit_softcapping = 30.0
    lora_head = tiny_peft_model(vocab=32, target_modules=("q_proj", "lm_head"))
    cases = {
        "final_logit_softcapping": capped,
        "not a plain nn.Linear": lora_head,
        "after the head": _ScaledLogits(tiny_llama(vocab=32)),
        "no output embeddings": torch.nn.Linear(3, 3),
    }
    for reason, model in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="safegrad_kernels.integrations.fused_head"):
            assert hidden_states_and_head(model, batch) is None
        assert reason in caplog.text, (reason, caplog.text)
        assert reason in fused_head_unsupported(model)
    assert fused_head_unsupported(tiny_llama(vocab=32)) is None


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("head_grad", [False, True])
def test_never_materialises_the_token_by_vocab_logits(head_grad):
    batch, seq, hidden_size, vocab = 3, 31, 8, 1009
    hidden, weight, bias, ref_hidden, labels = make_case(batch, seq, hidden_size, vocab)
    budget = 4 * 24 * vocab  # 4 rows a chunk
    chunk = chunk_rows_for_budget(vocab, 4, budget)
    assert chunk == 4
    h, w, b = leaves(hidden, weight, bias, head_grad=head_grad)
    stored = _topk_reference(F.linear(ref_hidden, weight, bias), labels, k=16)
    with _LargestTensor() as probe:
        loss = (
            fused_linear_kl(h, w, labels, ref_hidden, bias=b, memory_budget=budget)
            + fused_linear_kl(h, w, labels, stored, bias=b, memory_budget=budget)
            + fused_linear_cross_entropy(h, w, labels, bias=b, memory_budget=budget)
        )
        loss.backward()
    # [chunk, V] blocks, and the head's own [V, H] gradient when it trains; never [B*T, V].
    assert probe.largest <= max(chunk * vocab, vocab * hidden_size)
    assert probe.largest < loss_rows(labels).numel() * vocab
