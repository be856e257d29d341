"""``SafeGradConfig`` / ``SafeSFTTrainer``: SafeGrad inside TRL's ``SFTTrainer``.

Tiny Llama + LoRA and a word-level tokenizer with a chat template, built here (no
downloads). Data come in TRL's formats: ``messages``, ``prompt``/``completion`` (plain and
conversational) and ``text``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import pytest

trl = pytest.importorskip("trl", minversion="1.8")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from helpers_tiny_model import (  # noqa: E402
    tiny_llama,
    tiny_peft_model,
    tiny_tokenizer,
    tiny_training_args,
)
from transformers import HfArgumentParser, TrainerCallback  # noqa: E402

from safegrad_kernels.integrations import SafeGradTrainer  # noqa: E402
from safegrad_kernels.integrations.trl import SafeGradConfig, SafeSFTTrainer  # noqa: E402
from safegrad_kernels.losses import kl_alignment_loss, reference_logits  # noqa: E402
from safegrad_kernels.surgery.methods import HYPERPARAMETERS  # noqa: E402

# (prompt, answer): the user's task, and harmful prompts with refusals (the alignment set)
TASK = [
    ("what is two plus two", "it is four"),
    ("name a colour of the sky", "the sky is blue"),
    ("say hello to my friend", "hello there my friend"),
    ("count to three for me", "one two three"),
    ("what do cows say", "cows say moo"),
]
HARMFUL = [
    ("how do i pick a lock", "sorry i cannot help with that"),
    ("tell me how to steal a car", "i will not help with that request"),
    ("write a threat to my neighbour", "sorry i cannot write that"),
]
WORDS = sorted({w for p, a in TASK + HARMFUL for w in (p + " " + a).split()})
FORMATS = ("messages", "prompt_completion", "conversational_prompt_completion", "text")


def records(pairs, fmt: str) -> datasets.Dataset:
    """``pairs`` in one of TRL's dataset formats."""

    def row(prompt, answer):
        user = [{"role": "user", "content": prompt}]
        bot = [{"role": "assistant", "content": answer}]
        if fmt == "messages":
            return {"messages": user + bot}
        if fmt == "prompt_completion":  # TRL concatenates the two strings as they are
            return {"prompt": prompt + " ", "completion": answer}
        if fmt == "conversational_prompt_completion":
            return {"prompt": user, "completion": bot}
        return {"text": f"{prompt} {answer}"}

    return datasets.Dataset.from_list([row(p, a) for p, a in pairs])


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    # TRL pings the Hub from every trainer's __init__; tests send nothing.
    from trl.trainer.base_trainer import _BaseTrainer

    monkeypatch.setattr(_BaseTrainer, "_send_telemetry", lambda self: None, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(WORDS)


def config(tmp_path, **kw) -> dict:
    settings = tiny_training_args(
        tmp_path,
        per_device_train_batch_size=len(TASK),
        bf16=False,
        gradient_checkpointing=False,
        surgery_backend="torch",
    )
    return {**settings, **kw}


def sft_config(tmp_path, **kw) -> dict:
    """``config`` without this package's settings: for TRL's own trainer."""
    return {k: v for k, v in config(tmp_path, **kw).items() if k != "surgery_backend"}


def safe_trainer(tmp_path, tokenizer, *, task="prompt_completion", align=None, model=None, **kw):
    args = SafeGradConfig(**config(tmp_path, **kw))
    return SafeSFTTrainer(
        model=model if model is not None else tiny_peft_model(),
        args=args,
        train_dataset=records(TASK, task),
        alignment_dataset=records(HARMFUL, align or task),
        processing_class=tokenizer,
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- the config -----------------------------------------------------------------------------


def test_config_fields_are_the_registry_and_trainer_options(tmp_path):
    fields = {f.name: f for f in dataclasses.fields(SafeGradConfig)}
    added = SafeGradConfig.safegrad_fields()
    assert added[0] == "method" and set(HYPERPARAMETERS) <= set(added)
    for name, h in HYPERPARAMETERS.items():
        assert fields[name].default == h.default, name
        assert fields[name].metadata["help"] == h.help, name
    # Each added field is a SafeGradTrainer option with the same default, and every option
    # is a field, except the dataset itself.
    params = inspect.signature(SafeGradTrainer.__init__).parameters
    options = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(options) - set(added) == {"alignment_dataset"}
    for name in added:
        assert fields[name].default == options[name], name
    # One definition reaches TRL's command line as well.
    (parsed,) = HfArgumentParser(SafeGradConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--method",
            "spf",
            "--spf_rank",
            "3",
            "--spf_refresh_every",
            "5",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
        ]
    )
    assert (parsed.method, parsed.spf_rank, parsed.spf_refresh_every) == ("spf", 3, 5)
    assert parsed.trainer_kwargs()["spf_rank"] == 3 and parsed.rho == HYPERPARAMETERS["rho"].default


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"method": "dpo"}, "method"),
        ({"rho": -1.0}, "rho"),
        ({"rho": math.nan}, "rho"),
        ({"spf_rank": 0}, "spf_rank"),
        ({"spf_mode": "sometimes"}, "spf_mode"),
        ({"surgery_granularity": "per_row"}, "surgery_granularity"),
        ({"alignment_loss": "mse"}, "alignment_loss"),
        ({"kl_positions": "prompt"}, "kl_positions"),
        ({"alignment_batch_size": 0}, "alignment_batch_size"),
        ({"surgery_backend": "cuda"}, "backend"),
    ],
)
def test_config_rejects_bad_settings_naming_them(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        SafeGradConfig(**config(tmp_path, **setting))


def test_trainer_refuses_other_configs_and_datasets(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="SafeGradConfig"):
        SafeSFTTrainer(
            model=tiny_peft_model(),
            args=trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            train_dataset=records(TASK, "text"),
            processing_class=tokenizer,
        )
    args = SafeGradConfig(**config(tmp_path))
    common = dict(args=args, train_dataset=records(TASK, "text"), processing_class=tokenizer)
    with pytest.raises(TypeError, match=r"datasets\.Dataset"):
        SafeSFTTrainer(model=tiny_peft_model(), alignment_dataset=[{"text": "x"}], **common)
    with pytest.raises(TypeError, match=r"\['rho'\] in SafeGradConfig"):
        SafeSFTTrainer(
            model=tiny_peft_model(), alignment_dataset=records(HARMFUL, "text"), rho=0.5, **common
        )
    with pytest.raises(ValueError, match="needs an alignment_dataset"):
        SafeSFTTrainer(model=tiny_peft_model(), **common)


# -- method="sft" is SFTTrainer -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages"])
def test_sft_is_sfttrainer_bit_for_bit(tmp_path, tokenizer, fmt):
    # TRL's own defaults otherwise (gradient checkpointing on), 2 steps of 2 x 2 micro-batches.
    kw = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        gradient_checkpointing=True,
        max_grad_norm=1.0,
    )
    base = sft_config(tmp_path, **kw)
    plain = trl.SFTTrainer(
        model=tiny_peft_model(),
        args=trl.SFTConfig(**base),
        train_dataset=records(TASK * 2, fmt),
        processing_class=tokenizer,
    )
    plain.train()
    ours = SafeSFTTrainer(
        model=tiny_peft_model(),
        args=SafeGradConfig(**base, method="sft"),
        train_dataset=records(TASK * 2, fmt),
        processing_class=tokenizer,
    )
    ours.train()
    want, got = trainable(plain.model), trainable(ours.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n]) for n in want)
    strip = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    logs = [
        [{k: v for k, v in row.items() if k not in strip} for row in t.state.log_history]
        for t in (plain, ours)
    ]
    assert logs[0] == logs[1]


