"""The README's Python example runs as written (on a tiny PEFT Llama) and does what it says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from helpers_tiny_model import collate, tiny_peft_model, toy_examples

README = Path(__file__).resolve().parents[1] / "README.md"


try:
    from safegrad_kernels.integrations.trl import SafeGradConfig
except ImportError:  # no trl: the TRL example's test skips
    SafeGradConfig = None
else:

    @dataclasses.dataclass
    class CPUSafeGradConfig(SafeGradConfig):
        """TRL's bf16 default needs ``use_cpu=True`` on a machine without a GPU.

        Module level: a checkpoint pickles the config."""

        use_cpu: bool = True


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_training_step_example_runs_and_updates_the_gradients(capsys):
    blocks = python_blocks()
    assert len(blocks) == 4, "README.md's Python examples changed: update this test"
    model = tiny_peft_model()
    examples = toy_examples(8)
    micro_batches = [
        (collate(examples[i : i + 2]), collate(examples[i + 4 : i + 6])) for i in (0, 2)
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    namespace = {"model": model, "micro_batches": micro_batches, "optimizer": optimizer}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    stats = namespace["stats"].to_dict()
    assert {"dot", "cosine", "coef", "conflict"} <= set(stats)
    assert all(v == v for v in stats.values() if isinstance(v, float)), stats  # no NaN
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert moved, "the optimizer step changed no LoRA parameter"
    assert "cosine" in capsys.readouterr().out


def test_readme_flat_grads_example_runs_and_keeps_the_views():
    model = tiny_peft_model()
    examples = toy_examples(8)
    micro_batches = [
        (collate(examples[i : i + 2]), collate(examples[i + 4 : i + 6])) for i in (0, 2)
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    namespace = {"model": model, "micro_batches": micro_batches, "optimizer": optimizer}
    blocks = python_blocks()
    exec(compile(blocks[0], str(README), "exec"), namespace)  # its imports; one step
    namespace["optimizer"].zero_grad(set_to_none=True)
    exec(compile(blocks[1], str(README), "exec"), namespace)
    surgeon, stats = namespace["surgeon"], namespace["stats"].to_dict()
    assert surgeon.flat_grads and stats["ref_norm_sq"] > 0 and stats["grad_norm_sq"] > 0
    assert all(p.grad is v for p, v in zip(surgeon.params, surgeon._task.views))
    assert all(not p.grad.any() for p in surgeon.params)  # zeroed in place


def test_readme_trainer_example_runs_and_logs_surgery(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes to runs/safegrad
    namespace = {
        "model": tiny_peft_model(),
        "task_ds": toy_examples(8, seed=0),
        "align_ds": toy_examples(8, seed=1),
        "collator": collate,
    }
    exec(compile(python_blocks()[2], str(README), "exec"), namespace)
    logs = [row for row in namespace["trainer"].state.log_history if "loss" in row]
    assert len(logs) == 6  # 3 epochs (the default) x 8 examples / (2 x 2 accumulated)
    assert all("surgery/cosine" in row and "align_loss" in row for row in logs)


def test_readme_trl_example_runs_and_logs_surgery(tmp_path, monkeypatch):
    if SafeGradConfig is None:
        pytest.skip("needs trl")
    import datasets
    from helpers_tiny_model import tiny_tokenizer
    from trl.trainer.base_trainer import _BaseTrainer

    import safegrad_kernels.integrations.trl as trl_integration

    monkeypatch.setattr(trl_integration, "SafeGradConfig", CPUSafeGradConfig)
    monkeypatch.setattr(_BaseTrainer, "_send_telemetry", lambda self: None, raising=False)
    monkeypatch.chdir(tmp_path)  # the example writes to runs/safegrad-trl
    (block,) = [b for b in python_blocks() if "SafeSFTTrainer" in b]

    def chats(pairs):
        return datasets.Dataset.from_list(
            [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in pairs
            ]
        )

    task = [("say hello", "hello there"), ("count to two", "one two")] * 2
    align = [("how do i pick a lock", "sorry i cannot help"), ("steal a car", "i will not")]
    words = sorted({w for q, a in task + align for w in f"{q} {a}".split()})
    namespace = {
        "model": tiny_peft_model(),
        "tokenizer": tiny_tokenizer(words),
        "task_ds": chats(task),
        "align_ds": chats(align),
    }
    exec(compile(block, str(README), "exec"), namespace)
    logs = [row for row in namespace["trainer"].state.log_history if "loss" in row]
    assert len(logs) == 6  # TRL's 3 epochs x 4 examples / batches of 2
    assert all("surgery/cosine" in row and "align_loss" in row for row in logs)
