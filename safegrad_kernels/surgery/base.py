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

Flat gradients (``flat_grads=True``, issue 14): the surgeon owns one contiguous buffer
per dtype for the task gradients and one per captured slot, and every ``p.grad`` is a
view into it. Autograd accumulates into an existing ``p.grad`` in place, so the views
stay put, and a step's ops see one tensor per dtype instead of one per parameter: the
per-tensor host work (validation, pointer tables, kernel arguments) becomes one identity
check per parameter. Buffers are zeroed instead of dropped (one memset per dtype and
slot a step) and stay allocated: N elements per slot more than the default between
steps. Anything that replaced a view (``optimizer.zero_grad()`` with its default
``set_to_none=True``, a ``create_graph`` backward, an engine) is repaired at the step
by copying that gradient into its view (a missing one counts as zero), so results never
depend on whether the fast path held; ``Surgeon.zero_grad()`` (or
``zero_grad(set_to_none=False)``) keeps it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from operator import attrgetter
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


_GRAD = attrgetter("grad")


class FlatBuffers:
    """One zeroed contiguous buffer per dtype (first-appearance order), one view per param.

    ``views[i]`` has ``params[i]``'s shape; ``flats[j]`` is the ``j``-th dtype's buffer.
    Two instances built from the same parameters pair up index by index, flat by flat.
    """

    def __init__(self, params: tuple[Tensor, ...]) -> None:
        sizes: dict[torch.dtype, int] = {}
        offsets = []
        for p in params:
            offsets.append(sizes.get(p.dtype, 0))
            sizes[p.dtype] = offsets[-1] + p.numel()
        device = params[0].device
        by_dtype = {d: torch.zeros(n, dtype=d, device=device) for d, n in sizes.items()}
        self.flats: list[Tensor] = list(by_dtype.values())
        self.views: list[Tensor] = [
            by_dtype[p.dtype][o : o + p.numel()].view(p.shape) for p, o in zip(params, offsets)
        ]

    def zero_(self) -> None:
        for f in self.flats:
            f.zero_()


