"""SafeGrad (arXiv 2508.07172): one-sided projection of the task gradient, alignment added back.

Per optimizer step, with ``g_u`` the task gradient and ``g_a`` the alignment gradient::

    c    = <g_u, g_a> / ||g_a||^2   if <g_u, g_a> < 0 and ||g_a||^2 > eps   else 0
    grad = g_u - c * g_a + rho * g_a

over the whole flattened parameter vector (``granularity="global"``, as the authors'
trainer does) or separately per parameter tensor (``"per_tensor"``). The update runs
in place on ``p.grad`` through ``project_conflicting_``: two fused passes, the
coefficient never leaves the device.

Alignment refresh (``alignment_every=k``): the alignment gradient costs a reference
forward, an alignment forward and an alignment backward, about 1.3 SFT steps on the
cpu-large benchmark shape (issue 13). With ``k > 1`` it is computed only on optimizer
steps ``0, 1, k, 2k, ...`` and kept in the surgeon between them; every step still computes
its own coefficient ``c`` against its own ``g_u``, so only ``g_a`` is stale, never the
projection. Step 1 refreshes as well (``refresh_due``): step 0's g_a is zero when training
starts from the reference model.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from ..ops import dot_norms, project_conflicting_
from ..ops.validate import SUPPORTED_DTYPES, check_scalar
from .base import FlatBuffers, Surgeon, _check_params, check_backend, check_choice, check_int
from .stats import SafeGradStats

__all__ = ["SafeGrad", "refresh_due", "refreshes_before"]

GRANULARITIES = ("global", "per_tensor")


def check_op_dtypes(params: tuple[Tensor, ...]) -> None:
    for i, p in enumerate(params):
        if p.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(f"params[{i}] has dtype {p.dtype}; the fused ops support {names}")


def refresh_due(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` refreshes g_a: steps 0, 1, k, 2k, ... (all for k = 1).

    Step 1 is a refresh step too because step 0's g_a is exactly zero whenever training
    starts from the reference model (a fresh LoRA adapter, or full fine-tuning from the
    aligned checkpoint: the KL and its gradient vanish there). Kept for k steps, that
    zero made steps 0..k-1 plain SFT; refreshing at step 1 costs one alignment pass a run.
    The rule reads only the step counter, so it needs no host sync and a resumed run
    (or ``Method.alignment_steps_before``) knows every refresh step in advance.
    """
    return step % every == 0 or step == 1


