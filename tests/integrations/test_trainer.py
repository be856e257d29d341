"""PEFT helpers and SafeGradTrainer on a tiny Llama + LoRA (built from a config, CPU)."""

from __future__ import annotations

import copy
import gc
import logging
import math
import sys
import warnings

import pytest
import torch
import transformers
from helpers_tiny_model import (
    collate,
    tiny_llama,
    tiny_peft_model,
    tiny_training_args,
    toy_examples,
    toy_trainer_data,
)
from transformers import TrainerCallback, TrainingArguments

from safegrad_kernels.integrations import SafeGradTrainer, lora_parameters, named_lora_parameters
from safegrad_kernels.losses import kl_alignment_loss, reference_logits

# -- lora_parameters ------------------------------------------------------------------------


def test_lora_parameters_are_exactly_the_adapter_factors():
    model = tiny_peft_model(vocab=32, target_modules=("q_proj", "v_proj", "down_proj"))
    names = [n for n, _ in named_lora_parameters(model)]
    expected = {
        f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.default.weight"
        for i in range(2)
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for ab in "AB"
    }
    assert set(names) == expected and len(names) == len(expected)
    params = lora_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in params] == [id(p) for p in trainable]


def test_lora_parameters_skip_non_lora_trainables_and_frozen_adapters():
    model = tiny_peft_model(vocab=32)
    model.base_model.model.lm_head.weight.requires_grad_(True)  # trainable, not LoRA
    assert all("lora_" in n for n, _ in named_lora_parameters(model))
    for _, p in named_lora_parameters(model):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA parameter"):
        lora_parameters(model)
    with pytest.raises(ValueError, match="no trainable LoRA parameter"):
        lora_parameters(tiny_llama(vocab=32))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        lora_parameters(object())


# -- trainer helpers -------------------------------------------------------------------------


class CaptureGrads(TrainerCallback):
    """Records the gradients handed to the optimizer (after clipping) and live parameters."""

    def __init__(self, count_live: bool = False):
        self.count_live = count_live
        self.grads: list[dict[str, torch.Tensor]] = []
        self.live_numel: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
        if self.count_live:
            self.live_numel.append(live_parameter_numel())


