"""Argument checks of every op, in two kinds and one place each.

* **Types** (:func:`tensor_list`, :func:`tensor_lists`, :func:`python_float`,
  :func:`tensor`): what the op schemas declare, checked by ``ops.functional`` before it
  calls a ``safegrad::`` op, so that a wrong Python type gets a message naming the
  argument instead of the dispatcher's schema error.
* **Values and metadata** (:func:`check_lists`, :func:`check_scalar`,
  :func:`check_weights`, :func:`check_coef`): the authoritative checks, run once per
  call by ``ops.pipeline`` before a backend is chosen or any kernel touches memory, on
  every path (public function, direct ``torch.ops.safegrad.*`` call, sharded call).
  :func:`check_lists` holds every tensor check, so it is the one function a cache
  keyed on tensor metadata can wrap.

A bad call raises a ``TypeError``/``ValueError`` that names the argument and index and
leaves every gradient untouched. Checks read only metadata (shapes, dtypes, devices,
strides, storage addresses): no host synchronisation. The fake kernels in
``ops.library`` only place their outputs (a shape, and the inputs' one device from
:func:`common_device`), and the ``TORCH_CHECK``s in ``csrc/safegrad_cpu.cpp`` are a
cheap safety net for memory safety when a ``cpp_*`` kernel op is called directly;
neither replaces these checks.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from operator import attrgetter

import numpy as np
import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------- types


def tensor_list(name: str, value: object) -> list[Tensor]:
    """``value`` as a list of tensors, or a ``TypeError`` naming ``name``."""
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
    # Checked per distinct type, not per element (thousands of tensors share one type).
    if not all(issubclass(tp, Tensor) for tp in set(map(type, out))):
        for i, t in enumerate(out):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def tensor_lists(name: str, value: object) -> list[list[Tensor]]:
    """``value`` as a non-empty list of equally long tensor lists (``gram``, ``combine_``).

    Equal lengths are checked here because the op schemas take the m lists concatenated,
    and only the caller's nesting says where one list ends.
    """
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty sequence of tensor lists")
    out = [tensor_list(f"{name}[{j}]", lst) for j, lst in enumerate(value)]
    for j, lst in enumerate(out[1:], start=1):
        if len(lst) != len(out[0]):
            raise ValueError(
                f"{name}[0] has {len(out[0])} tensors but {name}[{j}] has {len(lst)}; "
                "they must pair up"
            )
    return out


def python_float(name: str, value: object) -> float:
    """``value`` (a Python int or float, not a bool or tensor) as a float."""
    if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def tensor(name: str, value: object, what: str) -> Tensor:
    """``value`` if it is a tensor, else a ``TypeError`` saying ``what`` it should be."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------ values and metadata


def check_tensor(name: str, t: Tensor) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; "
            "pass t.contiguous() (gradients of contiguous parameters always are)"
        )


_NBYTES = attrgetter("nbytes")
_DEVICE, _DTYPE, _LAYOUT, _SHAPE = (
    attrgetter("device"),
    attrgetter("dtype"),
    attrgetter("layout"),
    attrgetter("shape"),
)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _all_good(lists: Sequence[Sequence[Tensor]]) -> bool:
    """The common case in one pass of ``map`` calls: no Python loop body per tensor.

    Thousands of tensors cost well under a millisecond here, against tens of
    milliseconds for the per-tensor loop of ``check_pairs``; any doubt falls through to
    that loop, which finds the first culprit and names it.
    """
    n = len(lists[0])
    if any(len(lst) != n for lst in lists):
        return False
    flat = list(itertools.chain.from_iterable(lists))
    if not flat:
        return True
    return (
        len(set(map(_DEVICE, flat))) == 1
        and set(map(_LAYOUT, flat)) == {torch.strided}
        and _SUPPORTED.issuperset(map(_DTYPE, flat))
        and all(map(Tensor.is_contiguous, flat))
        and all(all(map(operator.eq, map(_SHAPE, lists[0]), map(_SHAPE, lst))) for lst in lists[1:])
    )


def common_device(names: Sequence[str], lists: Sequence[Sequence[Tensor]]) -> torch.device | None:
    """The device every tensor is on (``None`` if there are none), or a ``ValueError``.

    Also what a fake kernel needs to place its output: the dispatcher hands any call with
    a meta tensor to the fake, even alongside real tensors, and such a call has no
    output device.
    """
    devices = set(map(_DEVICE, itertools.chain.from_iterable(lists)))
    if len(devices) <= 1:
        return next(iter(devices), None)
    device = None
    for name, lst in zip(names, lists):
        for i, t in enumerate(lst):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device} but {first} is on {device}; "
                    "all tensors must share one device"
                )
    raise AssertionError("unreachable")


def check_pairs(names: Sequence[str], lists: Sequence[Sequence[Tensor]]) -> torch.device | None:
    """Equal lengths, pairwise equal shapes, supported dtypes, one device.

    Returns the common device, or ``None`` when the lists are empty.
    """
    if _all_good(lists):
        first = next((lst[0] for lst in lists if lst), None)
        return None if first is None else first.device
    n = len(lists[0])
    for name, lst in zip(names[1:], lists[1:]):
        if len(lst) != n:
            raise ValueError(
                f"{names[0]} has {n} tensors but {name} has {len(lst)}; they must pair up"
            )
    for name, lst in zip(names, lists):
        for i, t in enumerate(lst):
            check_tensor(f"{name}[{i}]", t)
    device = common_device(names, lists)
    for name, lst in zip(names[1:], lists[1:]):
        for i, (a, b) in enumerate(zip(lists[0], lst)):
            if a.shape != b.shape:
                raise ValueError(
                    f"shape mismatch at index {i}: {names[0]}[{i}] is {tuple(a.shape)} "
                    f"but {name}[{i}] is {tuple(b.shape)}"
                )
    return device


