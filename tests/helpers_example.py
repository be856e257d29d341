"""The `safegrad train` command line the CLI tests share (fixtures: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def train_argv(world: dict, out: Path | str, *extra: str, steps: int | None = 2) -> list[str]:
    """A small `safegrad train` (16 samples, batch 4) on ``world``'s model and data files
    (``example_world``, or test_cli's own), ``steps`` optimizer steps; ``extra`` win."""
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
