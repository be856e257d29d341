"""SafeGradTrainer's reference store and fused losses: full fine-tuning with the KL and no
second model, resume of the store, and fused_loss=True equal to the logits path."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from helpers_tiny_model import collate, tiny_llama, tiny_peft_model, toy_examples
from test_trainer import CaptureGrads, assert_grads_close, make_trainer
from transformers import Trainer

import safegrad_kernels.integrations.reference as reference_module
import safegrad_kernels.integrations.trainer as trainer_module
from safegrad_kernels.integrations import SafeGradTrainer
from safegrad_kernels.integrations.reference import choose_store
from safegrad_kernels.integrations.trainer import REFERENCE_STORE_FILE
from safegrad_kernels.losses import kl_alignment_loss
from safegrad_kernels.reference_store import ReferenceStore


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_store(a: ReferenceStore, b: ReferenceStore) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


# -- the default rule ---------------------------------------------------------------------------


def test_default_rule_follows_the_budget_and_positions():
    rows, vocab = 100 * 1024, 128256
    counted = []

    def count():
        counted.append(1)
        return rows

    choice = choose_store(None, None, positions="response", count_rows=count, vocab=vocab)
    exact, topk = (ReferenceStore.nbytes_for(rows, vocab, top_k=k) / 2**20 for k in (None, 64))
    assert not choice.on and "exceeds 1024 MiB" in choice.reason
    assert f"{exact:.1f} MiB exact" in choice.reason and f"{topk:.1f} MiB top-64" in choice.reason
    assert round(exact * 2**20 / 1e9, 1) == 52.5 and round(topk * 2**20 / 1e6) == 53  # docs
    small = choose_store(None, None, positions="response", count_rows=lambda: 4000, vocab=32000)
    assert small.on and small.top_k is None  # 4000 x (4 x 32000 + 4) B = 488 MiB
    assert not choose_store(None, None, positions="all", count_rows=count, vocab=64).on
    assert choose_store(True, None, positions="all", count_rows=count, vocab=64).on
    topk = choose_store(None, 64, positions="response", count_rows=count, vocab=vocab)
    assert topk.on and topk.top_k == 64
    assert not choose_store(False, None, positions="response", count_rows=count, vocab=64).on
    assert len(counted) == 1  # only the size-decided case counts rows


def test_plain_model_refused_when_the_default_store_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(reference_module, "REFERENCE_STORE_BUDGET", 1000)
    with pytest.raises(TypeError, match=r"exceeds.*reference_top_k=k"):
        make_trainer(tmp_path, model=tiny_llama())
    peft = make_trainer(tmp_path)  # a PEFT model falls back to the live reference
    assert not peft.reference_choice.on
    assert make_trainer(tmp_path, model=tiny_llama(), reference_top_k=8).reference_choice.on


# -- full fine-tuning without a second model ----------------------------------------------------


def frozen_copy_safegrad(model, reference, rho):
    """SafeGrad's update of ``model`` with an explicit frozen ``reference`` model."""
    params = [p for p in model.parameters() if p.requires_grad]
    task = collate(toy_examples(4, seed=0))
    align = collate(toy_examples(4, seed=1))
    g_u = torch.autograd.grad(model(**task).loss, params)
    inputs = {k: v for k, v in align.items() if k != "labels"}
    with torch.no_grad():
        ref = reference(**inputs).logits
    kl = kl_alignment_loss(model(**inputs).logits, ref, align["labels"])
    g_a = torch.autograd.grad(kl, params)
    dot = sum((u.double() * a.double()).sum() for u, a in zip(g_u, g_a))
    nsq = sum((a.double() ** 2).sum() for a in g_a)
    coef = min(float(dot), 0.0) / float(nsq)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, [u - coef * a + rho * a for u, a in zip(g_u, g_a)])), float(dot)


@pytest.mark.parametrize("fused", [False, True])
def test_full_fine_tuning_step_equals_a_frozen_reference_copy(tmp_path, fused):
    """A plain model, all weights trainable, no second copy: the store of the start."""
    rho = 0.7
    model = tiny_llama(seed=4)
    reference = copy.deepcopy(model).eval()  # the explicit frozen reference, for the check
    cap = CaptureGrads()
    trainer = make_trainer(
        tmp_path,
        model=model,
        rho=rho,
        callbacks=[cap],
        fused_loss=fused,
        args_kw={"learning_rate": 0.5},  # far enough from the start for a clear KL gradient
    )
    trainer.train()  # step 1 builds the store from the start, then moves the weights
    assert trainer.reference_choice.on and trainer._fused_loss is fused
    # At the start model == reference, so the KL gradient vanishes: the step worth checking
    # is a later one. A second train() call steps on from the moved weights.
    expected, dot = frozen_copy_safegrad(copy.deepcopy(model), reference, rho)
    assert dot < 0, "fixture seeds chosen so that the gradients conflict"
    trainer.train()
    assert len(cap.grads[1]) == len(list(model.parameters()))  # every weight trains
    assert_grads_close(cap.grads[1], expected, rtol=1e-4, atol=1e-8)