def _spans(tensors: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``[start, end)`` of ``tensors`` (empty tensors give empty ranges)."""
    start = np.fromiter(map(Tensor.data_ptr, tensors), np.int64, len(tensors))
    nbytes = np.fromiter(map(_NBYTES, tensors), np.int64, len(tensors))  # dense: numel * size
    return start, start + nbytes


def check_no_overlap(
    written_name: str,
    written: Sequence[Tensor],
    read: Sequence[tuple[str, Sequence[Tensor]]],
) -> None:
    """Written tensors overlap neither each other nor anything read.

    Views of one flat buffer are fine as long as their byte ranges are disjoint, and
    read tensors may overlap each other. Empty tensors never overlap. (``combine_``'s
    in-place form, ``out`` being ``lists[0]``, never reaches here as an overlap: the op
    passes ``lists[0]`` only as ``out``.)

    Vectorised: sort all ranges by start; a range overlaps an earlier one exactly when
    it starts before the furthest end seen so far (a running maximum). Written ranges
    compare against every earlier range, read ranges only against earlier written ones.
    """
    # The tensors to compare, and (for the error message only) where each came from.
    tensors = list(written)
    origin: list[tuple[str, int]] = [(written_name, len(written))]
    for name, lst in read:
        tensors += lst
        origin.append((name, len(lst)))
    if len(tensors) < 2:
        return
    if len(tensors) <= 8:  # e.g. flat buffers: numpy's set-up would cost more than the loop
        spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors]
        n_written = len(written)
        if not any(
            s0 < e1 and s1 < e0
            for i, (s0, e0) in enumerate(spans)
            for j, (s1, e1) in enumerate(spans[:i])
            if (i < n_written or j < n_written) and e0 > s0 and e1 > s1
        ):
            return
    start, end = _spans(tensors)
    is_written = np.zeros(len(tensors), dtype=bool)
    is_written[: len(written)] = True
    nonempty = end > start
    order = np.lexsort((end, start))
    order = order[nonempty[order]]
    if len(order) < 2:
        return
    s, e, w = start[order], end[order], is_written[order]
    far_any = np.maximum.accumulate(e)
    far_written = np.maximum.accumulate(np.where(w, e, np.iinfo(np.int64).min))
    bad = (s[1:] < far_written[:-1]) | (w[1:] & (s[1:] < far_any[:-1]))
    if not bad.any():
        return
    # Name the first offender and one tensor it overlaps.
    k = int(np.argmax(bad)) + 1
    culprit = int(order[k])
    pool = order[:k] if w[k] else order[:k][w[:k]]
    other = int(pool[np.argmax(end[pool] > start[culprit])])

    def label(j: int) -> str:
        for name, count in origin:
            if j < count:
                return f"{name}[{j}]"
            j -= count
        raise AssertionError("unreachable")

    raise ValueError(
        f"{label(culprit)} overlaps {label(other)} in memory; tensors written "
        "in place must not alias other inputs"
    )


def check_lists(
    names: Sequence[str], lists: Sequence[Sequence[Tensor]], *, written: bool = False
) -> torch.device | None:
    """Every tensor check of an op, in one call: the single point a metadata cache can wrap.

    ``lists`` are parallel tensor lists (``grads, refs``; the m lists of ``gram``;
    ``out`` and the lists of ``combine_``); with ``written`` the op writes ``lists[0]``
    in place. Checks :func:`check_pairs` and, for written lists, :func:`check_no_overlap`.
    The verdict depends only on the tensors' metadata (shapes, strides, dtypes, devices,
    layouts, data pointers and sizes) and the ``written`` flag.

    Returns the common device, or ``None`` when the lists are empty.
    """
    device = check_pairs(names, lists)
    if written:
        check_no_overlap(names[0], lists[0], list(zip(names[1:], lists[1:])))
    return device


def check_scalar(name: str, value: object, *, min_value: float = 0.0) -> float:
    """``value`` as a float: a finite Python number, ``>= 0`` unless ``min_value`` says otherwise.

    The one rule for the scalar weights of every layer (the ops' ``rho`` and ``eps``, the
    surgeons', the method registry's ``rho`` and ``lam``): a tensor is refused, since
    reading it would synchronise the host.
    """
    value = python_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < min_value:
        raise ValueError(f"{name} must be >= {min_value:g}, got {value}")
    return value


def check_weights(weights: Tensor, m: int, device: torch.device | None) -> Tensor:
    """``combine_``'s weights: shape ``[m]``, floating, on the gradients' device."""
    if weights.shape != (m,):
        raise ValueError(
            f"weights must have shape [{m}] (one per list), got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if device is not None and weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the gradients are on {device}")
    return weights


def check_coef(coef: Tensor, n: int, device: torch.device) -> Tensor:
    """``axpy_``'s per-tensor coefficients: shape ``[n]``, on the gradients' device."""
    if coef.shape != (n,):
        raise ValueError(f"coef must have shape [{n}], got {tuple(coef.shape)}")
    if coef.device != device:
        raise ValueError(f"coef is on {coef.device} but the gradients are on {device}")
    return coef
