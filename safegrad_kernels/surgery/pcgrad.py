"""PCGrad (Yu et al., NeurIPS 2020) as a per-step surgeon over m objectives."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from ..ops.pcgrad import pcgrad_with_gram_, register_generator
from .base import FlatBuffers, Surgeon, check_backend, install_views
from .safegrad import check_op_dtypes
from .stats import PCGradStats, safe_div

__all__ = ["PCGrad"]


class PCGrad(Surgeon):
    """PCGrad over ``num_objectives`` losses, called once per optimizer step.

    Objective 0's gradient is the plain ``p.grad``; objectives ``1..m-1`` are captured
    by their own contexts (no copies: the same ``p.grad`` swap as ``SafeGrad``)::

        surgeon = PCGrad(trainable_params, num_objectives=3)
        loss_0.backward()                       # or: with surgeon.objective(0): ...
        with surgeon.objective(1):
            loss_1.backward()
        with surgeon.objective(2):
            loss_2.backward()
        stats = surgeon.step()                  # p.grad <- sum_i g_i^PC; no host sync
        optimizer.step(); optimizer.zero_grad()

    Every context accumulates across micro-batches like ``p.grad``. ``step()`` runs
    ``pcgrad_`` (one Gram pass, one combine pass) over the m gradient lists and
    consumes the captured ones.

    Args:
        params: trainable parameters (float32/bfloat16/float16, one device).
        num_objectives: m >= 1.
        generator: random source for the per-step visiting order (default: torch's
            global generator on the parameters' device). ``torch.compile(step,
            fullgraph=True)`` draws the same orders from it as eager ``step()``.
        backend: op backend (``None`` = auto, or ``"triton"``, ``"cpp"``, ``"torch"``).
        flat_grads: keep every objective's gradients in flat per-dtype buffers owned by
            the surgeon, ``p.grad`` as views of objective 0's (as ``SafeGrad``'s option: the
            ops see one tensor per dtype, whatever the parameter count; dense, non-sharded
            tensors only). Use ``surgeon.zero_grad()`` or
            ``optimizer.zero_grad(set_to_none=False)`` to keep the views in place; a
            replaced view is copied back at the step. An objective with no gradient at
            all counts as zero, and nothing is touched when no objective has one.

    Missing gradients: for a tensor that has a gradient from some objectives but not
    others, the missing ones count as zero (a zero buffer is allocated for that tensor
    only); a tensor with no gradient from any objective stays untouched.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        num_objectives: int,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        flat_grads: bool = False,
    ) -> None:
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int):
            raise TypeError(f"num_objectives must be an int, got {type(num_objectives).__name__}")
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.num_objectives = num_objectives
        self.generator = generator
        if generator is not None:
            register_generator(generator)  # so that a compiled step() can draw from it
        self.backend = check_backend(backend)
        super().__init__(params, num_slots=num_objectives - 1, flat_grads=flat_grads)
        check_op_dtypes(self.params)
        self._zeros: FlatBuffers | None = None  # flat mode: an objective with no gradient

    def objective(self, j: int) -> AbstractContextManager[None]:
        """Context whose backward passes accumulate into objective ``j``'s gradient.

        ``j = 0`` is the plain ``p.grad`` (a no-op context, for symmetric loops).
        """
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.num_objectives:
            raise ValueError(
                f"objective index must be an int in [0, {self.num_objectives}), got {j!r}"
            )
        if j == 0:
            self._check_idle("objective(0)")
            return nullcontext()
        return self._capture(j - 1)

    def step(self, *, order: Tensor | None = None) -> PCGradStats:
        """Replace every ``p.grad`` by the PCGrad aggregate; consume the captured gradients.

        ``order``: optional ``[m, m]`` visiting order (see ``pcgrad_``; its values are
        checked in eager mode on the CPU only); default random.
        On a validation error nothing is written and the captured gradients are kept.
        Compiles as one graph (``torch.compile(surgeon.step, fullgraph=True)``) with
        or without ``order`` and ``generator``; without a generator, inductor draws
        from its own RNG stream, so only an explicit generator (or ``order``) gives
        the eager orders there.
        """
        self._check_idle("step()")
        if self.flat_grads:
            return self._flat_step(order)
        m = self.num_objectives
        extra = [self._peek(s) for s in range(m - 1)]
        lists: list[list[Tensor]] = [[] for _ in range(m)]
        allocated: list[tuple[Tensor, Tensor]] = []
        for i, p in enumerate(self.params):
            column = [p.grad, *(slot[i] for slot in extra)]
            present = next((t for t in column if t is not None), None)
            if present is None:
                continue
            for j, t in enumerate(column):
                if t is None:
                    t = torch.zeros_like(present, memory_format=torch.contiguous_format)
                    if j == 0:
                        allocated.append((p, t))
                lists[j].append(t)

        if lists[0]:
            weights, gm = pcgrad_with_gram_(
                lists, order=order, generator=self.generator, backend=self.backend
            )
        else:
            weights = torch.ones(m, dtype=torch.float32, device=self.device)
            gm = torch.zeros(m, m, dtype=torch.float32, device=self.device)
        for p, g in allocated:
            p.grad = g
        for s in range(m - 1):
            self._take(s)
        return self._stats(weights, gm)

    def _flat_step(self, order: Tensor | None) -> PCGradStats:
        """``step()`` on the flat buffers: one tensor per dtype per objective reaches the op."""
        m = self.num_objectives
        extra = [self._flats_of(self._peek(s)) for s in range(m - 1)]
        task, found = self._flat_task()
        if not found and all(e is None for e in extra):  # no gradient at all: untouched
            weights = torch.ones(m, dtype=torch.float32, device=self.device)
            return self._stats(weights, torch.zeros(m, m, dtype=torch.float32, device=self.device))
        if not found:  # the aggregate needs somewhere to go: the views, zeroed
            assert self._task is not None
            self._task.zero_()
            install_views(self.params, self._task.views)
        if any(e is None for e in extra) and self._zeros is None:
            self._zeros = FlatBuffers(self.params)
        lists = [task, *(self._zeros.flats if e is None else e for e in extra)]  # type: ignore[union-attr]
        weights, gm = pcgrad_with_gram_(
            lists, order=order, generator=self.generator, backend=self.backend
        )
        for s in range(m - 1):  # after the op: a validation error keeps the captures
            self._take(s)
        return self._stats(weights, gm)

    @staticmethod
    def _stats(weights: Tensor, gm: Tensor) -> PCGradStats:
        nrm = gm.diagonal().clamp_min(0).sqrt()
        cosine = safe_div(gm, nrm[:, None] * nrm[None, :])
        return PCGradStats(gram=gm, weights=weights, cosine=cosine, conflict=gm < 0)
