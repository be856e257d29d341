"""`safegrad example`, and what `safegrad train` prints and draws for a person to read.

The end-to-end test runs the commands exactly as `safegrad example` prints them.
"""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")


from helpers_example import train_argv
from paths import ROOT

from safegrad_kernels import data
from safegrad_kernels.cli import main
from safegrad_kernels.example import sample_records, write_example

README = ROOT / "README.md"


def _printed_commands(out: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("  safegrad ")]


def test_example_commands_run_as_printed(tmp_path, capsys):
    folder = tmp_path / "try it"  # a space: the printed commands must quote paths
    assert main(["example", str(folder)]) == 0
    commands = _printed_commands(capsys.readouterr().out)
    assert [c[0] for c in commands] == ["train", "eval", "eval"]

    assert main(commands[0]) == 0
    said = capsys.readouterr().out
    run = folder / "run-safegrad"
    # The plan first, then one line per logging step, then the summary.
    assert said.startswith("safegrad train: safegrad on ")
    for needle in ("10 optimizer steps (2 epochs x 5 steps", "AdamW lr 0.001", "LoRA        r 8",
                   "--rho 1.0", f"output      {run} (new)"):  # fmt: skip
        assert needle in said, needle
    steps = re.findall(r"^step +(\d+)/10  loss [\d.]+  align \S+  conflict \d+%  cos [+-][\d.]+",
                       said, flags=re.M)  # fmt: skip
    assert steps == ["2", "4", "6", "8", "10"], said
    # lr 0 on step 1 (warm-up): g_a is 0, or with the reference store a rounding residue.
    assert "at the start: model == reference" in said
    assert "{'loss'" not in said  # no raw log dicts
    summary = said[said.index("finished: step 10") :]
    assert "final loss" in summary and "conflict rate" in summary and " s;" in summary
    assert "training_curves.png" in summary and "adapter_model.safetensors" in summary
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "train_args.json").read_text())["prompt_style"] == "chat"

    for argv in commands[1:]:
        assert main(argv) == 0
    metrics = json.loads((run / "eval_metrics.json").read_text())
    assert metrics["prompt_style"] == "chat"  # taken from the adapter's train_args.json
    assert metrics["harmful"]["n"] == 8 and metrics["task"]["n"] == 12
    gsm8k = json.loads((run / "eval_gsm8k.json").read_text())
    assert gsm8k["task"]["task_type"] == "gsm8k" and gsm8k["task"]["n"] == 3

    # Again into the same folder: ours, so rewritten, and the earlier run is pointed out.
    assert main(["example", str(folder)]) == 0
    assert "holds an earlier run" in capsys.readouterr().out


def test_example_data_covers_every_format_and_loads(tmp_path):
    written = write_example(tmp_path / "ex")
    formats = {(fmt, name.rsplit(".", 1)[1]) for name, (fmt, _, _) in written["files"].items()}
    assert formats == {
        (f, ext) for f in ("alpaca", "beavertails", "gsm8k") for ext in ("json", "jsonl")
    }
    # Each file loads for the role the printed commands give it.
    roles = {"harmful.jsonl": "harmful", "refusals.jsonl": "alignment",
             "harmful_eval.json": "prompts"}  # fmt: skip
    for name, (_, _, rows) in sample_records().items():
        examples = data.load_examples(written["data_dir"] / name, role=roles.get(name, "task"))
        assert len(examples) == len(rows), name
    tokenizer = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(
        str(written["model"]), local_files_only=True
    )
    text = "any text, even ünïcode and 😀, encodes without an unknown token"
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_example_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("mine\n")
    assert main(["example", str(tmp_path)]) == 2
    assert "not a `safegrad example` folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_readme_shows_the_example_after_the_first_two_commands_and_its_commands(tmp_path):
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line for line in first.splitlines() if not line.startswith("#")]
    # After the torch line (which build, per machine: see "Install"), the two first commands.
    commands = [c for c in commands if not c.startswith("pip install torch")]
    assert len(commands) == 3 and commands[2] == "safegrad example ./safegrad_example"
    # The commands the README lists are the ones `safegrad example ./safegrad_example` prints.
    written = write_example(tmp_path / "safegrad_example")
    expected = [
        shlex.join(["safegrad", *argv]).replace(str(tmp_path) + "/", "")
        for argv in written["commands"]
    ]
    shown = [
        line
        for line in text.splitlines()
        if line.startswith("safegrad ") and "safegrad_example/" in line
    ]
    assert shown == expected


