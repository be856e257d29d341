"""Backend-independent composition: dtype grouping, fixed-order sums, coefficients.

A backend kernel sees one dtype group at a time (see ``dispatch.Backend``). This
module splits mixed-dtype lists into groups in order of first appearance, merges the
groups' results in that fixed order, and turns reduced sums into surgery
coefficients with device-side ``torch.where`` (never a host branch), so the update
pass reads its coefficient from device memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor

from .dispatch import Backend

# One group: the tensor indices it holds, and the matching sub-list of every input list.
Group = tuple[list[int], list[list[Tensor]]]

_DTYPE = attrgetter("dtype")


def group_by_dtype(lists: Sequence[Sequence[Tensor]]) -> list[Group]:
    """Split parallel lists into runs that share one dtype per list.

    Grouping is keyed by the tuple of dtypes at each index and ordered by first
    appearance, so the grouping (and every fixed-order sum built on it) depends only
    on the inputs' metadata.
    """
    n = len(lists[0])
    # The usual case, one dtype per list: no per-index loop (it costs ~10 ms per 5,000 tensors).
    dtypes = [set(map(_DTYPE, lst)) for lst in lists]
    if all(len(d) <= 1 for d in dtypes):
        return [(list(range(n)), [list(lst) for lst in lists])]
    keys: dict[tuple[torch.dtype, ...], int] = {}
    groups: list[Group] = []
    for i in range(n):
        key = tuple(lst[i].dtype for lst in lists)
        if key not in keys:
            keys[key] = len(groups)
            groups.append(([], [[] for _ in lists]))
        idx, subs = groups[keys[key]]
        idx.append(i)
        for sub, lst in zip(subs, lists):
            sub.append(lst[i])
    return groups


def _gather_rows(n: int, groups: list[Group], results: list[Tensor]) -> Tensor:
    """Reassemble per-group row blocks into input order (one cat, no index upload)."""
    if len(groups) == 1:
        return results[0]
    rows: list[Tensor | None] = [None] * n
    for (idx, _), res in zip(groups, results):
        for j, i in enumerate(idx):
            rows[i] = res[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def _take(vec: Tensor, idx: list[int], n: int) -> Tensor:
    """``vec[idx]`` for a host-side index list without uploading an index tensor."""
    if len(idx) == n:
        return vec
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return vec[idx[0] : idx[0] + len(idx)]
    return torch.stack([vec[i] for i in idx])


def per_tensor_dot_norms(
    backend: Backend, grads: list[Tensor], refs: list[Tensor], groups: list[Group] | None = None
) -> Tensor:
    """float32 ``[n, 3]`` rows ``[<g, r>, ||r||^2, ||g||^2]`` in input order."""
    groups = groups if groups is not None else group_by_dtype([grads, refs])
    results = [backend.dot_norms(g, r) for _, (g, r) in groups]
    return _gather_rows(len(grads), groups, results)


def total(rows: Tensor) -> Tensor:
    """Fixed-order sum of per-tensor rows, accumulated in float64, returned as float32."""
    return rows.to(torch.float64).sum(0).to(torch.float32)


def coefficients(sums: Tensor, rho: float, eps: float) -> tuple[Tensor, Tensor]:
    """From ``[..., 3]`` sums, the projection coefficient ``c`` and the update weight ``a``.

    ``c = dot / ||r||^2`` where ``dot < 0`` and ``||r||^2 > eps`` (else 0), and the
    update is ``g += a * r`` with ``a = rho - c``. Non-finite sums give ``a = 0`` (the
    gradients are left untouched) and ``c = 0``; the returned sums show the problem.
    """
    dot, rr, _ = sums.unbind(-1)
    finite = torch.isfinite(sums).all(-1)
    conflict = (dot < 0) & (rr > eps) & finite
    # rr is only a divisor where it is > eps >= 0; elsewhere divide by 1 to avoid 0/0.
    c = torch.where(conflict, dot / torch.where(conflict, rr, 1.0), 0.0)
    a = torch.where(finite, rho - c, 0.0)
    return c, a


def axpy_(
    backend: Backend,
    grads: list[Tensor],
    refs: list[Tensor],
    coef: Tensor,
    groups: list[Group] | None = None,
) -> None:
    """``grads[i] += coef[i] * refs[i]`` for float32 ``coef`` of shape ``[n]``."""
    n = len(grads)
    groups = groups if groups is not None else group_by_dtype([grads, refs])
    for idx, (g, r) in groups:
        backend.axpy_(g, r, _take(coef, idx, n).contiguous())


def project_conflicting_(
    backend: Backend,
    grads: list[Tensor],
    refs: list[Tensor],
    rho: float,
    eps: float,
    per_tensor: bool,
) -> Tensor:
    groups = group_by_dtype([grads, refs])
    rows = per_tensor_dot_norms(backend, grads, refs, groups)
    sums = rows if per_tensor else total(rows)
    c, a = coefficients(sums, rho, eps)
    coef = a if per_tensor else a.expand(len(grads))
    axpy_(backend, grads, refs, coef.contiguous(), groups)
    return torch.cat([sums, c.unsqueeze(-1)], dim=-1)


def gram(backend: Backend, lists: list[list[Tensor]]) -> Tensor:
    results = [backend.gram(subs) for _, subs in group_by_dtype(lists)]
    if len(results) == 1:
        return results[0]
    return torch.stack(results).to(torch.float64).sum(0).to(torch.float32)


def combine_(
    backend: Backend, out: list[Tensor], lists: list[list[Tensor]], weights: Tensor
) -> None:
    w = weights.to(torch.float32).contiguous()
    for _, (o, *subs) in group_by_dtype([out, *lists]):
        backend.combine_(o, subs, w)