def test_full_fine_tuning_store_comes_from_the_starting_weights(tmp_path):
    """After training the model has moved; the store still holds the start's reference."""
    model = tiny_llama(seed=2)
    start = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model=model, steps=3, n_train=12)
    trainer.train()
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
    assert moved
    batches = list(trainer._reference_batches())
    rebuilt = ReferenceStore.build(reference_module.starting_model_fn(start), batches)
    assert_same_store(trainer.reference_store, rebuilt)


# -- resume -------------------------------------------------------------------------------------


def resume_pair(tmp_path, make_model, **kw):
    """An uninterrupted 3-step run saving at every step, and a fresh trainer to resume it."""
    args = {"save_strategy": "steps", "save_steps": 1}
    first = make_trainer(
        tmp_path / "a", model=make_model(), steps=3, n_train=12, args_kw=args, **kw
    )
    first.train()
    checkpoint = os.path.join(tmp_path / "a", "checkpoint-1")
    return first, checkpoint


def test_full_fine_tuning_resume_reloads_the_saved_store(tmp_path):
    first, checkpoint = resume_pair(tmp_path, lambda: tiny_llama(seed=2))
    assert os.path.isfile(os.path.join(checkpoint, REFERENCE_STORE_FILE))
    # The resumed trainer never sees the starting weights: a different model object whose
    # weights the checkpoint overwrites; the store can only come from the checkpoint.
    other = tiny_llama(seed=9)
    resumed = make_trainer(tmp_path / "b", model=other, steps=3, n_train=12)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert_same_store(first.reference_store, resumed.reference_store)
    for name, value in trainable(first.model).items():
        torch.testing.assert_close(trainable(other)[name], value, rtol=1e-6, atol=1e-8)

    os.remove(os.path.join(checkpoint, REFERENCE_STORE_FILE))
    again = make_trainer(tmp_path / "c", model=tiny_llama(seed=9), steps=3, n_train=12)
    with pytest.raises(RuntimeError, match="cannot be rebuilt"):
        again.train(resume_from_checkpoint=checkpoint)


@pytest.mark.parametrize("top_k", [None, 5])
def test_peft_resume_rebuilds_the_same_store(tmp_path, top_k):
    first, checkpoint = resume_pair(tmp_path, tiny_peft_model, reference_top_k=top_k)
    assert not os.path.exists(os.path.join(checkpoint, REFERENCE_STORE_FILE))
    model = tiny_peft_model()
    resumed = make_trainer(tmp_path / "b", model=model, steps=3, n_train=12, reference_top_k=top_k)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.reference_store.top_k == top_k
    assert_same_store(first.reference_store, resumed.reference_store)
    for name, value in trainable(first.model).items():
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-6, atol=1e-8)


def test_peft_with_trainable_base_tensors_saves_the_store(tmp_path):
    def model():
        m = tiny_peft_model()
        m.base_model.model.model.norm.weight.requires_grad_(True)  # not an adapter
        return m

    _, checkpoint = resume_pair(tmp_path, model)
    assert os.path.isfile(os.path.join(checkpoint, REFERENCE_STORE_FILE))


def test_topk_store_trains_within_its_bound(tmp_path):
    """A top-k store with k = V keeps everything (tail mass 0): the exact store's updates."""
    runs = []
    for top_k in (None, 64):
        cap = CaptureGrads()
        trainer = make_trainer(tmp_path, steps=2, n_train=8, callbacks=[cap], reference_top_k=top_k)
        trainer.train()
        runs.append(cap.grads)
    assert trainer.reference_store.top_k == 64 and trainer.reference_store.tail_mass_max == 0.0
    for exact, topk in zip(*runs):
        assert_grads_close(exact, topk, rtol=1e-5, atol=1e-8)


# -- fused_loss=True ----------------------------------------------------------------------------


