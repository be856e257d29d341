"""One rank of the distributed checks; spawned twice by tests/test_distributed.py.

Usage: ``python tests/_dist_worker.py RANK WORLD_SIZE INIT_METHOD OUT_DIR``.

Every check runs on both ranks in the same order and computes its single-process
reference locally (same seed on every rank), so one process group serves all checks.
Results go to ``OUT_DIR/rank{RANK}.json`` as ``{check: "ok" | traceback}``, rewritten after
each check so a hang still leaves the earlier verdicts behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import safegrad_kernels

# Measured before any check creates a DTensor: the package must not pull in DTensor.
DTENSOR_LOADED_BY_IMPORT = "torch.distributed.tensor" in sys.modules

# tol for float32 sums that differ only in summation order (sharded vs whole tensors).
RTOL, ATOL = 1e-5, 1e-6

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def close(a: torch.Tensor, b: torch.Tensor, what: str, rtol=RTOL, atol=ATOL) -> None:
    torch.testing.assert_close(
        a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    """Bitwise equality of ``t`` across ranks."""
    t = t.detach().contiguous()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise AssertionError(
                f"{what}: rank {r} differs from rank 0 (max |diff| "
                f"{(other.float() - gathered[0].float()).abs().max()})"
            )


# ----------------------------------------------------------------------------- DTensor ops


def _mixed_lists(mesh, m: int, seed: int):
    """m parallel lists of full tensors and their DTensor/plain counterparts.

    Odd shapes so shards are uneven (7 rows -> 4 + 3) and one rank holds an empty
    piece (1 row -> 1 + 0); placements and dtypes mixed in one list.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    layout = [
        ((7, 5), torch.float32, Shard(0)),
        ((6, 9), torch.float32, Shard(1)),
        ((5,), torch.float32, Replicate()),
        ((3, 4), torch.float32, None),  # plain tensor: replicated by contract
        ((1, 3), torch.float32, Shard(0)),
        ((11,), torch.bfloat16, Shard(0)),
        ((4, 3), torch.bfloat16, Replicate()),
    ]
    gen = torch.Generator().manual_seed(seed)
    full = [[torch.randn(s, generator=gen).to(dt) for s, dt, _ in layout] for _ in range(m)]
    # Make the first two lists conflict on the whole (and on most tensors).
    if m >= 2:
        full[1] = [
            (-0.7 * a.float() + 0.5 * b.float()).to(a.dtype) for a, b in zip(full[0], full[1])
        ]
    dist_lists = [
        [
            t.clone() if p is None else distribute_tensor(t.clone(), mesh, [p])
            for t, (_, _, p) in zip(lst, layout)
        ]
        for lst in full
    ]
    return full, dist_lists


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@check
def localize_fast_path():
    from safegrad_kernels import distributed

    assert not DTENSOR_LOADED_BY_IMPORT, "import safegrad_kernels loaded torch.distributed.tensor"
    assert safegrad_kernels.distributed is distributed
    a, b = [torch.randn(3)], [torch.randn(3)]
    lists, info = distributed.localize(a, b)
    assert info is None and lists[0][0] is a[0] and lists[1][0] is b[0]


@check
def dtensor_dot_norms():
    from torch.distributed.device_mesh import init_device_mesh

    from safegrad_kernels import dot_norms

    mesh = init_device_mesh("cpu", (2,))
    full, (g, r) = _mixed_lists(mesh, 2, seed=1)
    for per_tensor in (False, True):
        got = dot_norms(g, r, per_tensor=per_tensor)
        want = dot_norms(full[0], full[1], per_tensor=per_tensor)
        close(got, want, f"dot_norms(per_tensor={per_tensor})")
        same_on_all_ranks(got, f"dot_norms(per_tensor={per_tensor})")


@check
def dtensor_project_conflicting():
    from torch.distributed.device_mesh import init_device_mesh

    from safegrad_kernels import project_conflicting_

    mesh = init_device_mesh("cpu", (2,))
    for per_tensor in (False, True):
        for rho in (0.0, 1.0):
            full, (g, r) = _mixed_lists(mesh, 2, seed=2)
            want_stats = project_conflicting_(full[0], full[1], rho=rho, per_tensor=per_tensor)
            got_stats = project_conflicting_(g, r, rho=rho, per_tensor=per_tensor)
            tag = f"project_conflicting_(rho={rho}, per_tensor={per_tensor})"
            close(got_stats, want_stats, tag + " stats")
            same_on_all_ranks(got_stats, tag + " stats")
            if not per_tensor:
                assert float(got_stats[3]) < 0, "test data should conflict"
            for i, (gi, wi) in enumerate(zip(g, full[0])):
                # bf16 grads: one rounding of the same fp32 value, unless the coefficient
                # differs in its last bits; allow one bf16 ulp.
                tol = (1e-2, 1e-2) if wi.dtype == torch.bfloat16 else (RTOL, 1e-5)
                close(_full(gi), wi, f"{tag} grads[{i}]", *tol)
                if not hasattr(gi, "placements") or gi.placements[0].is_replicate():
                    # Replicas must stay bitwise identical: same coefficient everywhere.
                    same_on_all_ranks(_local(gi), f"{tag} replicated grads[{i}]")


