"""What the `safegrad train`/`eval` tests share: the `safegrad example` folder and a tripwire.

``make_example_world`` writes the example model and sample data (about a second);
``block_model_loads`` makes any tokenizer or model load fail the test, to prove that a
refusal happened before anything loaded. The test modules wrap them in fixtures of their
own (tests/conftest.py, the place for shared fixtures, was being edited elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from safegrad_kernels import evaluation_run, training_run
from safegrad_kernels.example import write_example


def make_example_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("example")
    written = write_example(root / "ex")
    data = Path(written["data_dir"])
    return {
        "root": root,
        "model": str(written["model"]),
        "task": str(data / "sentiment_train.json"),
        "task_eval": str(data / "sentiment_eval.jsonl"),
        "harmful": str(data / "harmful.jsonl"),
        "alignment": str(data / "refusals.jsonl"),
        "harmful_eval": str(data / "harmful_eval.json"),
        "written": written,
    }


def train_argv(world: dict, out: Path | str, *extra: str, steps: int | None = 2) -> list[str]:
    """A small `safegrad train` (16 samples, batch 4) on the example model."""
    argv = [
        "train",
        "--model", world["model"],
        "--output-dir", str(out),
        "--task-data", world["task"],
        "--harmful-data", world["harmful"],
        "--alignment-data", world["alignment"],
        "--samples", "16",
        "--harmful-ratio", "0.25",
        "--alignment-samples", "4",
        "--batch-size", "4",
        "--learning-rate", "1e-3",
        "--max-length", "96",
        "--logging-steps", "1",
        "--save-steps", "2",
    ]  # fmt: skip
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    return [*argv, *extra]


def block_model_loads(monkeypatch) -> None:
    """Fail the test if a tokenizer or model is loaded."""

    def tripwire(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded")

    for module in (training_run, evaluation_run):
        for name in ("load_tokenizer", "load_causal_lm"):
            monkeypatch.setattr(module, name, tripwire)