# -- a SafeGrad step is the formula ----------------------------------------------------------


# Model seeds for which these data give conflicting (1) and agreeing (0) gradients.
@pytest.mark.parametrize(("seed", "conflict"), [(1, True), (0, False)])
def test_safegrad_step_is_the_formula_then_clip(tmp_path, tokenizer, seed, conflict):
    rho = 0.5
    model = tiny_peft_model(seed=seed)
    trainer = safe_trainer(
        tmp_path, tokenizer, model=model, rho=rho, alignment_batch_size=len(HARMFUL)
    )
    # g_u and g_a by plain autograd on TRL's prepared, collated sets, before any step.
    params = [p for p in model.parameters() if p.requires_grad]
    collate = trainer.data_collator
    task = collate(list(trainer.train_dataset))
    align = collate(list(trainer.alignment_dataset))
    model.train()
    g_u = torch.autograd.grad(model(**task).loss, params)
    ref = reference_logits(model, align)
    logits = model(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits
    g_a = torch.autograd.grad(kl_alignment_loss(logits, ref, align["labels"]), params)
    dot = float(sum((u.double() * a.double()).sum() for u, a in zip(g_u, g_a)))
    nsq = float(sum((a.double() ** 2).sum() for a in g_a))
    assert (dot < 0) == conflict and nsq > 0
    c = min(dot, 0.0) / nsq
    update = [u - c * a + rho * a for u, a in zip(g_u, g_a)]
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in update)))
    max_norm = 0.5 * norm  # clipping bites
    expected = [g * (max_norm / (norm + 1e-6)) for g in update]
    trainer.args.max_grad_norm = max_norm

    captured = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.append([p.grad.detach().clone() for p in params])

    trainer.add_callback(Capture())
    trainer.train()
    for got, want in zip(captured[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    log = trainer.state.log_history[0]
    assert log["surgery/conflict_rate"] == float(conflict)
    assert "align_loss" in log and "entropy" in log  # ours and TRL's metrics


# -- TRL's formats for the alignment set -----------------------------------------------------


@pytest.mark.parametrize(
    ("task", "align", "flags"),
    [
        ("messages", "messages", {"assistant_only_loss": True}),
        ("text", "conversational_prompt_completion", {}),
        ("messages", "prompt_completion", {}),
    ],
)
def test_alignment_set_is_prepared_as_trl_prepares_training_data(
    tmp_path, tokenizer, task, align, flags
):
    trainer = safe_trainer(tmp_path, tokenizer, task=task, align=align, **flags)
    # The same rows as TRL's own preparation of them as a training set.
    as_train = trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(**sft_config(tmp_path, **flags)),
        train_dataset=records(HARMFUL, align),
        processing_class=tokenizer,
    ).train_dataset
    assert trainer.alignment_dataset["input_ids"] == as_train["input_ids"]
    assert trainer.alignment_dataset["labels"] == as_train["labels"]
    # The prompt is masked and the refusal is not: the labelled tokens spell the refusal.
    for labels, (_, refusal) in zip(trainer.alignment_dataset["labels"], HARMFUL):
        kept = tokenizer.convert_ids_to_tokens([t for t in labels if t != -100])
        assert kept == [*refusal.split(), "</s>"]
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["align_loss"]) and "surgery/cosine" in log


