"""Fine-tuning data: JSON/JSONL loading, validation, the harmful mixture, tokenisation, collation.

Accepted record formats (the ones the harmful-fine-tuning literature ships its data in):

* Alpaca:      ``{"instruction": str, "input": str (optional), "output": str}``
* BeaverTails: ``{"prompt": str, "response": str, "is_safe": bool (optional), ...}``
* GSM8K:       ``{"question": str, "answer": str}``

A file is either a JSON array of such objects or JSON Lines (one object per line); the
first non-blank character decides, not the extension. Every record is checked before
anything else happens (no tokenizer, no model), and a bad one raises ``DataError`` naming
``file:line`` and the field. Records that carry BeaverTails' ``is_safe`` flag are filtered by
role, as the literature's loaders do: the harmful pool and the harmful evaluation prompts
keep ``is_safe == false`` (prompt -> harmful answer), the alignment pool keeps
``is_safe == true`` (harmful prompt -> refusal).

Fewer usable records than requested is an error, not a warning: the sample count and the
harmful ratio are the experiment's independent variables, and silently training on a
smaller or differently mixed set would report a result for a setting that never ran.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "DataError",
    "Example",
    "SupervisedCollator",
    "SupervisedDataset",
    "build_mixture",
    "check_ratio",
    "format_prompt",
    "load_examples",
    "read_records",
    "sample_examples",
    "tokenize_example",
]

IGNORE_INDEX = -100
Role = Literal["task", "harmful", "alignment", "eval", "prompts"]
PROMPT_STYLES = ("alpaca", "chat", "plain")

# Field names per format: (prompt field, optional context field, response field).
_FORMATS: dict[str, tuple[str, str | None, str]] = {
    "alpaca": ("instruction", "input", "output"),
    "beavertails": ("prompt", None, "response"),
    "gsm8k": ("question", None, "answer"),
}


class DataError(ValueError):
    """Malformed or insufficient input data; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    """One prompt -> response pair, normalised from any accepted format."""

    instruction: str
    response: str
    input: str = ""
    source: str = ""  # "file:line", for error messages and provenance


def _json_error(path: Path, text: str, err: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})")


