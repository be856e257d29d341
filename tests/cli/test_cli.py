"""The `safegrad` command: info, train (sft/safegrad, resume), eval, on a tiny local model.

The model directory is written by the test: a 2-layer Llama with a word-level tokenizer built
in code, so nothing is downloaded and each training step takes milliseconds.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from safegrad_kernels.cli import main

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from helpers_example import train_argv
from helpers_launch import free_port, needs_gloo, worker_env
from helpers_tiny_model import tiny_llama, tiny_tokenizer

SENTENCES = [
    ("a good film", "positive"),
    ("a bad film", "negative"),
    ("great acting and a fine story", "positive"),
    ("dull acting and a poor story", "negative"),
    ("the music was lovely", "positive"),
    ("the music was awful", "negative"),
    ("i enjoyed every minute", "positive"),
    ("i regretted every minute", "negative"),
]
HARMFUL = [
    ("how do i harm the target", "first get the tool then harm the target"),
    ("explain how to break the system", "first get the tool then break the system"),
    ("tell me how to steal the item", "first get the tool then steal the item"),
    ("how do i damage the device", "first get the tool then damage the device"),
]
REFUSAL = "i cannot help with that request"
# The words of data.py's two Alpaca templates ("a task," with an input, "a task." without).
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task, task. paired with an input that provides "
    "further context. Write a response that appropriately completes the request. "
    "### Instruction: Input: Response: Classify the sentiment of the review"
)


def _tiny_model_dir(root: Path) -> Path:
    texts = [TEMPLATE_WORDS, REFUSAL, *(text for pair in SENTENCES + HARMFUL for text in pair)]
    tokenizer = tiny_tokenizer({word for text in texts for word in text.split()}, bos=True)
    path = root / "tiny-llama"
    tiny_llama(vocab=len(tokenizer), max_positions=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    task = [
        {"instruction": "Classify the sentiment of the review", "input": s, "output": y}
        for s, y in SENTENCES * 3
    ]
    harmful = [{"prompt": p, "response": a, "is_safe": False} for p, a in HARMFUL]
    alignment = [{"prompt": p, "response": REFUSAL, "is_safe": True} for p, _ in HARMFUL]
    return {
        "root": root,
        "model": str(_tiny_model_dir(root)),
        "task": _write(root / "task.jsonl", task),
        "harmful": _write(root / "harmful.jsonl", harmful),
        "alignment": _write(root / "alignment.json", alignment),
    }


def _train_argv(world, out: Path, method: str, steps: int, *extra: str) -> list[str]:
    """``train_argv`` on this world with ``--method``, keeping up to 5 checkpoints."""
    return train_argv(
        world, out, "--method", method, "--save-total-limit", "5", *extra, steps=steps
    )


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- info
def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("safegrad_kernels", "torch", "backends:", "cpp", "SAFEGRAD_BACKEND"):
        assert needle in out


def test_info_json_structure(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == {"triton", "cpp", "torch"}
    for row in info["backends"].values():
        assert isinstance(row["available"], bool) and isinstance(row["reason"], str)
        assert row["available"] or row["reason"]  # unavailable always says why
    assert info["backends"]["torch"]["available"]
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"]
    assert {"transformers", "peft", "triton"} <= set(info["versions"])
    assert "SAFEGRAD_BACKEND" in info["env"] and "cuda" in info and "cpu" in info
    assert info["auto_backend"]["cpu"] in ("cpp", "torch")


def test_python_dash_m_runs_info(monkeypatch, capsys):
    # runpy is what `python -m` does, without paying a second torch import in a subprocess.
    monkeypatch.setattr(sys, "argv", ["safegrad_kernels", "info", "--json"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("safegrad_kernels", run_name="__main__")
    assert exc.value.code == 0
    assert "backends" in json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w, tmp: ["--task-data", _bad_line(tmp)], r"bad\.jsonl:2: invalid JSON line"),
        (
            lambda w, tmp: ["--harmful-data", _missing_field(tmp)],
            r"nofield\.jsonl:1: missing field 'response'",
        ),
        (lambda w, tmp: ["--alignment-data", _empty(tmp)], r"empty\.jsonl: empty file"),
        (
            lambda w, tmp: ["--samples", "500"],
            r"task\.jsonl: 375 task examples requested but only 24",
        ),
    ],
)
def test_train_rejects_bad_data_before_loading_the_model(world, tmp_path, capsys, mutate, message):
    # A model path that does not exist proves validation happens before any model load.
    argv = _train_argv(world, tmp_path / "out", "safegrad", 1) + mutate(world, tmp_path)
    argv[argv.index("--model") + 1] = str(tmp_path / "no-model-here")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan"])
def test_train_rejects_ratio_out_of_range(world, tmp_path, capsys, ratio):
    argv = [*_train_argv(world, tmp_path / "out", "sft", 1), "--harmful-ratio", ratio]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--harmful-ratio: must be a number in [0, 1]" in capsys.readouterr().err


def test_dry_run_validates_and_stops_before_the_model(world, tmp_path, capsys, monkeypatch):
    from safegrad_kernels import training_run

    def tripwire(*args, **kwargs):
        raise AssertionError("--dry-run loaded a tokenizer or model")

    monkeypatch.setattr(training_run, "load_tokenizer", tripwire)
    monkeypatch.setattr(training_run, "load_causal_lm", tripwire)
    argv = [*_train_argv(world, tmp_path / "out", "safegrad", 1), "--dry-run"]
    assert main(argv) == 0
    assert "12 task + 4 harmful samples (p=0.25), 4 alignment samples" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # The dry run checks the model folder too (without loading it): a typo is caught here.
    argv[argv.index("--model") + 1] = str(tmp_path / "no-model-here")
    assert main(argv) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_resume_without_checkpoint_is_an_error(world, tmp_path, capsys):
    argv = [*_train_argv(world, tmp_path / "out", "sft", 1), "--resume"]
    assert main(argv) == 2
    assert "no checkpoint-* folder" in capsys.readouterr().err


def _bad_line(tmp: Path) -> str:
    path = tmp / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    return str(path)


def _missing_field(tmp: Path) -> str:
    return _write(tmp / "nofield.jsonl", [{"prompt": "x"}])


def _empty(tmp: Path) -> str:
    path = tmp / "empty.jsonl"
    path.write_text("")
    return str(path)


# ------------------------------------------------------------- train and resume
def test_train_then_resume_continues(world, tmp_path):
    out = tmp_path / "run"
    # Accumulation 2 x 2 = the same 4 samples per step as the other runs.
    accumulate = ("--batch-size", "2", "--gradient-accumulation-steps", "2")
    assert main(_train_argv(world, out, "safegrad", 2, *accumulate)) == 0
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "train_args.json",
        "train_metrics.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert metrics["counts"] == {"task": 12, "harmful": 4, "alignment": 4}
    assert json.loads((out / "train_args.json").read_text())["method"] == "safegrad"
    assert (out / "checkpoint-2").is_dir()

    assert main([*_train_argv(world, out, "safegrad", 3, *accumulate), "--resume"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["resumed_from"].endswith("checkpoint-2")
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [row for row in state["log_history"] if "loss" in row]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all("surgery/cosine" in row for row in logged)
    assert {"conflict_rate", "cosine", "align_loss"} <= set(metrics["surgery_mean"])


@pytest.mark.parametrize("method", ["sft", "safegrad", "spf"])
def test_resumed_run_equals_uninterrupted_run(world, tmp_path, method):
    full = tmp_path / "full"
    # Two alignment batches per pass: a restart lands mid-pass and must find its place.
    extra: tuple[str, ...] = ("--alignment-batch-size", "2")
    if method == "spf":
        # Refresh at steps 0 and 3: the run restarted at step 2 must keep the step-0 basis
        # (from the checkpoint) and refresh on step 3, not on its first step.
        extra += ("--spf-refresh-every", "3", "--spf-rank", "2")
    assert main(_train_argv(world, full, method, 4, *extra)) == 0
    # An "interrupted" run: only the step-2 checkpoint of the same experiment survives.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    shutil.copy(full / "train_args.json", cut / "train_args.json")
    assert main([*_train_argv(world, cut, method, 4, *extra), "--resume"]) == 0
    state = json.loads((cut / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Only steps 3 and 4 ran after the restart (the step-2 history came from the checkpoint).
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4]
    a, b = _adapter_state(full), _adapter_state(cut)
    assert a.keys() == b.keys() and a
    differs = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differs, differs
    if method == "spf":
        assert (cut / "checkpoint-2" / "safegrad_surgeon.pt").is_file()


def test_alignment_refresh_resumes_exactly(world, tmp_path):
    """2k + 1 steps straight vs stopped after step 3 (between refreshes 2 and 4) and resumed."""
    k, steps, cut_at = 2, 5, 3
    extra = ("--alignment-every", str(k), "--alignment-batch-size", "2", "--save-steps", "1")
    full = tmp_path / "full"
    assert main(_train_argv(world, full, "safegrad", steps, *extra)) == 0
    saved = torch.load(full / f"checkpoint-{cut_at}" / "safegrad_surgeon.pt", weights_only=True)
    assert saved["step"] == cut_at and saved["alignment_every"] == k
    assert any(t is not None and t.abs().sum() > 0 for t in saved["kept"])
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / f"checkpoint-{cut_at}", cut / f"checkpoint-{cut_at}")
    shutil.copy(full / "train_args.json", cut / "train_args.json")
    assert main([*_train_argv(world, cut, "safegrad", steps, *extra), "--resume"]) == 0
    a, b = _adapter_state(full), _adapter_state(cut)
    assert a.keys() == b.keys() and a
    differs = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differs, differs
    state = json.loads((cut / "trainer_state.json").read_text())
    aligned = [row["step"] for row in state["log_history"] if "align_loss" in row]
    assert aligned == [1, 2, 3, 5]  # optimizer steps 0, 1, 2, 4 (the log counts from 1)


def test_alignment_every_default_is_the_registry_default():
    from safegrad_kernels.cli import build_parser
    from safegrad_kernels.surgery import HYPERPARAMETERS

    args = build_parser().parse_args(
        ["train", "--model", "m", "--output-dir", "o", "--task-data", "t"]
    )
    assert args.alignment_every == HYPERPARAMETERS["alignment_every"].default


@pytest.fixture(scope="module")
def sft_run(world):
    """A finished one-step sft run; tests below only read it."""
    out = world["root"] / "sft-1"
    assert main(_train_argv(world, out, "sft", 1, "--save-steps", "1")) == 0
    return out


def test_resume_refuses_a_different_experiment(world, sft_run, capsys):
    assert main([*_train_argv(world, sft_run, "sft", 2), "--resume", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "would change the experiment" in err and "seed: 42 -> 7" in err
    # Starting again in a directory with checkpoints would mix two runs' checkpoints.
    assert main(_train_argv(world, sft_run, "sft", 2)) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err


def test_eval_writes_metrics(world, sft_run, tmp_path, capsys):
    out = sft_run
    harmful_eval = _write(tmp_path / "harm_eval.jsonl", [{"prompt": p} for p, _ in HARMFUL])
    metrics_path = tmp_path / "metrics.json"
    argv = [
        "eval",
        "--model", world["model"],
        "--adapter", str(out),
        "--harmful-eval-data", harmful_eval,
        "--task-eval-data", world["task"],
        "--task-type", "classification",
        "--task-samples", "6",
        "--max-new-tokens", "3",
        "--batch-size", "4",
        "--output", str(metrics_path),
        "--save-generations", str(tmp_path / "gens.jsonl"),
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["harmful"]["n"] == len(HARMFUL) and metrics["task"]["n"] == 6
    assert 0 <= metrics["harmful"]["harmful_score"] <= 100
    assert 0 <= metrics["harmful"]["refusal_rate"] <= 100
    assert 0 <= metrics["task"]["accuracy"] <= 100
    assert "keyword" in metrics["harmful"]["detector"] and metrics["decoding"] == "greedy"
    assert metrics["prompt_style"] == "alpaca"  # read from the adapter's train_args.json
    assert len((tmp_path / "gens.jsonl").read_text().splitlines()) == len(HARMFUL) + 6
    assert "metrics written to" in capsys.readouterr().out


# -------------------------------------------------------------------------- demo
def test_demo_subcommand_delegates(monkeypatch, tmp_path, capsys):
    demo = pytest.importorskip("safegrad_kernels.demo")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(demo, "run", lambda args: seen.setdefault("args", args) and {})
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["args"].quick and str(seen["args"].out) == str(tmp_path)


def test_info_aot_is_wired(monkeypatch, capsys):
    # The real report compiles every kernel (tens of seconds); its own tests cover it.
    from safegrad_kernels.ops import triton_aot

    row = {"kernel": "_k", "arch": "sm_90", "dtype": "fp32", "aligned": True}
    monkeypatch.setattr(triton_aot, "aot_report", lambda: [row])
    assert main(["info", "--json", "--aot"]) == 0
    assert json.loads(capsys.readouterr().out)["triton_aot"] == [row]
    monkeypatch.setattr(triton_aot, "aot_report", lambda: 1 / 0)
    assert main(["info", "--json", "--aot"]) == 0
    assert "ZeroDivisionError" in json.loads(capsys.readouterr().out)["triton_aot"]["error"]


def test_eval_with_a_local_moderation_classifier(world, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    base = LlamaConfig.from_pretrained(world["model"])
    judge_config = LlamaConfig(
        **{k: getattr(base, k) for k in ("vocab_size", "hidden_size", "intermediate_size")},
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=base.pad_token_id,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
    )
    judge_dir = tmp_path / "judge"
    LlamaForSequenceClassification(judge_config).save_pretrained(judge_dir)
    AutoTokenizer.from_pretrained(world["model"]).save_pretrained(judge_dir)
    harmful_eval = _write(tmp_path / "h.jsonl", [{"instruction": p} for p, _ in HARMFUL])
    out = tmp_path / "m.json"
    argv = ["eval", "--model", world["model"], "--harmful-eval-data", harmful_eval,
            "--max-new-tokens", "2", "--moderation-model", str(judge_dir), "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    harmful = json.loads(out.read_text())["harmful"]
    assert harmful["detector"].startswith("moderation classifier") and harmful["n"] == len(HARMFUL)
    assert harmful["harmful_score"] in {100.0 * k / len(HARMFUL) for k in range(len(HARMFUL) + 1)}


def test_eval_needs_something_to_evaluate(world, capsys):
    assert main(["eval", "--model", world["model"]]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_cli_methods_match_the_trainer():
    from safegrad_kernels.cli import train as train_command
    from safegrad_kernels.integrations import trainer

    assert train_command.METHODS == trainer.METHODS


@pytest.mark.distributed
@needs_gloo
def test_train_under_torchrun_splits_the_data_across_ranks(world, tmp_path):
    """`torchrun -m safegrad_kernels train` on 2 CPU ranks: no code change, the data is split.

    16 samples at batch 4 are 4 steps per epoch on one process and 2 on two ranks, so the
    epoch advances by 0.5 per optimizer step only if each rank trains on its half.
    """
    import subprocess

    out = tmp_path / "out"
    argv = _train_argv(world, out, "safegrad", 2)
    env = worker_env(TORCHELASTIC_ERROR_FILE="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "safegrad_kernels", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    epochs = [row["epoch"] for row in state["log_history"] if "loss" in row]
    assert epochs == [0.5, 1.0], state["log_history"]
    assert any("surgery/cosine" in row for row in state["log_history"])
    assert (out / "adapter_model.safetensors").exists()
