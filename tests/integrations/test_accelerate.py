"""SafeGradTrainer under ``accelerate launch``: DDP defaults and logs averaged over ranks.

The 2-rank check is one real ``accelerate launch --multi_gpu --num_processes 2`` of
``tests/_accelerate_worker.py`` (on a CPU-only machine: MULTI_CPU over gloo; ~20 s, start-up
dominates). accelerate's FSDP2 plugin cannot be reached on CPU (it silently becomes DDP),
so FSDP2 is covered by the direct ``fully_shard`` tests in test_distributed.py only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers_launch import free_port, needs_gloo, worker_env
from helpers_tiny_model import tiny_llama, tiny_peft_model, tiny_training_args, toy_trainer_data
from paths import TESTS
from transformers import TrainingArguments

from safegrad_kernels.integrations import SafeGradTrainer

WORKER = TESTS / "_accelerate_worker.py"
TIMEOUT_S = 180  # the whole launch; about 20 s on 2 busy cores
# DDP's C++ reducer prints this on every run with find_unused_parameters=True and a model
# that uses all its parameters (a LoRA model, before the default below).
UNUSED_WARNING = "find_unused_parameters=True was specified in DDP constructor"


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(**tiny_training_args(tmp_path, **kw))


def _trainer(tmp_path, model, args, method="safegrad") -> SafeGradTrainer:
    return SafeGradTrainer(
        model=model,
        args=args,
        **toy_trainer_data(4, 4),
        method=method,
    )


@pytest.mark.parametrize("user_value", [None, True, False])
def test_find_unused_parameters_defaults_to_false_for_peft_only(tmp_path, user_value):
    args = _args(tmp_path, ddp_find_unused_parameters=user_value)
    _trainer(tmp_path, tiny_peft_model(), args)
    assert args.ddp_find_unused_parameters is (False if user_value is None else user_value)
    # A model that is not a PeftModel keeps the Trainer's own default (None).
    plain = _args(tmp_path, ddp_find_unused_parameters=user_value)
    _trainer(tmp_path, tiny_llama(), plain, method="sft")
    assert plain.ddp_find_unused_parameters is user_value


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    env = worker_env(
        # No accelerate config file of the user's: the flags below are the whole config.
        HF_HOME=str(out / "hf_home"),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",  # the CPU (gloo) launch, also on a GPU machine
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(WORKER),
        str(out),
    ]
    try:
        proc = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch timed out after {TIMEOUT_S} s: {e.stdout}{e.stderr}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, output


@pytest.mark.distributed
@needs_gloo
def test_accelerate_launch_two_ranks_agree_and_log_rank_means(launched):
    ranks, output = launched
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    # PEFT model, ddp_find_unused_parameters left unset: False, and no DDP warning.
    assert all(r["args_find_unused"] is False and r["ddp_find_unused"] is False for r in ranks)
    assert UNUSED_WARNING not in output

    # The ranks agree: same weights after 4 steps, same logs.
    for name, w0 in ranks[0]["weights"].items():
        assert torch.equal(w0, ranks[1]["weights"][name]), name
    assert ranks[0]["logs"] == ranks[1]["logs"]

    # Logged align_loss = the mean over ranks of each rank's mean over the window.
    per_rank = [r["per_step_align"] for r in ranks]
    assert all(len(p) == 4 for p in per_rank)
    assert per_rank[0] != per_rank[1], "the ranks draw different alignment batches"
    logs = ranks[0]["logs"]
    assert [row["step"] for row in logs] == [2, 4]
    for row, window in zip(logs, (slice(0, 2), slice(2, 4))):
        rank_means = [sum(p[window]) / 2 for p in per_rank]
        expected = sum(rank_means) / 2
        assert row["align_loss"] == pytest.approx(expected, rel=1e-5)
        assert row["align_loss"] != pytest.approx(rank_means[0], rel=1e-3)  # not rank 0's
        assert 0.0 <= row["surgery/conflict_rate"] <= 1.0
