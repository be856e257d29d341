"""Greedy generation for evaluation: batched by prompt length, answers in input order."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .data import Example, SupervisedCollator, prompt_ids

__all__ = ["generate"]


def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    style: str,
    max_new_tokens: int,
    batch_size: int,
    device: Any,
) -> list[str]:
    """Greedy answers, batched by prompt length (left padded), returned in input order."""
    import torch
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id
    collate = SupervisedCollator(pad_id, padding_side="left")
    # Greedy, whatever sampling defaults the model ships (Llama-3-Instruct's
    # generation_config.json sets temperature 0.6 / top_p 0.9, which greedy ignores noisily).
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1)
    config.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    encoded = [prompt_ids(e, tokenizer, style) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        index = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i]} for i in index])
        with torch.no_grad():
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
            )
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(index):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
