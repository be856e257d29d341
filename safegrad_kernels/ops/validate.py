"""Argument checks shared by every op.

Everything here runs before any kernel touches memory, so a bad call raises a
``TypeError``/``ValueError`` that names the argument and index and leaves every
gradient untouched. Checks read only metadata (shapes, dtypes, devices, strides,
storage addresses): no host synchronisation.
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
    device = None
    for name, lst in zip(names, lists):
        for i, t in enumerate(lst):
            check_tensor(f"{name}[{i}]", t)
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device} but {first} is on {device}; "
                    "all tensors must share one device"
                )
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
    *,
    allow_identical: str | None = None,
) -> None:
    """Written tensors overlap neither each other nor anything read.

    Views of one flat buffer are fine as long as their byte ranges are disjoint, and
    read tensors may overlap each other. ``allow_identical`` names a read list whose
    i-th tensor may *be* ``written[i]`` (same address, shape and dtype): the documented
    in-place form ``combine_(out, [out, ...])``. Empty tensors never overlap.

    Vectorised: sort all ranges by start; a range overlaps an earlier one exactly when
    it starts before the furthest end seen so far (a running maximum). Written ranges
    compare against every earlier range, read ranges only against earlier written ones.
    """
    # The tensors to compare, and (for the error message only) where each came from.
    tensors = list(written)
    origin: list[tuple[str, list[int] | None, int]] = [(written_name, None, len(written))]
    for name, lst in read:
        if name == allow_identical:
            keep = [
                i
                for i, (t, w) in enumerate(zip(lst, written))
                if not (t.data_ptr() == w.data_ptr() and t.shape == w.shape and t.dtype == w.dtype)
            ]
            keep += range(len(written), len(lst))
            tensors += [lst[i] for i in keep]
            origin.append((name, keep, len(keep)))
        else:
            tensors += lst
            origin.append((name, None, len(lst)))
    if len(tensors) < 2:
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
        for name, keep, count in origin:
            if j < count:
                return f"{name}[{j if keep is None else keep[j]}]"
            j -= count
        raise AssertionError("unreachable")

    raise ValueError(
        f"{label(culprit)} overlaps {label(other)} in memory; tensors written "
        "in place must not alias other inputs"
    )


def check_scalar(name: str, value: object, *, min_value: float = 0.0) -> float:
    """``value`` as a float: a finite Python number, ``>= 0`` unless ``min_value`` says otherwise.

    The one rule for the scalar weights of every layer (the ops' ``rho`` and ``eps``, the
    surgeons', the method registry's ``rho`` and ``lam``): a tensor is refused, since
    reading it would synchronise the host.
    """
    if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < min_value:
        raise ValueError(f"{name} must be >= {min_value:g}, got {value}")
    return value


def check_weights(weights: object, m: int, device: torch.device | None) -> Tensor:
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"weights must be a tensor of shape [{m}] on the gradients' device "
            f"(a device tensor avoids a host sync), got {type(weights).__name__}"
        )
    if weights.shape != (m,):
        raise ValueError(
            f"weights must have shape [{m}] (one per list), got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if device is not None and weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the gradients are on {device}")
    return weights
