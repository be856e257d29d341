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
    assert blocks, "README.md lost its Python example"
    model = tiny_peft_model()
    examples = toy_examples(8)
    micro_batches = [
        (collate(examples[i : i + 2]), collate(examples[i + 4 : i + 6])) for i in (0, 2)
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    namespace = {"model": model, "micro_batches": micro_batches, "optimizer": optimizer}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    stats = namespace["stats"].to_dict()
    assert {"dot", "cosine", "coef", "conflict"} <= set(stats)
    assert all(v == v for v in stats.values() if isinstance(v, float)), stats  # no NaN
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert moved, "the optimizer step changed no LoRA parameter"
    assert "cosine" in capsys.readouterr().out