@check
def dtensor_gram_and_combine():
    from torch.distributed.device_mesh import init_device_mesh

    from safegrad_kernels import combine_, gram

    mesh = init_device_mesh("cpu", (2,))
    full, lists = _mixed_lists(mesh, 3, seed=3)
    close(gram(lists), gram(full), "gram", rtol=1e-5, atol=1e-5)
    w = torch.tensor([0.5, -1.25, 2.0])
    combine_(lists[0], lists, w)
    combine_(full[0], full, w)
    for i, (a, b) in enumerate(zip(lists[0], full[0])):
        close(_full(a), b, f"combine_ out[{i}]", rtol=1e-2, atol=1e-2)


@check
def dtensor_2d_mesh_and_errors():
    """Mesh dims of size 1 and 2 in both orders; bad layouts raise on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from safegrad_kernels import distributed, dot_norms

    gen = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(9, 4, generator=gen) for _ in range(3))
    for shape in ((1, 2), (2, 1)):
        mesh = init_device_mesh("cpu", shape)
        for placements in ((Replicate(), Shard(0)), (Shard(0), Replicate()), (Shard(1), Shard(0))):
            g = [
                distribute_tensor(a, mesh, placements),
                distribute_tensor(c, mesh, [Replicate()] * 2),
            ]
            r = [
                distribute_tensor(b, mesh, placements),
                distribute_tensor(a, mesh, [Replicate()] * 2),
            ]
            close(
                dot_norms(g, r, per_tensor=True),
                dot_norms([a, c], [b, a], per_tensor=True),
                f"mesh {shape} {placements}",
            )
    mesh = init_device_mesh("cpu", (2,))
    bad = [
        (
            [distribute_tensor(a, mesh, [Shard(0)])],
            [distribute_tensor(b, mesh, [Shard(1)])],
            "laid out alike",
        ),
        ([distribute_tensor(a, mesh, [Shard(0)])], [b], "laid out alike"),
        (
            [distribute_tensor(a, mesh, [Shard(0)])],
            [distribute_tensor(b[:8], mesh, [Shard(0)])],
            "same shape",
        ),
        (
            [DTensor.from_local(a, mesh, [Partial()])],
            [DTensor.from_local(b, mesh, [Partial()])],
            "Partial",
        ),
    ]
    for g, r, message in bad:
        try:
            distributed.localize(g, r)
        except ValueError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"expected ValueError mentioning {message!r}")


# ----------------------------------------------------------------------------- training steps


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 5 -> 7 -> 3: every dim odd, so FSDP2's Shard(0) pieces are uneven (4 + 3, 2 + 1).
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(seed: int, n: int, m: int = 2):
    """m (inputs, targets) pairs; each later objective's targets pull against the first."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)
    out = [(x, y)]
    for _ in range(m - 1):
        out.append((torch.randn(n, 5, generator=gen), -y + 0.3 * torch.randn(n, 3, generator=gen)))
    return out


