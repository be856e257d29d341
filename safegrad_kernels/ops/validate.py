"""Argument checks shared by every op.

Everything here runs before any kernel touches memory, so a bad call raises a
``TypeError``/``ValueError`` that names the argument and index and leaves every
gradient untouched. Checks read only metadata (shapes, dtypes, devices, strides,
storage addresses): no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor_list(name: str, value: object) -> list[Tensor]:
    """``value`` as a list of tensors, or a ``TypeError`` naming ``name``."""
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
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


def check_pairs(names: Sequence[str], lists: Sequence[Sequence[Tensor]]) -> torch.device | None:
    """Equal lengths, pairwise equal shapes, supported dtypes, one device.

    Returns the common device, or ``None`` when the lists are empty.
    """
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


def _span(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def check_no_overlap(
    written_name: str,
    written: Sequence[Tensor],
    read: Sequence[tuple[str, Sequence[Tensor]]],
    *,
    allow_identical: str | None = None,
) -> None:
    """Written tensors overlap neither each other nor anything read.

    Views of one flat buffer are fine as long as their byte ranges are disjoint.
    ``allow_identical`` names a read list whose i-th tensor may *be* ``written[i]``
    (same address and shape): that is the documented in-place form ``combine_(out,
    [out, ...])``. Empty tensors occupy no memory and never overlap.
    """
    spans = []  # (start, end, label, index, is_written)
    for i, t in enumerate(written):
        if t.numel():
            spans.append((*_span(t), written_name, i, True))
    for name, lst in read:
        for i, t in enumerate(lst):
            if not t.numel():
                continue
            if name == allow_identical and i < len(written):
                w = written[i]
                if w.data_ptr() == t.data_ptr() and w.shape == t.shape and w.dtype == t.dtype:
                    continue
            spans.append((*_span(t), name, i, False))
    spans.sort(key=lambda s: (s[0], s[1]))
    # Sweep: remember the span reaching furthest so far; any later span starting before
    # its end overlaps it. A written span also checks against the furthest span of any kind.
    far_any = None
    far_written = None
    for span in spans:
        start, end, name, i, is_written = span
        for far in (far_written, far_any if is_written else None):
            if far is not None and start < far[1]:
                raise ValueError(
                    f"{name}[{i}] overlaps {far[2]}[{far[3]}] in memory; tensors written "
                    f"in place must not alias other inputs"
                )
        if far_any is None or end > far_any[1]:
            far_any = span
        if is_written and (far_written is None or end > far_written[1]):
            far_written = span


def check_scalar(name: str, value: object, *, min_value: float | None = None) -> float:
    if isinstance(value, Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
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
