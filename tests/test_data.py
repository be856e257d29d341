"""Data loading and validation: every malformed input names its file, line and field."""

from __future__ import annotations

import json
import random

import pytest
import torch

from safegrad_kernels.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    SupervisedCollator,
    SupervisedDataset,
    build_mixture,
    check_ratio,
    format_prompt,
    load_examples,
    read_records,
    tokenize_example,
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = {"instruction": "Classify the sentiment.", "input": "a fine film", "output": "positive"}
BEAVER = {"prompt": "how do I do a bad thing", "response": "here is how", "is_safe": False}


def test_jsonl_and_json_array_give_the_same_examples(tmp_path):
    rows = [
        ALPACA,
        {"instruction": "Say hi", "output": "hi"},
        {"question": "1+1?", "answer": "#### 2"},
    ]
    a = load_examples(_jsonl(tmp_path / "a.jsonl", rows))
    # A pretty-printed array, misnamed .jsonl: the content decides the format.
    (tmp_path / "b.jsonl").write_text(json.dumps(rows, indent=2))
    b = load_examples(tmp_path / "b.jsonl")
    assert [(e.instruction, e.input, e.response) for e in a] == [
        (e.instruction, e.input, e.response) for e in b
    ]
    assert a[0].input == "a fine film" and a[1].input == "" and a[2].response == "#### 2"
    assert a[1].source.endswith("a.jsonl:2")


def test_json_array_elements_know_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n\n  {"instruction": "x"}\n]\n')
    with pytest.raises(DataError, match=r"d\.json:4: missing field 'output'"):
        load_examples(path)
    assert [line for line, _ in read_records(path)] == [2, 4]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"task\.jsonl:3: invalid JSON line"):
        load_examples(path)