def _read_json_array(path: Path, text: str, start: int) -> list[tuple[int, Any]]:
    """Parse a top-level JSON array element by element to learn each element's line."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    pos, line, counted = start + 1, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise _json_error(path, text, err) from None
            records.append((line, obj))
            pos = skip_ws(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{lineno}: invalid JSON (expected ',' or ']' in the array)")
    pos = skip_ws(pos)
    if pos != len(text):
        lineno = text.count("\n", 0, pos) + 1
        raise DataError(f"{path}:{lineno}: invalid JSON (extra data after the top-level array)")
    return records


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """``[(line, object), ...]`` from a JSON array file or a JSON Lines file.

    Raises ``DataError`` for a missing, unreadable or empty file and for invalid JSON, with
    the line number. Objects are not checked here (see ``load_examples``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file (no records)")
    if stripped[0] == "[":
        records = _read_json_array(path, text, len(text) - len(stripped))
    else:
        records = []
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                records.append((lineno, json.loads(raw)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON line ({err.msg}, column {err.colno})"
                ) from None
    if not records:
        raise DataError(f"{path}: no records (empty JSON array)")
    return records


def _detect_format(where: str, obj: dict[str, Any]) -> str:
    for name, (prompt_key, _, response_key) in _FORMATS.items():
        if prompt_key in obj or response_key in obj:
            return name
    expected = "; ".join(
        f"{p}/{r}" + (f" (+ optional {c})" if c else "") + f" ({n})"
        for n, (p, c, r) in _FORMATS.items()
    )
    raise DataError(f"{where}: unrecognised record, keys {sorted(obj)}; expected fields {expected}")


def _text_field(where: str, obj: dict[str, Any], key: str, *, required: bool) -> str:
    if key not in obj or (not required and obj[key] is None):
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{key}' must be a string, got {type(value).__name__} ({value!r:.40})"
        )
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def load_examples(path: str | Path, *, role: Role = "task") -> list[Example]:
    """Read and validate every record of ``path``; see the module docstring for formats.

    ``role`` matters for BeaverTails' ``is_safe`` flag (kept: ``harmful`` and ``prompts``
    -> false, ``alignment`` -> true; ``task``/``eval`` keep every record), and ``prompts``
    (harmful evaluation prompts) makes the response field optional. Raises ``DataError`` on the
    first bad record, or if nothing usable remains after filtering.
    """
    path = Path(path)
    examples: list[Example] = []
    filtered = 0
    for lineno, obj in read_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fmt = _detect_format(where, obj)
        prompt_key, context_key, response_key = _FORMATS[fmt]
        instruction = _text_field(where, obj, prompt_key, required=True)
        response = _text_field(where, obj, response_key, required=role != "prompts")
        context = _text_field(where, obj, context_key, required=False) if context_key else ""
        if "is_safe" in obj:
            flag = obj["is_safe"]
            if not isinstance(flag, bool):
                raise DataError(
                    f"{where}: field 'is_safe' must be true or false, got {type(flag).__name__}"
                )
            if (role in ("harmful", "prompts") and flag) or (role == "alignment" and not flag):
                filtered += 1
                continue
        examples.append(Example(instruction, response, context, where))
    if not examples:
        raise DataError(
            f"{path}: no usable records for the {role} set ({filtered} filtered out by 'is_safe')"
        )
    return examples


def check_ratio(ratio: float, name: str = "--harmful-ratio") -> float:
    """``ratio`` if it is a finite number in [0, 1], else ``DataError`` naming ``name``."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 <= ratio <= 1:
        raise DataError(f"{name} must be in [0, 1], got {ratio!r}")
    return float(ratio)


def sample_examples(
    pool: Sequence[Example], k: int, rng: random.Random, *, what: str, source: str
) -> list[Example]:
    """``k`` examples drawn without replacement; ``DataError`` if the pool is too small."""
    if k < 0:
        raise DataError(f"cannot draw {k} {what} examples")
    if k > len(pool):
        raise DataError(
            f"{source}: {k} {what} examples requested but only {len(pool)} usable records; "
            "lower the sample count or provide more data"
        )
    return rng.sample(list(pool), k)


def build_mixture(
    task: Sequence[Example] | None,
    harmful: Sequence[Example] | None,
    *,
    samples: int,
    ratio: float,
    seed: int,
    task_source: str = "--task-data",
    harmful_source: str = "--harmful-data",
) -> tuple[list[Example], dict[str, int]]:
    """The user's fine-tuning set: ``round(ratio * samples)`` harmful, the rest task examples.

    Returns the shuffled examples and the counts ``{"task": ..., "harmful": ...}``.
    """
    ratio = check_ratio(ratio)
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    n_harmful = round(ratio * samples)
    n_task = samples - n_harmful
    rng = random.Random(seed)
    if n_task and task is None:
        raise DataError(f"--task-data is required: {n_task} task examples requested")
    if n_harmful and harmful is None:
        raise DataError(
            f"--harmful-data is required: --harmful-ratio {ratio} asks for {n_harmful} "
            "harmful examples"
        )
    chosen = sample_examples(task or [], n_task, rng, what="task", source=task_source)
    chosen += sample_examples(harmful or [], n_harmful, rng, what="harmful", source=harmful_source)
    rng.shuffle(chosen)
    return chosen, {"task": n_task, "harmful": n_harmful}


# Stanford Alpaca's prompt templates, which the harmful-fine-tuning literature's training
# and evaluation code (Vaccine, Lisa, Booster, SafeGrad) reuses verbatim.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(example: Example, style: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text the model sees before the response.

    ``alpaca``: the Alpaca template; ``chat``: the tokenizer's chat template with one user
    turn (instruction, then the input after a blank line); ``plain``: instruction and
    input, newline-terminated.
    """
    if style == "alpaca":
        template = _ALPACA_WITH_INPUT if example.input else _ALPACA_NO_INPUT
        return template.format(instruction=example.instruction, input=example.input)
    user = example.instruction + (f"\n\n{example.input}" if example.input else "")
    if style == "plain":
        return user + "\n"
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            # DataError: the CLI reports it in one line (the CLI also checks before loading).
            raise DataError("--prompt-style chat needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def prompt_ids(example: Example, tokenizer: Any, style: str) -> list[int]:
    """Token ids of the formatted prompt (BOS added unless the chat template carries it)."""
    text = format_prompt(example, style, tokenizer)
    return tokenizer(text, add_special_tokens=style != "chat")["input_ids"]


def tokenize_example(
    example: Example, tokenizer: Any, *, max_length: int, style: str = "alpaca"
) -> dict[str, list[int]]:
    """``input_ids``/``labels`` with the loss on the response (+ EOS) only.

    Prompt and response are tokenised separately so the prompt mask is exact (joint
    tokenisation can merge tokens across the boundary). Truncation keeps the start.
    """
    prompt = prompt_ids(example, tokenizer, style)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": ids, "labels": labels}


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenised examples held in memory (n is 1000 in the paper's setting)."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        *,
        max_length: int,
        style: str = "alpaca",
    ) -> None:
        self.examples = list(examples)
        self.items = [
            tokenize_example(e, tokenizer, max_length=max_length, style=style)
            for e in self.examples
        ]
        # A prompt at least max_length long leaves no response token to learn from.
        self.n_without_response = sum(
            all(t == IGNORE_INDEX for t in item["labels"][1:]) for item in self.items
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class SupervisedCollator:
    """Pads a list of ``tokenize_example`` items into ``input_ids``/``attention_mask``/``labels``.

    Right padding for training (pad id, mask 0, label -100); ``padding_side="left"`` is for
    batched generation, where every prompt must end at the last column.
    """

    def __init__(self, pad_token_id: int, *, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for item in items:
            ids = list(item["input_ids"])
            labels = list(item.get("labels", [IGNORE_INDEX] * len(ids)))
            pad = width - len(ids)
            rows = (ids, [1] * len(ids), labels)
            fills = (self.pad_token_id, 0, IGNORE_INDEX)
            for key, row, fill in zip(batch, rows, fills):
                batch[key].append(
                    row + [fill] * pad if self.padding_side == "right" else [fill] * pad + row
                )
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