def _rank_slice(n: int) -> slice:
    rank, world = dist.get_rank(), dist.get_world_size()
    return slice(rank * n // world, (rank + 1) * n // world)


def _safegrad_step(model, batches, micro: int = 1, **kwargs):
    """One SafeGrad step over ``micro`` micro-batches (losses scaled by 1/micro)."""
    from safegrad_kernels.surgery import SafeGrad

    (x_a, y_a), (x_u, y_u) = batches
    surgeon = SafeGrad(model.parameters(), **kwargs)
    for xa, ya, xu, yu in zip(*(t.chunk(micro) for t in (x_a, y_a, x_u, y_u))):
        with surgeon.reference():
            (nn.functional.mse_loss(model(xa), ya) / micro).backward()
        (nn.functional.mse_loss(model(xu), yu) / micro).backward()
    return surgeon.step()


def _stats_tensor(stats) -> torch.Tensor:
    return torch.tensor(list(stats.to_dict().values()))


def _local_half(batches):
    half = _rank_slice(len(batches[0][0]))
    return [(x[half], y[half]) for x, y in batches]


@check
def fsdp2_safegrad_step():
    """Each rank: half the batch in 2 micro-batches; FSDP2 averages; both granularities."""
    from torch.distributed.fsdp import fully_shard

    batches = _batches(seed=6, n=8)
    for granularity in ("global", "per_tensor"):
        ref_model, model = _tiny_model(seed=5), _tiny_model(seed=5)
        fully_shard(model)
        want = _safegrad_step(ref_model, batches, rho=1.0, granularity=granularity)
        got = _safegrad_step(model, _local_half(batches), micro=2, rho=1.0, granularity=granularity)
        close(_stats_tensor(got), _stats_tensor(want), f"{granularity} stats")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            close(p.grad.full_tensor(), q.grad, f"{granularity} grad of {name}")


@check
def fsdp2_pcgrad_step():
    """Random visiting orders must agree across ranks: same-seeded generators."""
    from torch.distributed.fsdp import fully_shard

    from safegrad_kernels.surgery import PCGrad

    batches = _batches(seed=11, n=8, m=3)
    results = []
    for model, data in (
        (_tiny_model(seed=12), batches),
        (_tiny_model(seed=12), _local_half(batches)),
    ):
        if data is not batches:
            fully_shard(model)
        surgeon = PCGrad(
            model.parameters(), num_objectives=3, generator=torch.Generator().manual_seed(13)
        )
        for j, (x, y) in enumerate(data):
            with surgeon.objective(j):
                nn.functional.mse_loss(model(x), y).backward()
        results.append((model, surgeon.step()))
    (ref_model, want), (model, got) = results
    close(got.gram, want.gram, "gram")
    close(got.weights, want.weights, "weights")
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        close(p.grad.full_tensor(), q.grad, f"grad of {name}")


@check
def fsdp2_spf_step():
    """SPF on Shard(0) parameters (uneven shards, tall and wide weights) = single process."""
    from torch.distributed.fsdp import fully_shard

    from safegrad_kernels.surgery import SPF

    batches = _batches(seed=21, n=8)
    for mode in ("conflicting", "always"):
        results = []
        for sharded in (False, True):
            model = _tiny_model(seed=22)
            data = batches
            if sharded:
                fully_shard(model)
                data = _local_half(batches)
            surgeon = SPF(model.parameters(), rank=2, refresh_every=2, mode=mode)
            stats = []
            for step in range(3):  # refresh, reuse, refresh
                (x_a, y_a), (x_u, y_u) = data
                shift = 0.1 * step
                if surgeon.wants_reference:
                    with surgeon.reference():
                        nn.functional.mse_loss(model(x_a + shift), y_a).backward()
                nn.functional.mse_loss(model(x_u - shift), y_u).backward()
                st = surgeon.step()
                stats.append(torch.cat([st.score, st.applied.float(), st.removed_norm_sq]))
                grads = [p.grad.full_tensor() if sharded else p.grad for p in model.parameters()]
                stats.append(torch.cat([g.detach().reshape(-1).clone() for g in grads]))
                for p in model.parameters():
                    p.grad = None
            results.append(stats)
        for k, (got, want) in enumerate(zip(results[1], results[0])):
            close(got, want, f"{mode} step {k // 2} {'grads' if k % 2 else 'stats'}")


def _ddp(model, **kwargs):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, **kwargs)


@check
def ddp_safegrad_step():
    """Each rank: half the batch; DDP averages each backward; same surgery on every rank."""
    from safegrad_kernels.distributed import check_ddp

    batches = _batches(seed=8, n=10)
    ref_model = _tiny_model(seed=7)
    ddp = _ddp(_tiny_model(seed=7), gradient_as_bucket_view=False)
    check_ddp(ddp)
    for step in range(2):  # the second step runs on DDP's steady-state buffers
        ref_model.zero_grad(set_to_none=True)
        ddp.zero_grad(set_to_none=True)
        want = _safegrad_step(ref_model, batches, rho=1.0)
        got = _safegrad_step(ddp, _local_half(batches), rho=1.0)
        close(_stats_tensor(got), _stats_tensor(want), f"step {step} stats")
        same_on_all_ranks(_stats_tensor(got), f"step {step} stats")
        for (name, p), q in zip(ddp.module.named_parameters(), ref_model.parameters()):
            close(p.grad, q.grad, f"step {step} grad of {name}")
            same_on_all_ranks(p.grad, f"step {step} grad of {name}")


