"""The README's Python example runs as written (on a tiny PEFT Llama) and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from helpers_tiny_model import collate, tiny_peft_model, toy_examples

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_training_step_example_runs_and_updates_the_gradients(capsys):
    blocks = python_blocks()
    assert len(blocks) == 2, "README.md's Python examples changed: update this test"
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


def test_readme_trainer_example_runs_and_logs_surgery(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes to runs/safegrad
    namespace = {
        "model": tiny_peft_model(),
        "task_ds": toy_examples(8, seed=0),
        "align_ds": toy_examples(8, seed=1),
        "collator": collate,
    }
    exec(compile(python_blocks()[1], str(README), "exec"), namespace)
    logs = [row for row in namespace["trainer"].state.log_history if "loss" in row]
    assert len(logs) == 6  # 3 epochs (the default) x 8 examples / (2 x 2 accumulated)
    assert all("surgery/cosine" in row and "align_loss" in row for row in logs)
