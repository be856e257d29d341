"""The `safegrad` parsers: value types, and building them without transformers."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
from paths import ROOT

from safegrad_kernels.cli.args import (
    delegated,
    non_negative_float,
    non_negative_int,
    positive_int,
    ratio,
)


@pytest.mark.parametrize(
    ("parse", "good", "bad", "message"),
    [
        (positive_int, {"1": 1, "7": 7, "1031": 1031}, ["0", "-3", "2.5", "x", ""], "positive integer"),
        (non_negative_int, {"0": 0, "13": 13}, ["-1", "1e3", "y"], "non-negative integer"),
        (non_negative_float, {"0": 0.0, "2.5": 2.5, "1e-5": 1e-5}, ["-0.1", "nan", "z"], "non-negative number"),
        (ratio, {"0": 0.0, "0.37": 0.37, "1": 1.0}, ["1.5", "-0.1", "nan", "inf", "p"], "number in [0, 1]"),
    ],
)  # fmt: skip
def test_value_types_accept_and_refuse(parse, good, bad, message):
    for text, value in good.items():
        assert parse(text) == value and type(parse(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)) as err:
            parse(text)
        assert repr(text) in str(err.value)  # the message quotes what the user typed


def test_a_delegated_command_that_cannot_import_says_why(capsys):
    add_arguments, run = delegated("nope", "safegrad_kernels._no_such_module")
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # builds without the module
    assert run(parser.parse_args([])) == 1
    err = capsys.readouterr().err
    assert err.startswith("safegrad nope: unavailable (") and "_no_such_module" in err


_WITHOUT_HF = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "peft", "accelerate", "matplotlib"):
            raise ImportError(f"blocked for this test: {name}")

sys.meta_path.insert(0, Block())
from safegrad_kernels.cli import build_parser, main

for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["info", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
assert main(["info"]) == 0
for command in (None, "info", "train", "eval"):
    build_parser(command)
print("OK")
"""


def test_help_and_info_need_no_transformers(tmp_path):
    # A fresh interpreter: this one has imported transformers already (other tests).
    root = ROOT
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_HF], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("OK") and "backends:" in proc.stdout


def test_train_reference_and_fused_flags_reach_the_trainer():
    from safegrad_kernels.cli import build_parser
    from safegrad_kernels.training_run import _method_kwargs

    parser = build_parser("train")
    base = ["train", "--model", "m", "--output-dir", "o"]

    def trainer_kwargs(*flags):
        return _method_kwargs(parser.parse_args([*base, *flags]))

    default = trainer_kwargs()
    assert "cache_reference" not in default and "reference_top_k" not in default
    assert default["fused_loss"] is False
    assert trainer_kwargs("--cache-reference")["cache_reference"] is True  # bare: on
    assert trainer_kwargs("--cache-reference", "on")["cache_reference"] is True
    assert trainer_kwargs("--cache-reference", "off")["cache_reference"] is False
    assert "cache_reference" not in trainer_kwargs("--cache-reference", "auto")
    picked = trainer_kwargs("--reference-top-k", "17", "--fused-loss")
    assert picked["reference_top_k"] == 17 and picked["fused_loss"] is True
    for bad in (["--cache-reference", "maybe"], ["--reference-top-k", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