@check
def ddp_accumulation_with_no_sync():
    """Micro-batches under no_sync() except the last backward of each kind: still exact."""
    from contextlib import nullcontext

    from safegrad_kernels.surgery import SafeGrad

    batches = _batches(seed=14, n=12)
    ref_model = _tiny_model(seed=15)
    want = _safegrad_step(ref_model, batches, rho=1.0)
    ddp = _ddp(_tiny_model(seed=15))
    (x_a, y_a), (x_u, y_u) = _local_half(batches)
    surgeon = SafeGrad(ddp.parameters(), rho=1.0)
    micro = 3
    for k, (xa, ya, xu, yu) in enumerate(zip(*(t.chunk(micro) for t in (x_a, y_a, x_u, y_u)))):
        sync = nullcontext() if k == micro - 1 else ddp.no_sync()
        with sync:
            with surgeon.reference():
                (nn.functional.mse_loss(ddp(xa), ya) / micro).backward()
            (nn.functional.mse_loss(ddp(xu), yu) / micro).backward()
    got = surgeon.step()
    close(_stats_tensor(got), _stats_tensor(want), "stats")
    for (name, p), q in zip(ddp.module.named_parameters(), ref_model.parameters()):
        close(p.grad, q.grad, f"grad of {name}")
        same_on_all_ranks(p.grad, f"grad of {name}")


@check
def ddp_bucket_view_is_rejected():
    """Why gradient_as_bucket_view=True is unsupported: parked grads get overwritten."""
    from safegrad_kernels.distributed import check_ddp

    ddp = _ddp(_tiny_model(seed=9), gradient_as_bucket_view=True)
    try:
        check_ddp(ddp)
    except ValueError as e:
        assert "gradient_as_bucket_view" in str(e)
    else:
        raise AssertionError("check_ddp accepted gradient_as_bucket_view=True")
    (x_a, y_a), (x_u, y_u) = _batches(seed=10, n=4)
    loss = nn.functional.mse_loss
    for _ in range(2):  # p.grad becomes a bucket view from the second step on
        ddp.zero_grad(set_to_none=True)
        loss(ddp(x_a), y_a).backward()
        parked = [p.grad for p in ddp.parameters()]
        saved = [g.clone() for g in parked]
        for p in ddp.parameters():
            p.grad = None
        loss(ddp(x_u), y_u).backward()
    # Observed with torch 2.13: the reducer copies the new gradient into its bucket and
    # points p.grad back at it, which is where the parked reference gradient lives.
    overwritten = all(p.grad.data_ptr() == g.data_ptr() for p, g in zip(ddp.parameters(), parked))
    changed = any(not torch.equal(g, s) for g, s in zip(parked, saved))
    assert overwritten and changed, (overwritten, changed)


@check
def missing_gradients_raise():
    """Never silently off under DDP and FSDP2: a step with no g_a (or no g_u) at all raises."""
    from torch.distributed.fsdp import fully_shard

    from safegrad_kernels.surgery import SPF, SafeGrad

    (x_a, y_a), (x_u, y_u) = _local_half(_batches(seed=16, n=6))
    loss = nn.functional.mse_loss
    for engine in ("ddp", "fsdp2"):
        model = _tiny_model(seed=17)
        model = _ddp(model) if engine == "ddp" else fully_shard(model)
        for make in (lambda ps: SafeGrad(ps), lambda ps: SPF(ps, rank=2)):
            surgeon = make(model.parameters())
            for missing in ("reference", "task"):
                model.zero_grad(set_to_none=True)
                if missing == "task":
                    with surgeon.reference():
                        loss(model(x_a), y_a).backward()
                    kind = "no task"
                else:
                    loss(model(x_u), y_u).backward()
                    kind = "no captured reference"
                try:
                    surgeon.step()
                except RuntimeError as e:
                    assert kind in str(e), str(e)
                else:
                    name = type(surgeon).__name__
                    if not (name == "SPF" and missing == "task"):  # SPF: a basis-only step
                        raise AssertionError(f"{engine} {name}: step without {missing} passed")
                surgeon.reset()


def main() -> None:
    rank, world, init_method, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    only = os.environ.get("SAFEGRAD_DIST_CHECKS")
    results: dict[str, str] = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        for fn in CHECKS:
            if only and fn.__name__ not in only.split(","):
                continue
            start = time.perf_counter()
            try:
                fn()
                results[fn.__name__] = "ok"
            except Exception:
                results[fn.__name__] = traceback.format_exc()
            with open(path, "w") as f:
                json.dump(results, f)
            # Realign the ranks after each check, so that one rank failing early in a check
            # cannot pair its next collective with the other rank's leftover one.
            dist.barrier()
            print(f"rank {rank}: {fn.__name__} {time.perf_counter() - start:.2f} s", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # End as `safegrad` does after a distributed run: a gloo thread can abort the
    # interpreter's teardown (safegrad_kernels.cli.shutdown).
    from safegrad_kernels.cli import shutdown

    shutdown.end_process_group()
    shutdown.exit_without_finalizing(0)