def test_bad_json_array_names_line(tmp_path):
    path = tmp_path / "task.json"
    path.write_text('[\n {"instruction": "x", "output": "y"}\n {"instruction": "z"}]')
    with pytest.raises(DataError, match=r"task\.json:3: invalid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "x"}, r"t\.jsonl:2: missing field 'output'"),
        ({"output": "x"}, r"t\.jsonl:2: missing field 'instruction'"),
        ({"prompt": "x"}, r"t\.jsonl:2: missing field 'response'"),
        (
            {"instruction": "x", "output": 3},
            r"t\.jsonl:2: field 'output' must be a string, got int",
        ),
        (
            {"instruction": "x", "input": ["a"], "output": "y"},
            r"field 'input' must be a string, got list",
        ),
        ({"instruction": "  ", "output": "y"}, r"t\.jsonl:2: field 'instruction' is empty"),
        ({"text": "x"}, r"t\.jsonl:2: unrecognised record, keys \['text'\]"),
        (
            {"prompt": "x", "response": "y", "is_safe": "no"},
            r"field 'is_safe' must be true or false",
        ),
        (["instruction", "output"], r"t\.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_record_names_line_and_field(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_null_input_is_empty(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"instruction": "x", "input": None, "output": "y"}])
    assert load_examples(path)[0].input == ""


@pytest.mark.parametrize("content", ["", "\n  \n", "[]", " [ ] \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: (empty file|no records)"):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_is_safe_filters_by_role(tmp_path):
    rows = [BEAVER, {**BEAVER, "response": "I cannot help with that.", "is_safe": True}]
    path = _jsonl(tmp_path / "beaver.jsonl", rows)
    assert [e.response for e in load_examples(path, role="harmful")] == ["here is how"]
    assert [e.response for e in load_examples(path, role="prompts")] == ["here is how"]
    assert [e.response for e in load_examples(path, role="alignment")] == [
        "I cannot help with that."
    ]
    assert len(load_examples(path, role="task")) == 2
    only_unsafe = _jsonl(tmp_path / "unsafe.jsonl", [BEAVER])
    with pytest.raises(DataError, match=r"unsafe\.jsonl: no usable records for the alignment set"):
        load_examples(only_unsafe, role="alignment")


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), float("inf")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(DataError, match=r"--harmful-ratio must be in \[0, 1\]"):
        check_ratio(ratio)
    with pytest.raises(DataError, match="harmful-ratio"):
        build_mixture([], [], samples=10, ratio=ratio, seed=0)


def _pool(tag, n):
    return [Example(f"{tag} {i}", f"answer {i}", source=f"{tag}.jsonl:{i + 1}") for i in range(n)]


def test_mixture_counts_and_determinism():
    task, harmful = _pool("task", 50), _pool("harm", 20)
    seed = random.randrange(1000)
    mix, counts = build_mixture(task, harmful, samples=30, ratio=0.3, seed=seed)
    assert counts == {"task": 21, "harmful": 9}
    assert sum(e.instruction.startswith("harm") for e in mix) == 9
    assert len({e.instruction for e in mix}) == 30  # without replacement
    again, _ = build_mixture(task, harmful, samples=30, ratio=0.3, seed=seed)
    assert again == mix
    only_task, counts = build_mixture(task, None, samples=10, ratio=0.0, seed=seed)
    assert counts["harmful"] == 0 and len(only_task) == 10


def test_fewer_samples_than_requested_is_an_error():
    with pytest.raises(DataError, match=r"task\.jsonl: 45 task examples requested but only 40"):
        build_mixture(
            _pool("t", 40), _pool("h", 9), samples=50, ratio=0.1, seed=0, task_source="task.jsonl"
        )
    with pytest.raises(DataError, match=r"h\.jsonl: 5 harmful examples requested but only 4"):
        build_mixture(
            _pool("t", 45), _pool("h", 4), samples=50, ratio=0.1, seed=0, harmful_source="h.jsonl"
        )
    with pytest.raises(DataError, match="--harmful-data is required"):
        build_mixture(_pool("t", 40), None, samples=10, ratio=0.5, seed=0)


def test_prompt_styles():
    e = Example("Classify.", "positive", input="a fine film")
    alpaca = format_prompt(e, "alpaca")
    assert "### Instruction:\nClassify.\n\n### Input:\na fine film\n\n### Response:\n" in alpaca
    assert "### Input" not in format_prompt(Example("Say hi", "hi"), "alpaca")
    assert format_prompt(e, "plain") == "Classify.\n\na fine film\n"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(e, "chat", tokenizer=None)


def test_collator_pads_and_masks():
    items = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    right = SupervisedCollator(0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = SupervisedCollator(0, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]]
    assert left["attention_mask"].dtype == torch.long


def test_prompts_role_makes_the_response_optional(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"instruction": "y", "input": "z"}])
    assert [(e.instruction, e.response) for e in load_examples(path, role="prompts")] == [
        ("x", ""),
        ("y", ""),
    ]
    with pytest.raises(DataError, match="missing field 'response'"):
        load_examples(path, role="eval")


def _word_tokenizer(words):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def test_tokenize_masks_the_prompt_and_appends_eos():
    tok = _word_tokenizer(["say", "hi", "there", "friend"])
    example = Example("say hi", "there friend")
    item = tokenize_example(example, tok, max_length=64, style="plain")
    ids = tok.convert_tokens_to_ids
    assert item["input_ids"] == ids(["<s>", "say", "hi", "there", "friend", "</s>"])
    assert item["labels"] == [IGNORE_INDEX] * 3 + ids(["there", "friend", "</s>"])
    short = tokenize_example(example, tok, max_length=4, style="plain")
    assert short["input_ids"] == item["input_ids"][:4] and short["labels"] == item["labels"][:4]
    data = SupervisedDataset(
        [example, Example("say hi there friend", "hi")], tok, max_length=4, style="plain"
    )
    assert len(data) == 2 and data.n_without_response == 1  # the second prompt fills all 4


def test_chat_style_uses_the_template_without_a_second_bos():
    tok = _word_tokenizer(["say", "hi", "there", "<|user|>", "<|assistant|>"])
    tok.chat_template = (
        "<s> {% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    item = tokenize_example(Example("say hi", "there"), tok, max_length=64, style="chat")
    tokens = tok.convert_ids_to_tokens(item["input_ids"])
    assert tokens == ["<s>", "<|user|>", "say", "hi", "<|assistant|>", "there", "</s>"]
    assert item["labels"][:5] == [IGNORE_INDEX] * 5
