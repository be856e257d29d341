"""DeepSpeed ZeRO under ``SafeGradTrainer``: exact surgery on ZeRO-1/2 partitions, else a refusal.

Why the ordinary path cannot work. Under DeepSpeed, ``accelerator.backward`` runs
``engine.backward`` and, on the last micro-batch of a step, ``engine.step()`` right
after it (accelerate's ``DeepSpeedEngineWrapper``): the optimizer has stepped before
``training_step`` regains control. And ZeRO's per-parameter post-accumulate hooks move
every ``p.grad`` into DeepSpeed's own buffers during backward (ZeRO-2: reduce-scattered
at once; ZeRO-1: at the boundary), so a surgeon swapping ``p.grad`` sees only ``None``.
The trainer would log zeros and train as if there were no defense.

What runs instead, for ZeRO stages 1 and 2 (``DeepSpeedZeroOptimizer``)::

    alignment micro-batch: loss on the *unwrapped* model (no engine hooks), then
        torch.autograd.grad(loss, params)   # AccumulateGrad never runs, so neither do
                                            # ZeRO's hooks; g_a accumulates here, locally
    task micro-batch: the Trainer's own step (DeepSpeed reduces g_u into its partitions,
        ``optimizer.averaged_gradients[group]``, scale_wrt_gas=False as the Trainer sets)
    ZeRO optimizer step (wrapped): before DeepSpeed computes the clipping norm,
        g_a: one all-reduce (mean over the data-parallel group, like DeepSpeed's g_u),
             then this rank's slice of each group, laid out as DeepSpeed's partition
        safegrad: ``project_conflicting_`` on the partitions as Shard(0) DTensors of
             the flat group: local partial sums, one all-reduce of 3 floats, local update
        mixed: g_u += lam * g_a on the partition (no collective)
    then DeepSpeed clips the combined update to ``gradient_clipping`` and steps

so the update, clipping included, equals the non-DeepSpeed step's (surgery first, clip
second; see ``integrations/trainer.py``). The alignment loss is normalised by the
step's token count exactly as without DeepSpeed, and DeepSpeed's ``1/gas`` is off for
both kinds of loss. The extra traffic per step is one all-reduce of the trainable
gradient (what DDP spends on g_a too) and one of 3 floats; no all-gather.

Refused at construction, with a ``ValueError`` naming the setting: ZeRO-0 (plain data
parallelism: use DDP or FSDP2), ZeRO-3 (parameters themselves are partitioned and
gathered by module hooks: use FSDP2), ``method="spf"`` (needs whole matrices), SafeGrad
``surgery_granularity="per_tensor"``, ``alignment_every > 1`` (the kept g_a would have
to live as DeepSpeed partitions between steps, and the trainer's ZeRO path runs only on
steps with an alignment pass), optimizer/parameter offload, and fp16/bf16 (loss scaling
and low-precision partitions are not tested exactly here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import project_conflicting_
from ..surgery.methods import get_method

__all__ = ["SUPPORTED_STAGES", "ZeroSurgery", "deepspeed_config", "zero_surgery_for"]

SUPPORTED_STAGES = (1, 2)
_ALTERNATIVE = "use FSDP2 (TrainingArguments(fsdp=...)) or plain DDP (no deepspeed config)"


def deepspeed_config(trainer: Any) -> dict[str, Any] | None:
    """The resolved DeepSpeed config dict of a ``transformers.Trainer``, or ``None``.

    Covers both ``TrainingArguments(deepspeed=...)`` and an accelerate DeepSpeed plugin
    (``accelerate launch --use_deepspeed``): both end up as the accelerator state's plugin.
    """
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return dict(getattr(plugin, "deepspeed_config", None) or {})


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") in (True, "true", "True")


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    device = (zero.get(key) or {}).get("device", "none")
    return device not in (None, "none")


def check_supported(
    config: dict[str, Any], method: str, granularity: str, *, alignment_every: int = 1
) -> int:
    """The ZeRO stage, if ``SafeGradTrainer`` runs ``method`` exactly under ``config``.

    Raises:
        ValueError: naming DeepSpeed, the stage and the setting that cannot be honoured.
    """
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    spec = get_method(method)
    if not spec.needs_alignment:
        return stage  # no surgery, nothing to get wrong
    where = f"DeepSpeed ZeRO stage {stage} with method={method!r}"
    if stage not in SUPPORTED_STAGES:
        why = (
            "ZeRO-3 partitions the parameters themselves"
            if stage == 3
            else "ZeRO-0 is plain data parallelism"
        )
        raise ValueError(
            f"{where} is not supported ({why}); SafeGradTrainer runs the surgery exactly "
            f"on ZeRO stages {SUPPORTED_STAGES} only; {_ALTERNATIVE}"
        )
    if spec.partition_update is None:
        raise ValueError(
            f"{where} is not supported: {method} needs whole weight matrices, which ZeRO's "
            f"flat partitions cut apart; {_ALTERNATIVE}"
        )
    if spec.partition_update == "project" and granularity != "global":
        raise ValueError(
            f"{where} supports surgery_granularity='global' only, got {granularity!r}; "
            f"use 'global' or {_ALTERNATIVE}"
        )
    if alignment_every != 1:
        raise ValueError(
            f"{where} supports alignment_every=1 only, got {alignment_every} (the kept "
            f"alignment gradient is not carried on ZeRO partitions); use alignment_every=1 "
            f"or {_ALTERNATIVE}"
        )
    for key in ("offload_optimizer", "offload_param"):
        if _offloaded(zero, key):
            raise ValueError(
                f"{where}: zero_optimization.{key} is not supported (the gradients live "
                f"on the host in another layout); remove it or {_ALTERNATIVE}"
            )
    for key in ("fp16", "bf16"):
        if _enabled(config.get(key)):
            raise ValueError(
                f"{where}: {key} is not supported under DeepSpeed (loss scaling and "
                f"low-precision partitions are not verified exact); train in fp32 under "
                f"DeepSpeed or {_ALTERNATIVE} with bf16 autocast"
            )
    return stage


def zero_surgery_for(
    trainer: Any, method: str, granularity: str, *, alignment_every: int = 1
) -> ZeroSurgery | None:
    """``ZeroSurgery`` for a trainer under DeepSpeed, ``None`` without DeepSpeed or for sft.

    Called at construction, so an unsupported configuration fails before any training.
    """
    config = deepspeed_config(trainer)
    if config is None:
        return None
    check_supported(config, method, granularity, alignment_every=alignment_every)
    if not get_method(method).needs_alignment:
        return None
    return ZeroSurgery(method)


def _dp_group(optimizer: Any) -> Any:
    import torch.distributed as dist

    group = getattr(optimizer, "dp_process_group", None)
    groups = getattr(optimizer, "real_dp_process_group", [group])
    if any(g is not group for g in groups):
        raise RuntimeError(
            "DeepSpeed uses several data-parallel groups (expert / MoE parallelism); "
            "SafeGradTrainer supports one"
        )
    return group if group is not None else dist.group.WORLD


class ZeroSurgery:
    """The surgery step on a ``DeepSpeedZeroOptimizer``'s gradient partitions (stages 1, 2).

    ``capture`` accumulates the alignment gradient of each micro-batch; ``install``
    wraps the ZeRO optimizer's ``step`` so the update is written into DeepSpeed's own
    averaged gradient partitions before DeepSpeed clips and steps; ``finish_step`` hands
    the step's stats to the trainer.

    Never silently off: a step without any captured alignment gradient, without any
    task gradient partition, or a training step after which DeepSpeed's step did not
    run the surgery raises ``RuntimeError``.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.additive = get_method(method).partition_update == "add"
        self.surgeon: Any = None  # SafeGrad: rho, eps, backend and stats; None for mixed
        self.lam = 1.0
        self._params: tuple[nn.Parameter, ...] = ()
        self._g_a: list[Tensor | None] = []
        self._stats: Any = None
        self._ran = False
        self._optimizer: Any = None

    # -- set-up ---------------------------------------------------------------------------

    def install(self, engine: Any, params: Sequence[nn.Parameter], surgeon: Any, lam: float):
        """Wrap ``engine.optimizer.step`` (once); ``surgeon`` is the trainer's SafeGrad."""
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is self._optimizer:
            return
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(optimizer, DeepSpeedZeroOptimizer):
            raise RuntimeError(
                f"expected DeepSpeed's ZeRO-1/2 optimizer, found {type(optimizer).__name__}; "
                "SafeGradTrainer cannot run the surgery on its gradients"
            )
        if getattr(optimizer, "cpu_offload", False):
            raise RuntimeError("DeepSpeed optimizer offload is not supported by SafeGradTrainer")
        _dp_group(optimizer)
        self._params = tuple(params)
        self._g_a = [None] * len(self._params)
        self.surgeon, self.lam = surgeon, lam
        self._optimizer = optimizer
        original_step = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self._before_step(optimizer)
            return original_step(*args, **kwargs)

        optimizer.step = step

    # -- per micro-batch --------------------------------------------------------------------

    def capture(self, loss: Tensor) -> None:
        """Accumulate ``d loss / d params`` (the alignment gradient) without DeepSpeed's hooks."""
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                acc = self._g_a[i]
                self._g_a[i] = g if acc is None else acc.add_(g)

    # -- the step ---------------------------------------------------------------------------

    def _mean_alignment_grads(self, group: Any) -> dict[int, Tensor]:
        """Per parameter id: its flat g_a averaged over the data-parallel group."""
        import torch.distributed as dist

        if all(g is None for g in self._g_a):
            raise RuntimeError(
                "SafeGradTrainer under DeepSpeed: no alignment gradient was captured on any "
                "parameter this step (the alignment loss does not reach the trainable "
                "parameters?); refusing to step without the defense"
            )
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                for p, g in zip(self._params, self._g_a)
            ]
        )
        dist.all_reduce(flat, group=group)
        flat.div_(dist.get_world_size(group))
        self._g_a = [None] * len(self._params)
        out, start = {}, 0
        for p in self._params:
            out[id(p)] = flat[start : start + p.numel()]
            start += p.numel()
        return out

    def _before_step(self, opt: Any) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        group = _dp_group(opt)
        g_a = self._mean_alignment_grads(group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        pieces_u: list[list[Tensor]] = []
        pieces_a: list[Tensor] = []  # per group: this rank's flat g_a partition
        for i, params in enumerate(opt.params_in_partition):
            pieces = opt.averaged_gradients.get(i)
            if pieces is None:
                if params:
                    raise RuntimeError(
                        f"DeepSpeed left no averaged gradient partition for group {i} at the "
                        "step; SafeGradTrainer cannot run the surgery"
                    )
                continue
            size = int(opt.partition_size[i])
            if sum(t.numel() for t in pieces) != size:
                raise RuntimeError(
                    f"DeepSpeed's gradient partition of group {i} has "
                    f"{sum(t.numel() for t in pieces)} elements, expected {size}"
                )
            flat_a = torch.zeros(size, dtype=pieces[0].dtype, device=pieces[0].device)
            for p in params:
                pid = opt.get_param_id(p)
                src = int(opt.grad_start_offset[i][rank][pid])
                dst = int(opt.grad_partition_insertion_offset[i][rank][pid])
                n = min(p.numel() - src, size - dst)
                whole = g_a.get(id(p))
                if whole is None:
                    raise RuntimeError(
                        f"a parameter of DeepSpeed group {i} is not among the trainer's "
                        "trainable parameters"
                    )
                flat_a[dst : dst + n] = whole[src : src + n]
            pieces_u.append(list(pieces))
            pieces_a.append(flat_a)
        if not pieces_u:
            raise RuntimeError(
                "SafeGradTrainer under DeepSpeed: no task gradient partition at the step "
                "(DeepSpeed moved the gradients elsewhere?); refusing to step without the defense"
            )

        if self.additive:
            for pieces, flat_a in zip(pieces_u, pieces_a):
                for t, a in zip(pieces, flat_a.split([t.numel() for t in pieces])):
                    t.view(-1).add_(a, alpha=self.lam)
        else:
            mesh = DeviceMesh.from_group(group, pieces_a[0].device.type)

            def shard(local: Tensor) -> Tensor:
                return DTensor.from_local(
                    local,
                    mesh,
                    [Shard(0)],
                    run_check=False,
                    shape=(local.numel() * world,),
                    stride=(1,),
                )

            flats_u = [torch.cat([t.reshape(-1) for t in pieces]) for pieces in pieces_u]
            s = self.surgeon
            out = project_conflicting_(
                [shard(u) for u in flats_u],
                [shard(a) for a in pieces_a],
                rho=s.rho,
                eps=s.eps,
                per_tensor=False,
                backend=s.backend,
            )
            for pieces, flat_u in zip(pieces_u, flats_u):
                for t, u in zip(pieces, flat_u.split([t.numel() for t in pieces])):
                    t.view(-1).copy_(u)
            self._stats = s._stats(*out.unbind(0))  # the same stats as SafeGrad.step()
        self._ran = True

    def finish_step(self) -> Any:
        """After the step's last training_step: the surgery stats (``None`` for mixed).

        Raises ``RuntimeError`` if DeepSpeed stepped without running the surgery.
        """
        if not self._ran:
            raise RuntimeError(
                "SafeGradTrainer under DeepSpeed: the optimizer step ran without the surgery "
                "(DeepSpeed's ZeRO optimizer step was not reached through its wrapper)"
            )
        self._ran = False
        stats, self._stats = self._stats, None
        return stats