FUSED_CASES = {
    "safegrad-peft-store": dict(method="safegrad", model=tiny_peft_model),
    "safegrad-peft-live": dict(method="safegrad", model=tiny_peft_model, cache_reference=False),
    "safegrad-peft-top8": dict(method="safegrad", model=tiny_peft_model, reference_top_k=8),
    "safegrad-full": dict(method="safegrad", model=tiny_llama),
    "mixed-ce": dict(method="mixed", model=tiny_peft_model, alignment_loss="ce", lam=0.6),
    "sft-peft": dict(method="sft", model=tiny_peft_model, n_align=0),
    "sft-full-mean": dict(method="sft", model=tiny_llama, n_align=0, loss_kwargs=False),
}


def fused_run(tmp_path, fused, monkeypatch, case):
    kw = dict(FUSED_CASES[case])
    make_model, loss_kwargs = kw.pop("model"), kw.pop("loss_kwargs", True)
    calls = []
    for name in ("fused_linear_kl", "fused_linear_cross_entropy"):
        original = getattr(trainer_module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer_module, name, counted)
    model = make_model()
    trainer = make_trainer(
        tmp_path, model=model, batch=2, accum=2, steps=3, n_train=12, fused_loss=fused, **kw
    )
    # False: the model's loss is the micro-batch mean, and the Trainer divides by the
    # accumulation steps (the path of models without loss kwargs).
    trainer.model_accepts_loss_kwargs = loss_kwargs
    trainer.train()
    monkeypatch.undo()
    return trainer, trainable(model), calls


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_loss_gives_the_same_weights(tmp_path, monkeypatch, case):
    _, plain, plain_calls = fused_run(tmp_path, False, monkeypatch, case)
    trainer, fused, calls = fused_run(tmp_path, True, monkeypatch, case)
    assert not plain_calls and trainer._fused_loss and trainer._fused_task_loss
    # 3 steps x 2 micro-batches: the task loss on each, the alignment loss on each.
    method, alignment = FUSED_CASES[case]["method"], FUSED_CASES[case].get("alignment_loss")
    kl = 6 if method == "safegrad" else 0
    ce = 6 + (6 if alignment == "ce" else 0)
    assert (calls.count("fused_linear_kl"), calls.count("fused_linear_cross_entropy")) == (kl, ce)
    for name, value in plain.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_loss_falls_back_with_a_logged_reason(tmp_path, caplog):
    """A LoRA head (refused before any forward) and a head whose output is transformed
    (refused by the output check of the first forward) both train on the logits path."""

    def scaled_head():
        model = tiny_peft_model()
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * 0.5)
        return model

    cases = {
        "not a plain nn.Linear": lambda: tiny_peft_model(target_modules=("q_proj", "lm_head")),
        "a transform after the head": scaled_head,
    }
    for reason, make_model in cases.items():
        weights = []
        for fused in (False, True):
            caplog.clear()
            model = make_model()
            with caplog.at_level(logging.WARNING):
                trainer = make_trainer(tmp_path, model=model, steps=2, n_train=8, fused_loss=fused)
                trainer.train()
            weights.append(trainable(model))
        assert reason in caplog.text and "logits path" in caplog.text, caplog.text
        assert not trainer._fused_loss
        for name, value in weights[0].items():
            assert torch.equal(weights[1][name], value), name


class _OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class _Mixed(SafeGradTrainer, _OwnLoss):
    """As ``class SafeSFTTrainer(SafeGradTrainer, SFTTrainer)``: another class's task loss."""


def test_fused_task_loss_defers_to_a_subclass_compute_loss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        mixed = _Mixed(
            model=tiny_peft_model(),
            args=make_trainer(tmp_path).args,
            train_dataset=toy_examples(4),
            data_collator=collate,
            alignment_dataset=toy_examples(4, seed=1),
            fused_loss=True,
        )
    assert mixed._fused_loss and not mixed._fused_task_loss
    assert "_OwnLoss.compute_loss computes it" in caplog.text


def test_fused_loss_under_bf16_autocast_matches_the_logits_path(tmp_path):
    """Under accelerate's bf16 autocast the head multiplies in bf16 on both paths."""
    logs = []
    for fused in (False, True):
        trainer = make_trainer(
            tmp_path, batch=2, accum=2, steps=2, n_train=8, fused_loss=fused, args_kw={"bf16": True}
        )
        trainer.train()
        assert trainer._fused_loss is fused
        logs.append(
            [(h["loss"], h["align_loss"]) for h in trainer.state.log_history if "loss" in h]
        )
    torch.testing.assert_close(torch.tensor(logs[1]), torch.tensor(logs[0]), rtol=1e-3, atol=1e-6)