def refreshes_before(step: int, every: int) -> int:
    """How many of the steps ``0 .. step - 1`` are refresh steps (``refresh_due``)."""
    if every == 1:
        return step
    return -(-step // every) + (step > 1)


class SafeGrad(Surgeon):
    """The SafeGrad gradient surgeon, called once per optimizer step.

    Usage (any number of micro-batches; the two kinds of backward in any order)::

        surgeon = SafeGrad(trainable_params, rho=1.0)
        for micro_batch in step_batches:
            with surgeon.reference():           # gradients in here become g_a
                (align_loss(micro_batch) / k).backward()
            (task_loss(micro_batch) / k).backward()   # g_u, in p.grad as usual
        stats = surgeon.step()                  # p.grad <- SafeGrad update; no host sync
        optimizer.step(); optimizer.zero_grad()

    Args:
        params: trainable parameters (float32/bfloat16/float16, one device; see
            ``Surgeon`` for how frozen and repeated tensors are treated).
        rho: weight of the alignment gradient added back (>= 0; 1 in the paper).
        eps: ``||g_a||^2`` at or below this counts as no alignment signal (no projection),
            e.g. at step 0 of LoRA training where the model equals the reference model
            (g_a is exactly 0 there). Default 1e-30, an underflow guard only (see below).
        granularity: ``"global"`` (one coefficient for all parameters) or ``"per_tensor"``.
        alignment_every: ``k >= 1``; ``g_a`` is wanted (``wants_reference``) on the steps
            ``0, 1, k, 2k, ...`` of this surgeon (``refresh_due``) and reused in between (see below). ``1``:
            every step, exactly the update without this option.
        backend: op backend (``None`` = auto, or ``"triton"``, ``"cpp"``, ``"torch"``).
        flat_grads: keep ``g_u`` and ``g_a`` in flat per-dtype buffers owned by the
            surgeon, ``p.grad`` being views (``Surgeon``'s docstring): a step's host time
            no longer grows with the tensor count (issue 14: the GPU would otherwise wait
            on Python), at N resident elements per kept buffer. Zero with
            ``surgeon.zero_grad()`` or ``optimizer.zero_grad(set_to_none=False)``; other
            zeroing is repaired at the step by a copy. Every parameter then gets a
            gradient (a missing one counts as zero). ``"global"`` granularity only (the
            per-tensor sums need the tensors apart); same update to rounding (one flat
            sum instead of per-tensor sums in a fixed order).

    Alignment refresh (``alignment_every = k > 1``): on a refresh step the captured
    ``g_a`` is used and then *kept* (the capture buffers themselves, no copy); a step
    that captures nothing uses the kept one, against that step's fresh ``g_u``. Memory:
    the kept ``g_a`` stays resident between steps, N extra elements in the gradients'
    dtype (N = trainable elements; 625k, 2.4 MiB in fp32, for LoRA r=8 on the
    cpu-large benchmark model). With ``k = 1`` the buffers live only from the
    alignment backward to ``step()``, as before. A loop asks ``wants_reference`` (or
    ``Method.alignment_due``) before running the alignment pass; a capture on another
    step is used too and becomes the kept ``g_a`` (the schedule of refresh steps does
    not move). ``state_dict()`` carries the step counter and the kept ``g_a``, so a
    resumed run refreshes on the same steps with the same ``g_a``. ``reset()`` drops
    only what was captured this step: the kept ``g_a`` and the counter stay.
    A dynamic loss scale (fp16 ``GradScaler``) would make the kept ``g_a`` carry the
    scale of its refresh step while ``g_u`` carries today's, which breaks the
    scale-freedom argued below; ``SafeGradTrainer`` refuses fp16 with ``k > 1``.

    Missing gradients (``p.grad is None`` after the backward passes):
        - no alignment gradient: treated as zero; that tensor's task gradient is left
          as it is (it still counts in ``stats.grad_norm_sq``);
        - no task gradient but an alignment gradient: treated as a zero task gradient,
          so a gradient is allocated and becomes ``(rho - c) * g_a`` (``c`` the global
          coefficient; ``rho * g_a`` in ``"per_tensor"`` mode);
        - neither: untouched (stays ``None``).

    Mixed precision: scale both losses by the same factor (e.g. one ``GradScaler``);
    ``c`` is scale-free and the update is linear, so unscaling before or after
    ``step()`` gives the same result. Non-finite sums leave the gradients untouched.
    Under DDP keep ``gradient_as_bucket_view=False`` (the default): the reference
    context swaps ``p.grad`` objects, which bucket-view gradients do not allow.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        rho: float = 1.0,
        # --- issue 12: eps is an underflow guard, not a scale ------------------------------
        # ||g_a||^2 of a KL alignment loss scales with lr^2 while its direction does not
        # (tiny Llama, steps 3-6: 1.5e-9..4.9e-9 at lr 1e-5, 1.5e-11..4.9e-11 at lr 1e-6, the
        # same cos(g_u, g_a) -0.38..-0.62 at both), so any eps that real runs reach switches
        # the surgery off for small learning rates (the authors' 1e-9 already at lr 1e-6
        # here; 1e-12, by the lr^2 scaling, at lr 1e-7). The projection stays exact far
        # below: fp32, 7 x 100k elements, error <= 6e-8 ||g_u|| against float64 down to
        # ||g_a||^2 = 7e-35 (1.8e-6 at 7e-37, where squares go subnormal), and the removed
        # c g_a has norm |<g_u, g_a>| / ||g_a|| <= ||g_u|| at any scale. Measured with
        # `safegrad train` on the `safegrad example` model and a float64 sweep, 2026-12-01;
        # tests/surgery/test_small_alignment_gradient.py checks it.
        eps: float = 1e-30,
        # --- end issue 12 -------------------------------------------------------------------
        granularity: str = "global",
        alignment_every: int = 1,
        backend: str | None = None,
        flat_grads: bool = False,
    ) -> None:
        self.rho = check_scalar("rho", rho)
        self.eps = check_scalar("eps", eps)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.alignment_every = check_int("alignment_every", alignment_every, minimum=1)
        self.backend = check_backend(backend)
        if flat_grads and self.granularity != "global":
            raise ValueError(
                "flat_grads=True needs granularity='global' (per-tensor sums need the "
                f"tensors apart), got granularity={self.granularity!r}"
            )
        if flat_grads:  # before the buffers are allocated and p.grad becomes their views
            params = _check_params(params)
            check_op_dtypes(params)
        super().__init__(params, num_slots=1, flat_grads=flat_grads)
        check_op_dtypes(self.params)
        self._step = 0  # steps taken: refresh_due(step, alignment_every) says which refresh
        # g_a of the last step that captured one (alignment_every > 1 only; else None).
        self._kept: list[Tensor | None] | None = None

    def reference(self) -> AbstractContextManager[None]:
        """Context in which backward passes accumulate into the alignment gradient ``g_a``."""
        return self._capture(0)

    @property
    def has_reference(self) -> bool:
        """Whether an alignment gradient was captured since the last step (host-side)."""
        return self.has_captured(0)

    @property
    def wants_reference(self) -> bool:
        """Whether this step is a refresh step (every step for ``alignment_every=1``)."""
        return refresh_due(self._step, self.alignment_every)

    def step(self, *, allow_missing: bool = False) -> SafeGradStats:
        """Apply the update to every ``p.grad`` in place and consume the captured ``g_a``.

        Where ``g_a`` is zero, or missing for some tensors, the task gradients stay as
        they are. A step that finds no task gradient or no captured ``g_a`` on *any*
        parameter raises ``RuntimeError`` (the defense must never switch off silently,
        e.g. when an engine moved the gradients out of ``p.grad``), unless
        ``allow_missing=True``, which keeps them as they are. Validation happens before
        anything is written; on error nothing changes and the captured ``g_a`` is kept.

        With ``alignment_every > 1``, a step that is not a refresh step and captured
        nothing uses the kept ``g_a``, which then counts as found; a refresh step needs
        a fresh capture (a kept ``g_a`` does not stand in for a missed refresh).
        """
        self._check_idle("step()")
        per_tensor = self.granularity == "per_tensor"
        fresh = self.has_captured(0)
        if fresh or self.wants_reference or self._kept is None:
            source = self._peek(0)
        else:
            source = self._kept
        if self.flat_grads:
            return self._flat_step(source, fresh, allow_missing)
        grads, refs, paired = [], [], []
        allocated: list[tuple[Tensor, Tensor]] = []
        unpaired: list[int] = []  # task gradient, no alignment gradient
        for i, (p, r) in enumerate(zip(self.params, source)):
            g = p.grad
            if r is None:
                if g is not None:
                    unpaired.append(i)
                continue
            if g is None:
                g = torch.zeros_like(r, memory_format=torch.contiguous_format)
                allocated.append((p, g))
            grads.append(g)
            refs.append(r)
            paired.append(i)
        self._check_found(
            task=bool(unpaired) or len(allocated) < len(grads),
            reference=bool(refs),
            allow_missing=allow_missing,
        )

        if grads:
            out = project_conflicting_(
                grads, refs, rho=self.rho, eps=self.eps, per_tensor=per_tensor, backend=self.backend
            )
        else:
            out = torch.zeros(
                (0, 4) if per_tensor else (4,), dtype=torch.float32, device=self.device
            )
        for p, g in allocated:
            p.grad = g
        taken = self._take(0)
        if self.alignment_every > 1 and fresh:
            self._kept = taken
        self._step += 1

        lone = [self.params[i].grad for i in unpaired]
        lone_sq = (
            dot_norms(lone, lone, per_tensor=True, backend=self.backend)[:, 2] if lone else None
        )
        if per_tensor:
            return self._per_tensor_stats(out, paired, unpaired, lone_sq)
        dot, rr, gg, coef = out.unbind(0)
        if lone_sq is not None:
            gg = gg + lone_sq.sum()
        return self._stats(dot, rr, gg, coef)

    def _flat_step(
        self, source: list[Tensor | None], fresh: bool, allow_missing: bool
    ) -> SafeGradStats:
        """``step()`` on the flat buffers: one tensor per dtype reaches the op."""
        refs = self._flats_of(source)
        grads, found = self._flat_task()
        self._check_found(task=found, reference=refs is not None, allow_missing=allow_missing)
        if found and refs is not None:
            out = project_conflicting_(
                grads, refs, rho=self.rho, eps=self.eps, per_tensor=False, backend=self.backend
            )
            dot, rr, gg, coef = out.unbind(0)
        else:  # allow_missing: nothing to pair, the task gradients stay as they are
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            gg = dot_norms(grads, grads, backend=self.backend)[2] if found else zero
            dot = rr = coef = zero
        taken = self._take(0, keep=self.alignment_every > 1 and fresh)
        if self.alignment_every > 1 and fresh:
            self._kept = taken
        self._step += 1
        return self._stats(dot, rr, gg, coef)

    def state_dict(self) -> dict[str, Any]:
        """``{}`` for ``alignment_every=1``; else the step counter and the kept ``g_a``.

        The kept tensors are returned as they are (no copy), like ``Module.state_dict``.
        """
        if self.alignment_every == 1:
            return {}
        return {"alignment_every": self.alignment_every, "step": self._step, "kept": self._kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s result (same params, same ``alignment_every``).

        Everything is checked before anything is set; the kept tensors move to the
        parameters' device.
        """
        if self.alignment_every == 1 and isinstance(state, dict) and not state:
            return
        keys = {"alignment_every", "step", "kept"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a SafeGrad state for alignment_every={self.alignment_every}: expected "
                f"{'no keys' if self.alignment_every == 1 else sorted(keys)}, got {got}"
            )
        if state["alignment_every"] != self.alignment_every:
            raise ValueError(
                f"SafeGrad state was saved with alignment_every={state['alignment_every']}, "
                f"this surgeon has {self.alignment_every}"
            )
        step, kept = state["step"], state["kept"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"SafeGrad state: step must be an int >= 0, got {step!r}")
        if kept is not None:
            if len(kept) != len(self.params):
                raise ValueError(
                    f"SafeGrad state keeps {len(kept)} tensors, this surgeon has "
                    f"{len(self.params)} parameters"
                )
            for i, (p, t) in enumerate(zip(self.params, kept)):
                if t is not None and (not isinstance(t, Tensor) or t.shape != p.shape):
                    what = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"SafeGrad state: kept[{i}] is {what}, params[{i}] has shape "
                        f"{tuple(p.shape)}"
                    )
            kept = [None if t is None else t.to(p.device) for p, t in zip(self.params, kept)]
            if self.flat_grads:  # into buffers of its own, as a capture would leave it
                store = FlatBuffers(self.params)
                for v, t in zip(store.views, kept):
                    if t is not None:
                        v.copy_(t)
                self._spares[0], kept = store, store.views
        self._step, self._kept = step, kept

    def _stats(self, dot: Tensor, rr: Tensor, gg: Tensor, coef: Tensor) -> SafeGradStats:
        return SafeGradStats(dot=dot, ref_norm_sq=rr, grad_norm_sq=gg, coef=coef)

    def _per_tensor_stats(
        self, out: Tensor, paired: list[int], unpaired: list[int], lone_sq: Tensor | None
    ) -> SafeGradStats:
        n = len(self.params)
        if len(paired) == n:
            rows = out
        else:  # rare: some tensor lacks a gradient; assemble rows in params order
            zero = out.new_zeros(4)
            full = [zero] * n
            for k, i in enumerate(paired):
                full[i] = out[k]
            for k, i in enumerate(unpaired):
                full[i] = torch.cat([zero[:2], lone_sq[k : k + 1], zero[3:]])  # type: ignore[index]
            rows = torch.stack(full)
        # Fixed-order float64 sum, as the ops do across tensors.
        dot, rr, gg = rows[:, :3].to(torch.float64).sum(0).to(torch.float32).unbind(0)
        return SafeGradStats(
            dot=dot,
            ref_norm_sq=rr,
            grad_norm_sq=gg,
            coef=rows[:, 3],
            rows=rows,
        )
