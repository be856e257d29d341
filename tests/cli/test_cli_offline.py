"""`safegrad train`/`eval` are offline by guarantee and refuse bad paths in one line.

Every refusal here happens before any tokenizer or model loads (``no_model_load``), exits
with code 2 and prints one line naming the flag and the path. One test runs the CLI in a
fresh interpreter whose sockets raise, so any attempt to reach a hub fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers_example import train_argv

from safegrad_kernels.cli import main


def _bad_model_dirs(root: Path, model: str) -> dict[str, tuple[str, str]]:
    """name -> (path, what the one-line message must say)."""
    root.mkdir(exist_ok=True)
    file = root / "weights.bin"
    file.write_bytes(b"\x00\x01")
    (root / "not-a-model").mkdir(exist_ok=True)
    (root / "not-a-model" / "notes.txt").write_text("hello\n")
    no_tok = root / "config-only"
    no_tok.mkdir(exist_ok=True)
    shutil.copy(Path(model) / "config.json", no_tok / "config.json")
    return {
        "hub id": ("meta-llama/Llama-3-8B", "hf download meta-llama/Llama-3-8B"),
        "missing": (str(root / "Llama-3-8B-Instruct"), "no such folder"),
        "file": (str(file), "is a file"),
        "no config": (str(root / "not-a-model"), "no config.json"),
        "no tokenizer": (str(no_tok), "no tokenizer files"),
    }


def _one_line_error(capsys, flag: str, path: str, needle: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert flag in lines[0] and path in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("case", ["hub id", "missing", "file", "no config", "no tokenizer"])
@pytest.mark.parametrize("command", ["train --model", "eval --model", "eval --moderation-model"])
def test_bad_model_path_is_one_line_before_loading(
    example_world, no_model_load, tmp_path, capsys, command, case
):
    path, needle = _bad_model_dirs(tmp_path / "paths", example_world["model"])[case]
    name, flag = command.split()
    if name == "train":
        argv = train_argv(example_world, tmp_path / "out")
        argv[argv.index("--model") + 1] = path
    else:
        argv = ["eval", "--model", example_world["model"]]
        argv += ["--harmful-eval-data", example_world["harmful_eval"]]
        if flag == "--model":
            argv[2] = path
        else:
            argv += [flag, path]
    assert main(argv) == 2
    _one_line_error(capsys, flag, path, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp, model: str(tmp / "runs" / "nope"), "no such folder"),
        (lambda tmp, model: model, "no adapter_config.json"),  # a model, not an adapter
        (lambda tmp, model: str(Path(model) / "config.json"), "is a file"),
    ],
)
def test_bad_adapter_path_is_one_line_before_loading(
    example_world, no_model_load, tmp_path, capsys, make, needle
):
    adapter = make(tmp_path, example_world["model"])
    argv = ["eval", "--model", example_world["model"], "--adapter", adapter,
            "--harmful-eval-data", example_world["harmful_eval"]]  # fmt: skip
    assert main(argv) == 2
    _one_line_error(capsys, "--adapter", adapter, needle)


def test_chat_style_without_a_chat_template_is_refused_before_loading(
    example_world, no_model_load, tmp_path, capsys
):
    model = tmp_path / "no-template"
    shutil.copytree(example_world["model"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    argv = train_argv(example_world, tmp_path / "out", "--prompt-style", "chat")
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == 2
    _one_line_error(capsys, "--prompt-style chat", str(model), "no chat template")
    # The example model has one: the same check passes there (and the dry run stops).
    argv = train_argv(example_world, tmp_path / "out", "--prompt-style", "chat", "--dry-run")
    assert main(argv) == 0


def test_eval_output_that_is_a_folder_is_refused(example_world, no_model_load, tmp_path, capsys):
    argv = ["eval", "--model", example_world["model"], "--output", str(tmp_path),
            "--harmful-eval-data", example_world["harmful_eval"]]  # fmt: skip
    assert main(argv) == 2
    _one_line_error(capsys, "--output", str(tmp_path), "is a folder")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model", "m"], "the following arguments are required: --output-dir"),
        (["train", "--model", "m", "--output-dir", "o", "--bogus"], "unrecognized arguments"),
        (["train", "--model", "m", "--output-dir", "o", "--samples", "0"], "--samples"),
        (["eval", "--model", "m", "--task-type", "nope"], "invalid choice"),
        (["nope"], "invalid choice"),
    ],
)
def test_usage_errors_are_the_error_and_a_hint(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines  # not the 30-line usage
    assert needle in lines[0]
    command = "safegrad" if argv == ["nope"] else f"safegrad {argv[0]}"
    assert lines[0].startswith(f"{command}: error:")
    assert lines[1] == f"(`{command} --help` for usage)"


_NO_NETWORK = r"""
import json, os, socket, sys

attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network access attempted in an offline test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from safegrad_kernels.cli import main

root = sys.argv[1]
codes = {}
codes["example"] = main(["example", f"{root}/ex"])
m, d = f"{root}/ex/tiny-llama", f"{root}/ex/data"
common = ["--task-data", f"{d}/sentiment_train.json", "--harmful-data", f"{d}/harmful.jsonl",
          "--alignment-data", f"{d}/refusals.jsonl", "--samples", "8", "--alignment-samples",
          "2", "--batch-size", "4", "--max-length", "64", "--logging-steps", "1"]
codes["hub id"] = main(["train", "--model", "meta-llama/Llama-3-8B", "--output-dir",
                        f"{root}/hub", *common])
codes["train"] = main(["train", "--model", m, "--output-dir", f"{root}/run", "--max-steps", "1",
                       "--prompt-style", "chat", *common])
codes["eval"] = main(["eval", "--model", m, "--adapter", f"{root}/run", "--harmful-eval-data",
                      f"{d}/harmful_eval.json", "--harmful-samples", "2",
                      "--max-new-tokens", "2"])
env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
print("RESULT " + json.dumps({"codes": codes, "attempts": attempts, "env": env}))
"""


def test_the_cli_never_opens_a_network_connection(tmp_path):
    # A fresh interpreter, so that the offline switches are set before transformers loads
    # (this one imported it long ago) and every socket is a tripwire from the start.
    root = ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(key, None)  # the CLI must set them itself
    proc = subprocess.run(
        [sys.executable, "-c", _NO_NETWORK, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["attempts"] == [], result["attempts"]
    assert result["codes"] == {"example": 0, "hub id": 2, "train": 0, "eval": 0}, proc.stderr
    assert result["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert "hf download meta-llama/Llama-3-8B" in proc.stderr