def live_parameter_numel() -> int:
    """Elements of every parameter owned by any live nn.Module in the process."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def make_trainer(
    tmp_path,
    method="safegrad",
    *,
    model=None,
    batch=4,
    accum=1,
    steps=1,
    n_train=4,
    n_align=4,
    callbacks=(),
    args_kw=None,
    **kw,
):
    settings = tiny_training_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
    )
    return SafeGradTrainer(
        model=model if model is not None else tiny_peft_model(),
        args=TrainingArguments(**{**settings, **(args_kw or {})}),
        **{**toy_trainer_data(n_train, n_align), **kw},
        method=method,
        callbacks=list(callbacks),
    )


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_grads_close(a, b, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# -- runs, logs --------------------------------------------------------------------------------

SAFEGRAD_KEYS = {"surgery/conflict_rate", "surgery/cosine", "surgery/coef", "align_loss"}
SPF_KEYS = {"surgery/conflict_fraction", "surgery/applied_fraction", "surgery/removed_energy"}


@pytest.mark.parametrize("method", ["sft", "safegrad", "spf", "mixed"])
def test_each_method_trains_and_logs(tmp_path, method):
    trainer = make_trainer(tmp_path, method, batch=2, accum=2, steps=2, n_train=8)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2
    for log in logs:
        assert all(math.isfinite(v) for v in log.values() if isinstance(v, float))
    keys = set(logs[0])
    if method == "sft":
        assert not any(k.startswith("surgery/") or k == "align_loss" for k in keys)
    elif method == "safegrad":
        assert keys >= SAFEGRAD_KEYS
        assert all(0.0 <= log["surgery/conflict_rate"] <= 1.0 for log in logs)
    elif method == "spf":
        assert keys >= SPF_KEYS and "align_loss" in keys
        # The basis is computed once (refresh_every=None): no alignment pass in step 2.
        assert "align_loss" not in logs[1] and set(logs[1]) >= SPF_KEYS
    else:
        assert "align_loss" in keys and not any(k.startswith("surgery/") for k in keys)


# -- gradient accumulation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "positions"), [("safegrad", "all"), ("spf", "response"), ("mixed", "response")]
)
def test_accumulation_equals_one_large_batch(tmp_path, method, positions):
    """2 micro-batches of 2 hand the optimizer the same gradient as 1 batch of 4."""
    grads = []
    for batch, accum in ((2, 2), (4, 1)):
        cap = CaptureGrads()
        trainer = make_trainer(
            tmp_path,
            method,
            batch=batch,
            accum=accum,
            callbacks=[cap],
            kl_positions=positions,
            lam=0.7,
        )
        trainer.train()
        grads.append(cap.grads[0])
    assert_grads_close(grads[0], grads[1])


# -- the update by hand, and the order of clipping and surgery ---------------------------------


def hand_safegrad(model):
    """g_u, g_a from plain autograd on the whole train / alignment sets; then the formula."""
    params = [p for p in model.parameters() if p.requires_grad]
    task = collate(toy_examples(4, seed=0))
    align = collate(toy_examples(4, seed=1))
    model.train()
    g_u = torch.autograd.grad(model(**task).loss, params)
    ref = reference_logits(model, align)
    logits = model(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits
    g_a = torch.autograd.grad(kl_alignment_loss(logits, ref, align["labels"]), params)
    dot = sum((u.double() * a.double()).sum() for u, a in zip(g_u, g_a))
    nsq = sum((a.double() ** 2).sum() for a in g_a)
    return g_u, g_a, float(dot), float(nsq)


def clipped(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * coef for g in grads], float(norm)


def test_update_is_safegrad_then_clip(tmp_path):
    rho = 0.5
    model = tiny_peft_model()
    g_u, g_a, dot, nsq = hand_safegrad(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert dot < 0 and nsq > 0, "fixture seeds chosen so that the gradients conflict"
    c = dot / nsq
    update = [u - c * a + rho * a for u, a in zip(g_u, g_a)]
    _, norm = clipped(update, float("inf"))
    max_norm = 0.5 * norm  # clipping active
    expected, _ = clipped(update, max_norm)

    cap = CaptureGrads()
    trainer = make_trainer(
        tmp_path,
        "safegrad",
        model=model,
        rho=rho,
        callbacks=[cap],
        args_kw={"max_grad_norm": max_norm},
    )
    trainer.train()
    got = cap.grads[0]
    assert_grads_close(got, dict(zip(names, expected)), rtol=1e-4, atol=1e-8)
    assert train_logs(trainer)[0]["surgery/conflict_rate"] == 1.0

    # The other order (clip g_u first, then surgery) is measurably different here.
    clipped_u, _ = clipped(list(g_u), max_norm)
    dot_c = sum((u.double() * a.double()).sum() for u, a in zip(clipped_u, g_a))
    other = [u - float(dot_c) / nsq * a + rho * a for u, a in zip(clipped_u, g_a)]
    diff = max((o - e).abs().max().item() for o, e in zip(other, expected))
    assert diff > 1e-3 * max(e.abs().max().item() for e in expected)


# -- gradient checkpointing, bf16, no second model --------------------------------------------


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    grads = []
    for ckpt in (False, True):
        cap = CaptureGrads()
        trainer = make_trainer(
            tmp_path, "safegrad", callbacks=[cap], args_kw={"gradient_checkpointing": ckpt}
        )
        trainer.train()
        assert trainer.model.base_model.model.model.gradient_checkpointing is ckpt
        grads.append(cap.grads[0])
    assert_grads_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_bf16_autocast_runs(tmp_path):
    trainer = make_trainer(
        tmp_path, "safegrad", batch=2, accum=2, steps=1, n_train=4, args_kw={"bf16": True}
    )
    trainer.train()
    for log in train_logs(trainer):
        assert math.isfinite(log["loss"]) and math.isfinite(log["surgery/cosine"])


def test_no_second_model_copy(tmp_path):
    cap = CaptureGrads(count_live=True)
    trainer = make_trainer(tmp_path, "safegrad", callbacks=[cap], cache_reference=True)
    before = live_parameter_numel()
    trainer.train()
    assert cap.live_numel == [before]
    # The counter does see a copy.
    clone = copy.deepcopy(trainer.model)
    assert live_parameter_numel() > before
    del clone


# -- configuration errors ----------------------------------------------------------------------


def test_bad_configuration_raises(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        make_trainer(tmp_path, "pcgrad")
    with pytest.raises(ValueError, match="rho"):
        make_trainer(tmp_path, rho=-1.0)
    with pytest.raises(ValueError, match="lam"):
        make_trainer(tmp_path, "mixed", lam=-0.1)
    with pytest.raises(ValueError, match="surgery_granularity"):
        make_trainer(tmp_path, surgery_granularity="layer")
    with pytest.raises(ValueError, match="spf_rank"):
        make_trainer(tmp_path, "spf", spf_rank=0)
    with pytest.raises(ValueError, match="kl_positions"):
        make_trainer(tmp_path, kl_positions="prompt")
    with pytest.raises(ValueError, match="needs an alignment_dataset"):
        make_trainer(tmp_path, "safegrad", n_align=0)
    frozen = tiny_peft_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        make_trainer(tmp_path, model=frozen)
    with pytest.raises(TypeError, match="PeftModel"):  # a plain model needs the store
        make_trainer(tmp_path, model=tiny_llama(), cache_reference=False)
    with pytest.raises(ValueError, match="reference_top_k must be >= 1"):
        make_trainer(tmp_path, reference_top_k=0)
    with pytest.raises(ValueError, match="cache_reference=False turns off"):
        make_trainer(tmp_path, reference_top_k=4, cache_reference=False)
    with pytest.raises(TypeError, match="cache_reference must be True, False or None"):
        make_trainer(tmp_path, cache_reference="on")
    # sft needs neither an alignment set nor a PEFT model.
    make_trainer(tmp_path, "sft", n_align=0, model=tiny_llama())


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_reads_device_values_only_when_logging(tmp_path, monkeypatch, fused):
    """SafeGradTrainer's own code reads device values on the host only inside log()."""
    import safegrad_kernels.integrations.alignment_batches as schedule_module
    import safegrad_kernels.integrations.trainer as trainer_module

    ours = {trainer_module.__file__, schedule_module.__file__}
    callers: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename in ours:
                callers.append(frame.f_code.co_name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    trainer = make_trainer(
        tmp_path,
        "safegrad",
        batch=2,
        accum=2,
        steps=3,
        n_train=12,
        args_kw={"logging_steps": 3},
        fused_loss=fused,
    )
    trainer.train()
    monkeypatch.undo()
    assert len(train_logs(trainer)) == 1
    assert callers and set(callers) == {"log"}


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x: an example's reference depends on its batch's padding beyond "
    "fp32 rounding (5e-5 relative in the KL on 4.46.3), so the store is close, not equal",
)
@pytest.mark.parametrize("cache", [False, True, None])
def test_reference_store_gives_the_same_updates(tmp_path, monkeypatch, cache):
    """The store (exact; None = the default rule, on here) replaces every reference forward
    of the training steps and hands the optimizer the live reference's gradients."""
    import safegrad_kernels.integrations.trainer as trainer_module

    live_calls = []
    live = trainer_module.reference_logits

    def counted(*args, **kwargs):
        live_calls.append(1)
        return live(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "reference_logits", counted)
    runs = []
    for store in (False, cache):
        live_calls.clear()
        cap = CaptureGrads()
        # mixed, not safegrad: at step 1 the exact g_a is 0 (model == reference) and the
        # store's rounding residue (~1e-18 ||g_u||^2) can take SafeGrad's conflict branch,
        # a discontinuity that turns rounding into a visible difference (seen on the oldest
        # stack). The store's equality to the live reference is what is tested here.
        trainer = make_trainer(
            tmp_path, "mixed", steps=2, n_train=8, callbacks=[cap], cache_reference=store
        )
        trainer.train()
        runs.append(cap.grads)
    assert trainer.reference_choice.on is (cache is not False)
    if cache is not False:
        assert len(trainer.reference_store) == 4 and not live_calls
    else:
        assert trainer.reference_store is None and len(live_calls) == 2
    # The store is built from batches in index order, the live reference from the shuffled
    # training batches, so an example's reference is computed inside another padding: equal
    # to fp32 rounding on transformers 5.24 (max |diff| 5e-9 on entries up to 0.04), 5e-5
    # relative in the KL on transformers 4.46.3 (the oldest stack), not bitwise as the old
    # ReferenceCache, which kept the forward's own logits.
    for uncached, cached in zip(*runs):
        assert_grads_close(uncached, cached, rtol=1e-3, atol=1e-7)


