"""The op pipeline: what every ``safegrad::`` op does between its schema and the kernels.

Each op runs the same stages, in this order, for every backend and for local and
sharded tensors alike:

1. **validate** (``ops.validate``): every value and metadata check, before anything
   is chosen, allocated or written;
2. **resolve** (``ops.dispatch``): the backend for the tensors' device;
3. **plan** (:func:`group_by_dtype`): split mixed-dtype lists into groups of one dtype
   per list, in order of first appearance, so the grouping (and every fixed-order sum
   built on it) depends only on the inputs' metadata;
4. **sums**: the backend's reduction kernels per group, merged in that fixed order;
5. **reduce** (sharded calls only, ``safegrad_kernels.distributed``): one all-reduce of
   the few floats the sums produced (``n x 3`` per-tensor sums, or the ``m x m`` Gram);
6. **finish**: coefficients from the (global) sums with device-side ``torch.where``
   (never a host branch, see :func:`coefficients`), then the backend's update kernels
   per group, which read their coefficient from device memory.

The local path reaches these functions through the custom ops of ``ops.library``; the
sharded path (``ops.functional`` with DTensors) calls them directly with the local
tensors and the ``ShardInfo`` from ``distributed.localize``: stage 5 is the only
difference, so each algorithm exists once.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor

from .. import distributed
from . import validate
from .backend import Backend
from .dispatch import resolve

# One group: the tensor indices it holds, and the matching sub-list of every input list.
Group = tuple[list[int], list[list[Tensor]]]

PAIR_NAMES = ("grads", "refs")
_DTYPE = attrgetter("dtype")


def list_names(m: int, start: int = 0) -> list[str]:
    """``["lists[start]", ...]``: how error messages name the m lists of gram/combine_."""
    return [f"lists[{j}]" for j in range(start, start + m)]


# ----------------------------------------------------------------------------- plan


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
    """Reassemble per-group row blocks into input order (one stack, no index upload)."""
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


# ----------------------------------------------------------------------------- sums


def _dot_norm_rows(
    backend: Backend, groups: list[Group], n: int, shard: distributed.ShardInfo | None
) -> Tensor:
    """float32 ``[n, 3]`` rows ``[<g, r>, ||r||^2, ||g||^2]`` in input order.

    Sharded, the rows of the local pieces are then summed across ranks (the reduce stage).
    """
    rows = _gather_rows(n, groups, [backend.dot_norms(g, r) for _, (g, r) in groups])
    return rows if shard is None else distributed.all_reduce_sums(rows, shard)


def _gram(backend: Backend, lists: list[list[Tensor]]) -> Tensor:
    results = [backend.gram(subs) for _, subs in group_by_dtype(lists)]
    if len(results) == 1:
        return results[0]
    return total(torch.stack(results))


def total(rows: Tensor) -> Tensor:
    """Fixed-order sum over the first dim, accumulated in float64, returned as float32."""
    if rows.shape[0] == 1 and rows.dtype == torch.float32:  # e.g. one flat buffer: exact
        return rows[0]
    return rows.to(torch.float64).sum(0).to(torch.float32)


# ----------------------------------------------------------------------------- finish


def coefficients(sums: Tensor, rho: float, eps: float) -> tuple[Tensor, Tensor]:
    """From ``[..., 3]`` sums, the projection coefficient ``c`` and the update weight ``a``.

    ``c = dot / ||r||^2`` where ``dot < 0`` and ``||r||^2 > eps`` (else 0), and the
    update is ``g += a * r`` with ``a = rho - c``. Non-finite sums give ``a = 0`` (the
    gradients are left untouched) and ``c = 0``; the returned sums show the problem.
    """
    dot, rr, _ = sums.unbind(-1)
    finite = torch.isfinite(sums).all(-1)
    conflict = (dot < 0) & (rr > eps) & finite
    # Where rr <= eps the quotient may be inf or nan; where() discards it (no error, no
    # gradient flows here), so it needs no guarded divisor.
    c = torch.where(conflict, dot / rr, 0.0)
    a = torch.where(finite, rho - c, 0.0)
    return c, a


def _axpy(backend: Backend, groups: list[Group], coef: Tensor, n: int) -> None:
    """``grads[i] += coef[i] * refs[i]`` group by group, for float32 ``coef`` of shape ``[n]``."""
    for idx, (g, r) in groups:
        backend.axpy_(g, r, _take(coef, idx, n).contiguous())


# ----------------------------------------------------------------------------- the ops


def dot_norms(
    grads: list[Tensor],
    refs: list[Tensor],
    per_tensor: bool,
    backend: str | None,
    shard: distributed.ShardInfo | None = None,
) -> Tensor:
    """``[<g, r>, ||r||^2, ||g||^2]`` summed over all tensors, or per tensor (``[n, 3]``)."""
    device = validate.check_lists(PAIR_NAMES, (grads, refs))
    if device is None:
        return torch.zeros((0, 3) if per_tensor else (3,), dtype=torch.float32)
    kernels = resolve(backend, device)
    rows = _dot_norm_rows(kernels, group_by_dtype([grads, refs]), len(grads), shard)
    return rows.clone() if per_tensor else total(rows)


def project_conflicting_(
    grads: list[Tensor],
    refs: list[Tensor],
    rho: float,
    eps: float,
    per_tensor: bool,
    backend: str | None,
    shard: distributed.ShardInfo | None = None,
) -> Tensor:
    """The SafeGrad update in place on ``grads``; ``[4]`` (or ``[n, 4]``) sums and coefficient."""
    device = validate.check_lists(PAIR_NAMES, (grads, refs), written=True)
    validate.check_scalar("rho", rho)
    validate.check_scalar("eps", eps, min_value=0.0)
    if device is None:
        return torch.zeros((0, 4) if per_tensor else (4,), dtype=torch.float32)
    kernels = resolve(backend, device)
    n = len(grads)
    groups = group_by_dtype([grads, refs])
    rows = _dot_norm_rows(kernels, groups, n, shard)
    sums = rows if per_tensor else total(rows)
    c, a = coefficients(sums, rho, eps)
    _axpy(kernels, groups, (a if per_tensor else a.expand(n)).contiguous(), n)
    return torch.cat([sums, c.unsqueeze(-1)], dim=-1)


def axpy_(grads: list[Tensor], refs: list[Tensor], coef: Tensor, backend: str | None) -> None:
    """``grads[i] += coef[i] * refs[i]``: the update kernels on their own."""
    device = validate.check_lists(PAIR_NAMES, (grads, refs), written=True)
    if device is None:
        return
    validate.check_coef(coef, len(grads), device)
    kernels = resolve(backend, device)
    _axpy(kernels, group_by_dtype([grads, refs]), coef.to(torch.float32), len(grads))


def gram(
    lists: list[list[Tensor]],
    backend: str | None,
    shard: distributed.ShardInfo | None = None,
) -> Tensor:
    """The float32 ``[m, m]`` Gram matrix of m equally long gradient lists."""
    m = len(lists)
    device = validate.check_lists(list_names(m), lists)
    if device is None:
        return torch.zeros(m, m, dtype=torch.float32)
    kernels = resolve(backend, device)
    if shard is not None:
        # Weights are 0 or 1: this rank's share is the Gram of the indices it counts.
        lists = shard.select(lists)
    if lists[0]:
        local = _gram(kernels, lists).clone()
    else:  # a rank that counts no index adds zeros
        local = torch.zeros(m, m, dtype=torch.float32, device=device)
    return local if shard is None else distributed.all_reduce_gram(local, shard)


def combine_(
    out: list[Tensor],
    lists: list[list[Tensor]],
    weights: Tensor,
    out_is_first: bool,
    backend: str | None,
) -> None:
    """``out = sum_j weights[j] * lists[j]``, where with ``out_is_first`` list 0 is ``out``.

    ``lists`` holds only the lists to read besides ``out``: all m of them, or, with
    ``out_is_first``, lists 1..m-1 (``out`` is then list 0 and is read before written).
    """
    start = 1 if out_is_first else 0
    device = validate.check_lists(
        ["out", *list_names(len(lists), start)], [out, *lists], written=True
    )
    validate.check_weights(weights, len(lists) + start, device)
    if device is None:
        return
    kernels = resolve(backend, device)
    read = [out, *lists] if out_is_first else lists
    w = weights.to(torch.float32).contiguous()
    for _, (o, *subs) in group_by_dtype([out, *read]):
        kernels.combine_(o, subs, w)