def install_views(params: tuple[Tensor, ...], views: list[Tensor]) -> bool:
    """Make every ``p.grad`` its view; ``True`` when they already were (the fast path).

    A gradient that replaced its view is copied into it, a missing one zeroes it, so
    the views then hold exactly what ``p.grad`` held (``None`` counting as zero).
    """
    if all(map(operator.is_, map(_GRAD, params), views)):
        return True
    for p, v in zip(params, views):
        g = p.grad
        if g is v:
            continue
        if g is None:
            v.zero_()
        else:
            v.copy_(g)
        p.grad = v
    return False


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
        flat_grads: own the gradients in flat per-dtype buffers with ``p.grad`` as views
            (module docstring; dense, non-distributed tensors only).

    Every parameter that receives a gradient inside a capture context must be in
    ``params``: the swap covers only those, so any other parameter would get the
    captured gradient added to its ordinary ``.grad``. Contexts do not nest, and
    ``step()``/``reset()`` inside one raise ``RuntimeError``.

    Subclasses implement ``step()``; they read a slot with ``_peek(slot)`` and hand
    it over with ``_take(slot)``, which leaves ``None`` in its place.
    """

    def __init__(
        self, params: Iterable[Tensor], *, num_slots: int, flat_grads: bool = False
    ) -> None:
        self.params: tuple[Tensor, ...] = _check_params(params)
        self._slots: list[list[Tensor | None]] = [
            [None] * len(self.params) for _ in range(num_slots)
        ]
        self._active: int | None = None
        if not isinstance(flat_grads, bool):
            raise TypeError(f"flat_grads must be a bool, got {type(flat_grads).__name__}")
        self.flat_grads = flat_grads
        self._task: FlatBuffers | None = None
        # Per slot: the buffers captures go into, a spare (see _take), whether it holds
        # this step's captures.
        self._stores: list[FlatBuffers | None] = [None] * num_slots
        self._spares: list[FlatBuffers | None] = [None] * num_slots
        self._live = [False] * num_slots
        if flat_grads:
            for i, p in enumerate(self.params):
                if type(p) is not torch.nn.Parameter and type(p) is not Tensor:
                    raise TypeError(
                        f"flat_grads=True needs plain tensors; params[{i}] is a "
                        f"{type(p).__name__} (a sharded DTensor owns its gradient layout): "
                        "use flat_grads=False"
                    )
            self._task = FlatBuffers(self.params)
            install_views(self.params, self._task.views)  # existing gradients copied in

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @contextmanager
    def _capture(self, slot: int) -> Iterator[None]:
        if self._active is not None:
            raise RuntimeError(
                f"{type(self).__name__}: a capture context is already active; contexts do not nest"
            )
        if self.flat_grads:
            store = self._stores[slot]
            if store is None:
                store = self._stores[slot] = FlatBuffers(self.params)
            elif not self._live[slot]:
                store.zero_()
            self._live[slot] = True
            buffers = store.views
        else:
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
            if self.flat_grads:
                install_views(self.params, buffers)
            else:
                for i, p in enumerate(self.params):
                    buffers[i] = p.grad
            for p, g in zip(self.params, stash):
                p.grad = g
            self._active = None

    def zero_grad(self) -> None:
        """Zero the task gradients: ``p.grad = None``, or with ``flat_grads`` the buffers.

        With flat gradients it also puts back any view that something replaced, so the
        next step takes the fast path; ``optimizer.zero_grad(set_to_none=False)`` does
        the same job one tensor at a time.
        """
        self._check_idle("zero_grad()")
        if self._task is None:
            for p in self.params:
                p.grad = None
            return
        self._task.zero_()
        if not all(map(operator.is_, map(_GRAD, self.params), self._task.views)):
            for p, v in zip(self.params, self._task.views):
                p.grad = v

    def _flat_task(self) -> tuple[list[Tensor], bool]:
        """Flat mode: the task buffers after ``install_views``, and whether any was found.

        "Found" is whether any ``p.grad`` was set when the step began (a view counts):
        an engine that moved every gradient out leaves ``None`` everywhere.
        """
        assert self._task is not None
        views = self._task.views
        if all(map(operator.is_, map(_GRAD, self.params), views)):
            return self._task.flats, True  # the fast path: one identity check a parameter
        found = any(map(operator.is_not, map(_GRAD, self.params), [None] * len(views)))
        if found:
            install_views(self.params, views)
        return self._task.flats, found

    def _flats_of(self, views: list[Tensor | None]) -> list[Tensor] | None:
        """The flat buffers behind a list ``_take`` returned (flat mode), else ``None``."""
        for store in (*self._stores, *self._spares):
            if store is not None and store.views is views:
                return store.flats
        return None

    def _take(self, slot: int, *, keep: bool = False) -> list[Tensor | None]:
        """The slot's buffers, handed over; the slot restarts from ``None``.

        Flat mode: the views of the slot's buffers, or all ``None`` if nothing was
        captured. Unless ``keep``, the next capture zeroes and reuses those buffers; with
        ``keep`` (the caller holds on to them) it goes into the spare instead, and the
        buffers kept before become the spare (so a caller keeps one set at a time).
        """
        self._check_idle("step()")
        if not self.flat_grads:
            taken = self._slots[slot]
            self._slots[slot] = [None] * len(self.params)
            return taken
        if not self._live[slot]:
            return [None] * len(self.params)
        self._live[slot] = False
        store = self._stores[slot]
        assert store is not None
        if keep:
            self._stores[slot], self._spares[slot] = self._spares[slot], store
        return store.views

    def _peek(self, slot: int) -> list[Tensor | None]:
        if self.flat_grads:
            store = self._stores[slot]
            if not self._live[slot] or store is None:
                return [None] * len(self.params)
            return store.views  # type: ignore[return-value]
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
        """Whether any gradient was captured into ``slot`` since the last step (host-side).

        Flat mode: whether a capture context was entered (its buffers are never ``None``).
        """
        if self.flat_grads:
            return self._live[slot]
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
        self._live = [False] * len(self._live)

    def step(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return f"{type(self).__name__}({len(self.params)} tensors, {n} params, {self.device})"