# -- alignment refresh (alignment_every) -------------------------------------------------------


def _trained_lora(trainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_alignment_every_1_is_the_trainer_without_the_option(tmp_path):
    runs = []
    for kw in ({}, {"alignment_every": 1}, {"alignment_every": 3}):
        trainer = make_trainer(
            tmp_path, "safegrad", batch=2, accum=2, steps=3, n_train=12, lam=0.3, **kw
        )
        trainer.train()
        aligned = ["align_loss" in log for log in train_logs(trainer)]
        runs.append((_trained_lora(trainer), aligned, trainer.surgeon.state_dict()))
    (
        (plain, plain_aligned, plain_state),
        (one, one_aligned, one_state),
        (three, three_aligned, _),
    ) = runs
    assert plain.keys() == one.keys() and plain
    assert all(torch.equal(plain[n], one[n]) for n in plain), "k=1 must be bit for bit"
    assert plain_aligned == one_aligned == [True, True, True]
    assert plain_state == one_state == {}  # nothing kept, no checkpoint file
    # k = 3: the alignment pass (and its logged loss) only on steps 0 and 1 (of 0, 1, 3, ...)
    assert three_aligned == [True, True, False]
    # ... and step 2 projected against step 1's g_a: other weights.
    assert any(not torch.equal(plain[n], three[n]) for n in plain)


def test_alignment_every_draws_alignment_batches_only_on_refresh_steps(tmp_path):
    trainer = make_trainer(
        tmp_path, "safegrad", batch=2, accum=2, steps=5, n_train=20, alignment_every=2
    )
    drawn = []
    original = trainer.alignment_schedule.next_batch

    def counting():
        drawn.append(trainer.state.global_step)
        return original()

    trainer.alignment_schedule.next_batch = counting
    trainer.train()
    assert drawn == [0, 0, 1, 1, 2, 2, 4, 4]  # two micro-batches on each refresh step
    # The closed form that positions a resumed run's schedule counts the same draws.
    assert trainer._alignment_batches_consumed() == len(drawn)


def test_alignment_every_above_one_warns_with_the_evidence(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="safegrad_kernels.integrations.trainer"):
        make_trainer(tmp_path, "safegrad", alignment_every=1)
    assert "alignment_every" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="safegrad_kernels.integrations.trainer"):
        make_trainer(tmp_path, "safegrad", alignment_every=4)
    assert "alignment_every=4" in caplog.text and "steps 0, 1, 4, 8" in caplog.text
    assert "docs/study" in caplog.text


def test_alignment_every_refusals(tmp_path):
    with pytest.raises(ValueError, match="alignment_every must be >= 1"):
        make_trainer(tmp_path, "safegrad", alignment_every=0)
    with pytest.raises(ValueError, match="alignment_every > 1 with fp16"):
        make_trainer(tmp_path, "safegrad", alignment_every=2, args_kw={"fp16": True})