# ----------------------------------------------------------- console, curves, plan
def test_log_lines():
    from safegrad_kernels.integrations.progress import format_log_line

    start = {"loss": 4.4571, "learning_rate": 0.0, "align_loss": 0.0, "surgery/dot": 0.0,
             "surgery/ref_norm_sq": 0.0, "surgery/cosine": 0.0, "surgery/conflict_rate": 0.0}  # fmt: skip
    assert format_log_line(start, 1, 40) == (
        "step  1/40  loss 4.457  align 0  conflict 0%  cos +0.00  lr 0  "
        "(g_a = 0 at the start: model == reference)"
    )
    later = {**start, "align_loss": 2.85e-5, "surgery/ref_norm_sq": 2.2e-11,
             "surgery/cosine": -0.6322, "surgery/conflict_rate": 0.75, "learning_rate": 1e-5}  # fmt: skip
    assert format_log_line(later, 13, 40) == (
        "step 13/40  loss 4.457  align 2.85e-05  conflict 75%  cos -0.63  lr 1e-05"
    )
    spf = {"loss": 2.0, "align_loss": 1.5, "surgery/conflict_fraction": 0.25,
           "surgery/removed_energy": 0.031}  # fmt: skip
    assert (
        format_log_line(spf, 3, 9)
        == "step 3/9  loss 2  align 1.5  conflict 25%  removed 3.1% of |g_u|^2"
    )
    mixed_at_start = {"loss": 2.0, "align_loss": 0.0}
    assert format_log_line(mixed_at_start, 1, 9).endswith(
        "(KL = 0 at the start: model == reference)"
    )
    assert format_log_line({"loss": 1.25, "grad_norm": 3.0}, 7, 9) == "step 7/9  loss 1.25"


def _history(n: int) -> list[dict]:
    return [{"step": s, "loss": 3.0 - 0.1 * s, "align_loss": 0.01 * s, "surgery/cosine": -0.3,
             "surgery/conflict_rate": 0.5} for s in range(1, n + 1)]  # fmt: skip


def test_training_curves_png_and_a_summary_without_matplotlib(tmp_path, monkeypatch):
    from safegrad_kernels.integrations import progress

    assert progress.write_training_curves(_history(7), tmp_path / "c.png") is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        progress.write_training_curves([], tmp_path / "none.png") == "no training step was logged"
    )

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    console = progress.TrainingConsole(bar=False)
    console.history = _history(5)
    console.curves_missing = progress.write_training_curves(console.history, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "adapter_config.json").write_text("{}")
    lines = console.summary(12.34, tmp_path)
    assert lines[0] == ("finished: step 5 in 12.3 s; final loss 2.5 (first logged 2.9); final "
                        "align loss 0.05; conflict rate 50% of steps, mean cos -0.30")  # fmt: skip
    assert lines[1].startswith(f"wrote to {tmp_path}: ") and "adapter_config.json" in lines[1]
    assert (
        lines[2]
        == "training_curves.png not written: matplotlib is not installed (pip install matplotlib)"
    )


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("safegrad", "method      safegrad --rho 0.5 --surgery-granularity global --alignment-every 1 --alignment-loss kl "
                     "--kl-positions response --alignment-batch-size 3"),
        ("spf", "method      spf --spf-rank 8 --spf-refresh-every 0 --spf-mode conflicting "
                "--alignment-loss ce --alignment-batch-size 3"),
        ("mixed", "method      mixed --lam 1.0 --alignment-loss kl --kl-positions response "
                  "--alignment-batch-size 3"),
        ("sft", "method      sft (no alignment)"),
    ],
)  # fmt: skip
def test_dry_run_plan_lists_every_setting(
    example_world, no_model_load, tmp_path, capsys, method, expected
):
    out = tmp_path / "out"
    argv = train_argv(example_world, out, "--method", method, "--rho", "0.5",
                      "--alignment-batch-size", "3", "--lora-r", "5", "--epochs", "3",
                      "--gradient-accumulation-steps", "3", "--dry-run", steps=None)  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    lines = said.splitlines()
    assert lines[0] == f"safegrad train: {method} on {example_world['model']}"
    # 16 samples, batch 4: 4 micro-batches, steps of 3 -> 2 steps per epoch, 3 epochs.
    assert (
        "  schedule    6 optimizer steps (3 epochs x 2 steps; 12 samples per step = batch 4 x accumulation 3 x 1 process(es))"
        in lines
    )
    assert any(
        x.startswith("  optimizer   AdamW lr 0.001, constant_with_warmup, warmup 0.1")
        for x in lines
    )
    assert "  LoRA        r 5, alpha 16, dropout 0.1, on q_proj,k_proj,v_proj" in lines
    assert f"  {expected}" in lines
    assert any(x.startswith(f"  output      {out} (new); checkpoints every 2 steps") for x in lines)
    assert lines[-1] == "dry run: nothing loaded, nothing written"
    assert not out.exists()
