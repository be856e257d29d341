"""Sharded (DTensor / FSDP2) and replicated (DDP) surgery on 2 gloo ranks on CPU.

All checks share one 2-process group (start-up dominates: about 3 s per process), run
by ``tests/_dist_worker.py``; each pytest test below asserts one check's verdict. The
worker pins ``SAFEGRAD_BACKEND=torch``: the sharded path is backend-independent, and the
fused backends are tested on their own in test_ops.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_launch import free_port, needs_gloo, run_ranks, worker_env

WORLD = 2
TIMEOUT_S = 50  # whole run; collectives time out after 30 s inside the worker
WORKER = Path(__file__).with_name("_dist_worker.py")

pytestmark = [pytest.mark.distributed, needs_gloo]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{check: {rank: verdict}}`` from one 2-rank run of every check."""
    out = tmp_path_factory.mktemp("dist")
    env = worker_env(SAFEGRAD_BACKEND="torch")
    init = f"tcp://127.0.0.1:{free_port()}"
    argv = [
        [sys.executable, str(WORKER), str(rank), str(WORLD), init, str(out)]
        for rank in range(WORLD)
    ]
    logs = run_ranks([(a, env) for a in argv], TIMEOUT_S)
    results: dict[str, dict[str, str]] = {}
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        if path.exists():
            for name, verdict in json.loads(path.read_text()).items():
                results.setdefault(name, {})[rank] = verdict
    results["_log"] = {"log": "\n".join(log[-4000:] for log in logs)}
    return results


def _assert_ok(verdicts, name: str) -> None:
    ranks = verdicts.get(name, {})
    if len(ranks) < WORLD:
        pytest.fail(
            f"{name}: no verdict from ranks {set(range(WORLD)) - set(ranks)}\n{verdicts['_log']['log']}"
        )
    failed = {r: v for r, v in ranks.items() if v != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{v}" for r, v in failed.items())


CHECKS = [
    "localize_fast_path",
    "dtensor_dot_norms",
    "dtensor_project_conflicting",
    "dtensor_gram_and_combine",
    "dtensor_2d_mesh_and_errors",
    "fsdp2_safegrad_step",
    "fsdp2_pcgrad_step",
    "fsdp2_spf_step",
    "ddp_safegrad_step",
    "ddp_accumulation_with_no_sync",
    "ddp_bucket_view_is_rejected",
    "missing_gradients_raise",
]


@pytest.mark.parametrize("name", CHECKS)
def test_two_ranks(verdicts, name):
    _assert_ok(verdicts, name)


def test_every_worker_check_is_listed():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _dist_worker
    finally:
        sys.path.pop(0)
    assert [fn.__name__ for fn in _dist_worker.CHECKS] == CHECKS


def test_localize_without_dtensors_is_a_pass_through():
    from safegrad_kernels import distributed

    a, b = [torch.randn(3), torch.randn(2, 2)], (torch.randn(3), torch.randn(2, 2))
    lists, info = distributed.localize(a, b)
    assert info is None
    assert all(x is y for x, y in zip(lists[0], a)) and all(x is y for x, y in zip(lists[1], b))


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return Shard, Replicate, Partial, _StridedShard


@pytest.mark.parametrize(
    "coord, layouts, reduce_dims, weights",
    [
        # 1-D mesh: Shard counts on every rank, Replicate and plain tensors on rank 0 only.
        ((0,), [("S0",), ("R",), None], (0,), (1.0, 1.0, 1.0)),
        ((1,), [("S0",), ("R",), None], (0,), (1.0, 0.0, 0.0)),
        # Everything replicated: every rank already holds the global sums, no collective.
        ((1,), [("R",), None], (), (1.0, 1.0)),
        # HSDP (replicate x shard): only the shard dim is reduced; replicas on dim 0 all count.
        ((1, 0), [("R", "S0"), ("R", "S0")], (1,), (1.0, 1.0)),
        ((1, 1), [("R", "S0"), None], (1,), (1.0, 0.0)),
        ((0, 0), [("R", "S0"), None], (1,), (1.0, 1.0)),
        # FSDP + TP: sharded on both dims (strided shard on dim 0), a replicated bias.
        ((1, 1), [("SS0", "S1"), ("R", "R")], (0, 1), (1.0, 0.0)),
        ((0, 0), [("SS0", "S1"), ("R", "R")], (0, 1), (1.0, 1.0)),
        ((0, 1), [("S0", "R"), ("R", "S0")], (0, 1), (0.0, 1.0)),
    ],
)
def test_plan_counts_each_element_once(coord, layouts, reduce_dims, weights):
    from safegrad_kernels import distributed

    shard, replicate, _, strided = _placements()
    make = {"S0": shard(0), "S1": shard(1), "R": replicate(), "SS0": strided(0, split_factor=2)}
    layouts = tuple(None if lay is None else tuple(make[p] for p in lay) for lay in layouts)
    got_weights, got_dims, _ = distributed._plan(coord, layouts, "grads")
    assert got_dims == reduce_dims
    assert got_weights == weights


def test_plan_rejects_partial():
    from safegrad_kernels import distributed

    shard, _, partial, _ = _placements()
    with pytest.raises(ValueError, match=r"grads\[1\] has a Partial placement on mesh dim 0"):
        distributed._plan((0,), ((shard(0),), (partial(),)), "grads")
