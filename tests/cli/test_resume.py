"""`safegrad train`'s output folder: the user's files are never touched; resume is idempotent.

Runs on the `safegrad example` model (16 samples, batch 4), a few steps each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


from helpers_example import train_argv

from safegrad_kernels.cli import main
from safegrad_kernels.training_run import RUN_MARKER


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 of its bytes (and its mtime, to see rewrites)."""
    return {
        str(
            p.relative_to(folder)
        ): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ the user's files
def test_a_folder_that_is_not_a_run_is_refused_and_left_byte_identical(
    example_world, no_model_load, tmp_path, capsys
):
    out = tmp_path / "my-project"
    out.mkdir()
    readme = "# My project\n\nNotes that PEFT's model card must not replace.\n"
    (out / "README.md").write_text(readme)
    before = _snapshot(out)
    assert main(train_argv(example_world, out)) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "not a safegrad run" in err and "--overwrite" in err
    assert _snapshot(out) == before and (out / "README.md").read_text() == readme
    # --dry-run says the same (it checks everything a run would).
    assert main([*train_argv(example_world, out), "--dry-run"]) == 2
    assert _snapshot(out) == before


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(
    example_world, no_model_load, tmp_path, capsys
):
    target = tmp_path / "results.txt"
    target.write_text("mine\n")
    assert main(train_argv(example_world, target)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is a file; expected a folder (new or empty)") and str(target) in err
    assert target.read_text() == "mine\n"


def test_overwrite_trains_into_a_foreign_folder_and_marks_it(example_world, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    assert main([*train_argv(example_world, out, "--method", "sft", steps=1), "--overwrite"]) == 0
    assert (out / RUN_MARKER).is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "notes.txt").read_text() == "kept\n"  # a file we do not write stays
    # Now it is one of our runs: no --overwrite needed to look at it again.
    assert main([*train_argv(example_world, out, "--method", "sft", steps=1), "--resume"]) == 0
    assert "already finished at step 1" in capsys.readouterr().out


# ------------------------------------------------------------------------- resume
def test_resume_of_a_finished_run_changes_nothing_and_max_steps_is_exact(
    example_world, tmp_path, capsys
):
    out = tmp_path / "run"
    # Keep 1 checkpoint: any step trained again would rotate the kept one away.
    argv = train_argv(example_world, out, "--save-total-limit", "1", steps=3)
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 3
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # the last step
    before = _snapshot(out)
    capsys.readouterr()

    assert main([*argv, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "already finished at step 3" in said and "nothing changed" in said
    assert _snapshot(out) == before  # nothing trained, deleted or rewritten

    # Raising --max-steps continues to exactly that step, from the step-3 checkpoint.
    longer = train_argv(example_world, out, "--save-total-limit", "1", steps=5)
    assert main([*longer, "--resume"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4, 5]
    assert json.loads((out / "train_metrics.json").read_text())["global_step"] == 5


def test_resume_of_a_finished_epoch_run_keeps_its_metrics(example_world, tmp_path, capsys):
    out = tmp_path / "epochs"
    # 16 samples at batch 3: 6 micro-batches, 3 steps of 2 per epoch; 1.5 epochs = 5 steps.
    argv = train_argv(
        example_world, out, "--method", "sft", "--epochs", "1.5", "--batch-size", "3",
        "--gradient-accumulation-steps", "2", steps=None,
    )  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    assert "5 optimizer steps (1.5 epochs x 3 steps" in capsys.readouterr().out
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["max_steps"] == 5 and state["global_step"] == 5  # the plan's count
    metrics = (out / "train_metrics.json").read_bytes()
    assert json.loads(metrics)["train_loss"] > 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "already finished at step 5" in capsys.readouterr().out
    assert (out / "train_metrics.json").read_bytes() == metrics
    assert _snapshot(out) == before
