"""SafeGradTrainer under DeepSpeed ZeRO: exact on stages 1 and 2, refused elsewhere.

The 2-rank checks share one launch of ``tests/_deepspeed_worker.py`` (two processes,
gloo, ``DS_ACCELERATOR=cpu``; start-up dominates): plain-DDP reference runs and the
DeepSpeed runs train the same tiny Llama + LoRA on the same data with gradient
accumulation 2 and clipping, and the weights are compared. The config checks below
them need neither DeepSpeed nor a process group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers_launch import free_port, needs_gloo, run_ranks, worker_env
from paths import TESTS

from safegrad_kernels.integrations.deepspeed import ZeroSurgery, check_supported

WORKER = TESTS / "_deepspeed_worker.py"
TIMEOUT_S = 240  # whole launch; about 55 s on 2 busy cores
EXACT = [f"zero{s}:{m}" for s in (1, 2) for m in ("safegrad", "mixed")]
REFUSED = ["zero0:safegrad", "zero3:safegrad", "zero3:mixed", "zero2:spf"]
RUNS = ["ddp:safegrad", "ddp:mixed", *EXACT, *REFUSED]
# fp32 sums in another order (partitions vs whole tensors), through 2 AdamW steps.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    env = worker_env(
        DS_ACCELERATOR="cpu",
        SAFEGRAD_BACKEND="torch",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    argv = [sys.executable, str(WORKER), str(out), *RUNS]
    ranks = [dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(2)]
    logs = run_ranks([(argv, rank_env) for rank_env in ranks], TIMEOUT_S)
    (out / "log.txt").write_text("\n".join(log[-6000:] for log in logs))
    return out


def _load(results: Path, run: str) -> dict:
    path = results / f"{run}.pt"
    if not path.exists():
        err = results / f"{run}.err"
        detail = err.read_text() if err.exists() else (results / "log.txt").read_text()
        pytest.fail(f"{run} produced no result:\n{detail}")
    return torch.load(path, weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    return max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", EXACT)
def test_zero_weights_equal_the_ddp_run(results, run):
    method = run.split(":")[1]
    got, want = _load(results, run), _load(results, f"ddp:{method}")
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)
    # The logged surgery stats (and DeepSpeed's grad norm, measured after the surgery).
    assert len(got["logs"]) == len(want["logs"]) == 2
    for g, w in zip(got["logs"], want["logs"]):
        keys = {k for k in w if k.startswith("surgery/")} | {"grad_norm", "align_loss"}
        assert keys <= g.keys()
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-7), k


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_safegrad_projects_and_differs_from_mixed(results, stage):
    # The reference run conflicts on one step, so the projection branch is compared too.
    ddp = _load(results, "ddp:safegrad")
    assert any(h["surgery/conflict_rate"] == 1.0 for h in ddp["logs"])
    assert all(h["surgery/ref_norm_sq"] > 0 for h in ddp["logs"])
    safegrad, mixed = _load(results, f"zero{stage}:safegrad"), _load(results, f"zero{stage}:mixed")
    # Both train; SafeGrad's update is not the mixed objective's (a silently disabled
    # surgery under ZeRO-2 used to give mixed's weights bit for bit).
    assert _max_diff(safegrad, mixed) > 1e3 * ATOL


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", REFUSED)
def test_unsupported_stage_or_method_raises_at_construction(results, run):
    err = results / f"{run}.err"
    assert err.exists(), f"{run} was not refused"
    phase, text = err.read_text().split("\n", 1)
    assert phase == "construction"
    stage = run.split(":")[0].removeprefix("zero")
    assert "ValueError: DeepSpeed ZeRO stage " + stage in text
    assert "FSDP2" in text
    assert not (results / f"{run}.pt").exists()


# -- configuration checks: no DeepSpeed needed ------------------------------------------------


def _config(stage, **extra):
    return {"zero_optimization": {"stage": stage, **extra.pop("zero", {})}, **extra}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["sft", "safegrad", "mixed", "spf"])
def test_check_supported_per_stage_and_method(stage, method):
    exact = method == "sft" or (stage in (1, 2) and method in ("safegrad", "mixed"))
    if exact:
        assert check_supported(_config(stage), method, "global") == stage
        return
    with pytest.raises(ValueError, match=rf"DeepSpeed ZeRO stage {stage} .*FSDP2"):
        check_supported(_config(stage), method, "global")


@pytest.mark.parametrize(
    "config, granularity, match",
    [
        (_config(2), "per_tensor", "surgery_granularity"),
        (_config(1, zero={"offload_optimizer": {"device": "cpu"}}), "global", "offload_optimizer"),
        (_config(2, zero={"offload_param": {"device": "nvme"}}), "global", "offload_param"),
        (_config(2, fp16={"enabled": True}), "global", "fp16"),
        (_config(1, bf16={"enabled": True}), "global", "bf16"),
    ],
)
def test_check_supported_refuses_settings_it_cannot_honour(config, granularity, match):
    with pytest.raises(ValueError, match=match):
        check_supported(config, "safegrad", granularity)
    # Plain fine-tuning has no surgery to get wrong: every setting passes.
    check_supported(config, "sft", granularity)


@pytest.mark.parametrize("stage", [1, 2])
def test_check_supported_refuses_an_alignment_refresh(stage):
    k = 2 + stage  # any k > 1: the kept g_a is not carried on ZeRO partitions
    with pytest.raises(ValueError, match=f"alignment_every=1 only, got {k}"):
        check_supported(_config(stage), "safegrad", "global", alignment_every=k)
    assert check_supported(_config(stage), "safegrad", "global", alignment_every=1) == stage


def test_offload_disabled_and_bf16_off_pass():
    config = _config(2, zero={"offload_optimizer": {"device": "none"}}, bf16={"enabled": False})
    assert check_supported(config, "safegrad", "global") == 2


def test_a_step_without_the_surgery_raises():
    """Never silently off: DeepSpeed stepping past the wrapped optimizer step is an error."""
    zero = ZeroSurgery("safegrad")
    with pytest.raises(RuntimeError, match="without the surgery"):
        zero.finish_step()


def test_a_step_without_any_alignment_gradient_raises():
    zero = ZeroSurgery("safegrad")
    zero._params, zero._g_a = (torch.nn.Parameter(torch.randn(3, 5)),), [None]
    with pytest.raises(RuntimeError, match="no alignment gradient"):
        zero._mean_alignment_grads(group=None)  # raises before any collective