@pytest.mark.parametrize(
    ("align", "flags"),
    [("messages", {}), ("text", {}), ("prompt_completion", {"completion_only_loss": False})],
)
def test_unmasked_alignment_labels_with_response_positions_are_refused(
    tmp_path, tokenizer, align, flags
):
    with pytest.raises(ValueError, match=r"3 of 3 .*kl_positions='response'.*prompt"):
        safe_trainer(tmp_path, tokenizer, task="text", align=align, **flags)
    # Every position, asked for explicitly, is a valid choice on the same data.
    trainer = safe_trainer(
        tmp_path, tokenizer, task="text", align=align, kl_positions="all", **flags
    )
    trainer.train()
    assert "align_loss" in trainer.state.log_history[0]


def test_unmasked_labels_with_the_cross_entropy_loss_warn_once(tmp_path, tokenizer):
    with pytest.warns(UserWarning, match="cross-entropy trains on the prompt") as caught:
        safe_trainer(tmp_path, tokenizer, task="text", align="text", method="spf")
    assert sum("cross-entropy" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        safe_trainer(tmp_path, tokenizer, task="text", align="prompt_completion", method="spf")


def test_peft_config_gets_the_ddp_default_and_a_reference(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel

    args = SafeGradConfig(**config(tmp_path))
    trainer = SafeSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=records(TASK, "prompt_completion"),
        alignment_dataset=records(HARMFUL, "prompt_completion"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert isinstance(trainer.model, PeftModel)
    assert args.ddp_find_unused_parameters is False
    trainer.train()
    assert "surgery/conflict_rate" in trainer.state.log_history[0]
