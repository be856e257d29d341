"""What every surgeon shares: its parameter list and the capture of extra gradients.

A surgeon needs, besides the task gradient that autograd leaves in ``p.grad``, one or
more *other* gradients of the same parameters (the alignment gradient for SafeGrad
and SPF, one per extra objective for PCGrad). Capturing them costs no copy: inside
a capture context each ``p.grad`` is swapped for the surgeon's own buffer for that
slot (``None`` at the start of a step), autograd accumulates into it as usual, and on
exit the buffer is taken back and the task gradient put back in place. Only Python
attribute assignments happen; the tensors themselves never move.

Hence both kinds of gradient accumulate across micro-batches exactly as plain
``p.grad`` does, the contexts may be entered before or after the task backward and
any number of times per step, and ``step()`` consumes the captured buffers by
dropping them (the next step starts from ``None``: no ``zero_()`` traffic).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..ops import BACKEND_NAMES

__all__ = ["Surgeon"]


def _check_params(params: object, name: str = "params") -> tuple[Tensor, ...]:
    if isinstance(params, Tensor):
        raise TypeError(
            f"{name} must be an iterable of tensors (e.g. model.parameters()), got a Tensor"
        )
    try:
        items = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"{name} must be an iterable of tensors, got {type(params).__name__}"
        ) from None
    if items and all(isinstance(g, dict) for g in items):  # optimizer.param_groups
        try:
            items = [p for g in items for p in g["params"]]
        except KeyError:
            raise TypeError(f"{name}: a parameter group dict needs a 'params' entry") from None
    out: list[Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(
                f"{name}[{i}] has dtype {p.dtype}; gradients need floating-point parameters"
            )
        if not p.requires_grad:
            continue  # frozen: autograd never gives it a gradient, so there is nothing to do
        if id(p) in seen:
            continue  # listed twice (tied weights): one tensor, one gradient, counted once
        seen.add(id(p))
        out.append(p)
    if not out:
        raise ValueError(f"{name} is empty (or every parameter has requires_grad=False)")
    devices = {p.device for p in out}
    if len(devices) > 1:
        raise ValueError(
            f"{name} span several devices {sorted(map(str, devices))}; a surgeon needs one "
            "device (the surgery sums run over all parameters at once)"
        )
    return tuple(out)


def check_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_backend(backend: object) -> str | None:
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got {backend!r}")
    return backend  # type: ignore[return-value]


class Surgeon:
    """Base class: a parameter list plus ``num_slots`` capture buffers per parameter.

    Args:
        params: the trainable parameters (any iterable, e.g. ``model.parameters()``,
            or an optimizer's ``param_groups``).
            Parameters with ``requires_grad=False`` are dropped; a tensor listed twice
            is kept once (first position); non-floating tensors raise ``TypeError``; an
            empty result or parameters on several devices raise ``ValueError``.
        num_slots: how many extra gradients per parameter the subclass captures.

    Every parameter that receives a gradient inside a capture context must be in
    ``params``: the swap covers only those, so any other parameter would get the
    captured gradient added to its ordinary ``.grad``. Contexts do not nest, and
    ``step()``/``reset()`` inside one raise ``RuntimeError``.

    Subclasses implement ``step()``; they read a slot with ``_peek(slot)`` and hand
    it over with ``_take(slot)``, which leaves ``None`` in its place.
    """

    def __init__(self, params: Iterable[Tensor], *, num_slots: int) -> None:
        self.params: tuple[Tensor, ...] = _check_params(params)
        self._slots: list[list[Tensor | None]] = [
            [None] * len(self.params) for _ in range(num_slots)
        ]
        self._active: int | None = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @contextmanager
    def _capture(self, slot: int) -> Iterator[None]:
        if self._active is not None:
            raise RuntimeError(
                f"{type(self).__name__}: a capture context is already active; contexts do not nest"
            )
        buffers = self._slots[slot]
        stash = [p.grad for p in self.params]
        for p, buf in zip(self.params, buffers):
            p.grad = buf
        self._active = slot
        try:
            yield
        finally:
            # Runs on error too, so the task gradients are never lost; a backward that
            # failed halfway leaves whatever it accumulated in the slot.
            for i, p in enumerate(self.params):
                buffers[i] = p.grad
                p.grad = stash[i]
            self._active = None

    def _take(self, slot: int) -> list[Tensor | None]:
        """The slot's buffers, handed over; the slot restarts from ``None``."""
        self._check_idle("step()")
        taken = self._slots[slot]
        self._slots[slot] = [None] * len(self.params)
        return taken

    def _peek(self, slot: int) -> list[Tensor | None]:
        return self._slots[slot]

    def _check_found(self, task: bool, reference: bool, allow_missing: bool) -> None:
        """Never silently off: raise if a step finds no task or no captured gradient at all.

        ``None`` checks are host-side metadata, no device sync. Partly missing gradients
        are fine (each surgeon documents how it treats them); *none* on every parameter
        means the surgery would do nothing while the run looks healthy.
        """
        if allow_missing or (task and reference):
            return
        kind = " or ".join(
            k
            for k, found in (("task (p.grad)", task), ("captured reference", reference))
            if not found
        )
        raise RuntimeError(
            f"{type(self).__name__}.step() found no {kind} gradient on any of its "
            f"{len(self.params)} parameters, so the surgery would silently do nothing. Likely "
            "cause: an engine moved the gradients out of p.grad (DeepSpeed ZeRO; use "
            "SafeGradTrainer, which supports ZeRO-1/2), a backward that did not reach these "
            "parameters, or a missing reference() pass. Pass allow_missing=True to accept it."
        )

    def _check_idle(self, what: str) -> None:
        if self._active is not None:
            raise RuntimeError(f"{type(self).__name__}.{what} called inside a capture context")

    @property
    def wants_reference(self) -> bool:
        """Whether this step needs the captured gradient(s); always, unless overridden (SPF)."""
        return True

    def has_captured(self, slot: int = 0) -> bool:
        """Whether any gradient was captured into ``slot`` since the last step (host-side)."""
        return any(b is not None for b in self._slots[slot])

    def state_dict(self) -> dict[str, Any]:
        """State carried from one step to the next, for checkpoints (empty when stateless).

        Captured gradients are not part of it: a checkpoint is taken between steps.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (on a surgeon built with the same params)."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state, got a state with keys {sorted(state)}"
            )

    def reset(self) -> None:
        """Drop every captured gradient (e.g. when a step is skipped after an overflow)."""
        self._check_idle("reset()")
        for slot in self._slots:
            slot[:] = [None] * len(self.params)

    def step(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return f"{type(self).__name__}({len(self.params)} tensors, {n} params, {self.device})"
