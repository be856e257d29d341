"""The one place where the ``safegrad::`` torch ops are defined.

Each op gets its schema from the typed signature below, a real implementation that
validates, resolves the backend and runs ``ops.compose``, and a fake (meta)
implementation so ``torch.compile`` can trace through it. The backend is part of
the schema as a string so that a compiled graph keeps the caller's choice.

List-of-lists arguments do not exist in op schemas, so ``gram`` and ``combine_``
take the m lists concatenated (list j at ``[j * n, (j + 1) * n)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compose, validate
from .dispatch import resolve


def _split(tensors: list[Tensor], m: int) -> list[list[Tensor]]:
    if m < 1 or len(tensors) % m:
        raise ValueError(f"{len(tensors)} tensors cannot be split into {m} equal lists")
    n = len(tensors) // m
    return [list(tensors[j * n : (j + 1) * n]) for j in range(m)]


def _checked_pairs(grads: list[Tensor], refs: list[Tensor]) -> torch.device | None:
    device = validate.check_pairs(("grads", "refs"), (grads, refs))
    validate.check_no_overlap("grads", grads, [("refs", refs)])
    return device


@torch.library.custom_op("safegrad::dot_norms", mutates_args=())
def dot_norms(
    grads: list[Tensor], refs: list[Tensor], per_tensor: bool, backend: str | None
) -> Tensor:
    device = validate.check_pairs(("grads", "refs"), (grads, refs))
    if device is None:
        return torch.zeros((0, 3) if per_tensor else (3,), dtype=torch.float32)
    rows = compose.per_tensor_dot_norms(resolve(backend, device), grads, refs)
    return rows.clone() if per_tensor else compose.total(rows)


@dot_norms.register_fake
def _(grads, refs, per_tensor, backend):
    validate.check_pairs(("grads", "refs"), (grads, refs))
    device = grads[0].device if grads else torch.device("cpu")
    shape = (len(grads), 3) if per_tensor else (3,)
    return torch.empty(shape, dtype=torch.float32, device=device)


@torch.library.custom_op("safegrad::project_conflicting_", mutates_args=("grads",))
def project_conflicting_(
    grads: list[Tensor],
    refs: list[Tensor],
    rho: float,
    eps: float,
    per_tensor: bool,
    backend: str | None,
) -> Tensor:
    device = _checked_pairs(grads, refs)
    if device is None:
        return torch.zeros((0, 4) if per_tensor else (4,), dtype=torch.float32)
    return compose.project_conflicting_(resolve(backend, device), grads, refs, rho, eps, per_tensor)


@project_conflicting_.register_fake
def _(grads, refs, rho, eps, per_tensor, backend):
    validate.check_pairs(("grads", "refs"), (grads, refs))
    device = grads[0].device if grads else torch.device("cpu")
    shape = (len(grads), 4) if per_tensor else (4,)
    return torch.empty(shape, dtype=torch.float32, device=device)


@torch.library.custom_op("safegrad::axpy_", mutates_args=("grads",))
def axpy_(grads: list[Tensor], refs: list[Tensor], coef: Tensor, backend: str | None) -> None:
    """``grads[i] += coef[i] * refs[i]``: the update pass on its own (used by the sharded path)."""
    device = _checked_pairs(grads, refs)
    if device is None:
        return
    if coef.shape != (len(grads),):
        raise ValueError(f"coef must have shape [{len(grads)}], got {tuple(coef.shape)}")
    if coef.device != device:
        raise ValueError(f"coef is on {coef.device} but the gradients are on {device}")
    compose.axpy_(resolve(backend, device), grads, refs, coef.to(torch.float32))


@axpy_.register_fake
def _(grads, refs, coef, backend):
    return None


@torch.library.custom_op("safegrad::gram", mutates_args=())
def gram(tensors: list[Tensor], m: int, backend: str | None) -> Tensor:
    lists = _split(tensors, m)
    names = [f"lists[{j}]" for j in range(m)]
    device = validate.check_pairs(names, lists)
    if device is None:
        return torch.zeros(m, m, dtype=torch.float32)
    return compose.gram(resolve(backend, device), lists).clone()


@gram.register_fake
def _(tensors, m, backend):
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(m, m, dtype=torch.float32, device=device)


@torch.library.custom_op("safegrad::combine_", mutates_args=("out",))
def combine_(
    out: list[Tensor],
    tensors: list[Tensor],
    weights: Tensor,
    out_is_first: bool,
    backend: str | None,
) -> None:
    """``out = sum_j weights[j] * lists[j]``.

    With ``out_is_first`` the caller's ``lists[0]`` is ``out`` itself and ``tensors``
    holds only ``lists[1:]`` (schemas cannot express a mutated argument that also
    appears among the inputs).
    """
    m = weights.shape[0]
    rest = (
        _split(tensors, m - 1)
        if out_is_first and m > 1
        else ([] if out_is_first else _split(tensors, m))
    )
    lists = [out, *rest] if out_is_first else rest
    names = ["out"] + [f"lists[{j}]" for j in range(len(lists))]
    device = validate.check_pairs(names, [out, *lists])
    validate.check_weights(weights, len(lists), device)
    reads = [(f"lists[{j}]", lst) for j, lst in enumerate(lists) if not (out_is_first and j == 0)]
    validate.check_no_overlap("out", out, reads)
    if device is None:
        return
    compose.combine_(resolve(backend, device), out, lists, weights)


@combine_.register_fake
def _(out, tensors, weights, out_is_first, backend):
    return None
