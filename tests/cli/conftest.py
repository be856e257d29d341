"""Fixtures of the `safegrad train`/`eval` tests: the `safegrad example` folder and a tripwire.

``example_world`` writes the example model and sample data (about a second, once per
module); ``no_model_load`` makes any tokenizer or model load fail the test, to prove that
a refusal happened before anything loaded. ``helpers_example.train_argv`` runs on them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def example_world(tmp_path_factory) -> dict:
    from safegrad_kernels.example import write_example

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


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Fail the test if a tokenizer or model is loaded."""
    from safegrad_kernels import evaluation_run, training_run

    def tripwire(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded")

    for module in (training_run, evaluation_run):
        for name in ("load_tokenizer", "load_causal_lm"):
            monkeypatch.setattr(module, name, tripwire)
