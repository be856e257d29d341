"""The public multi-tensor ops.

Each function normalises its arguments, hands DTensor shards to
``safegrad_kernels.distributed`` (local partial sums, one all-reduce of a few
floats, then a local update) and otherwise calls the ``safegrad::`` torch op defined
in ``ops.library``. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import distributed
from . import compose, library, validate

__all__ = ["combine_", "dot_norms", "gram", "project_conflicting_"]


def _pairs(grads: Sequence[Tensor], refs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    grads = validate.tensor_list("grads", grads)
    refs = validate.tensor_list("refs", refs)
    if len(grads) != len(refs):
        raise ValueError(
            f"grads has {len(grads)} tensors but refs has {len(refs)}; they must pair up"
        )
    return grads, refs


def dot_norms(
    grads: Sequence[Tensor],
    refs: Sequence[Tensor],
    *,
    per_tensor: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``[<g, r>, ||r||^2, ||g||^2]`` over all tensors as if flattened and concatenated.

    Args:
        grads, refs: equal-length lists of equally shaped float32/bfloat16/float16
            tensors on one device (dtypes may differ across the list).
        per_tensor: return one row per tensor pair, shape ``[n, 3]``.
        backend: ``None`` (auto, or ``$SAFEGRAD_BACKEND``), ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 ``[3]`` (or ``[n, 3]``) on the tensors' device; sums accumulate in fp32
        per chunk and in fp64 across chunks and tensors, in a fixed order.
    """
    grads, refs = _pairs(grads, refs)
    (grads, refs), info = distributed.localize(grads, refs, names=("grads", "refs"))
    if info is None:
        return library.dot_norms(grads, refs, per_tensor, backend)
    rows = distributed.all_reduce_sums(library.dot_norms(grads, refs, True, backend), info)
    return rows if per_tensor else compose.total(rows)


def project_conflicting_(
    grads: Sequence[Tensor],
    refs: Sequence[Tensor],
    *,
    rho: float = 0.0,
    eps: float = 1e-12,
    per_tensor: bool = False,
    backend: str | None = None,
) -> Tensor:
    """The SafeGrad update, in place on ``grads``.

    With ``d = <g, r>`` and ``s = ||r||^2`` over all tensors (or per tensor):
    ``c = d / s`` if ``d < 0`` and ``s > eps`` else ``0``, then ``g <- g - c * r + rho * r``.
    The coefficient is computed and consumed on the device. When it is zero for a
    tensor (no conflict and ``rho == 0``) the fused backends neither read nor write
    that tensor again. If any sum is not finite the gradients are left untouched.

    Returns:
        float32 ``[4]`` = ``[<g, r>, ||r||^2, ||g||^2 (before), c]``, or ``[n, 4]``
        with ``per_tensor=True``.
    """
    grads, refs = _pairs(grads, refs)
    rho = validate.check_scalar("rho", rho)
    eps = validate.check_scalar("eps", eps, min_value=0.0)
    (grads, refs), info = distributed.localize(grads, refs, names=("grads", "refs"))
    if info is None:
        return library.project_conflicting_(grads, refs, rho, eps, per_tensor, backend)
    # Sharded: validate everything (the axpy op re-checks, but only after the collective)
    # so that a bad call fails on every rank before any rank mutates.
    library._checked_pairs(grads, refs)
    rows = distributed.all_reduce_sums(library.dot_norms(grads, refs, True, backend), info)
    sums = rows if per_tensor else compose.total(rows)
    c, a = compose.coefficients(sums, rho, eps)
    coef = a if per_tensor else a.expand(len(grads))
    library.axpy_(grads, refs, coef.contiguous(), backend)
    return torch.cat([sums, c.unsqueeze(-1)], dim=-1)


def _lists(lists: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    if isinstance(lists, Tensor) or not isinstance(lists, Sequence) or not lists:
        raise TypeError("lists must be a non-empty sequence of tensor lists")
    out = [validate.tensor_list(f"lists[{j}]", lst) for j, lst in enumerate(lists)]
    for j, lst in enumerate(out[1:], start=1):
        if len(lst) != len(out[0]):
            raise ValueError(
                f"lists[0] has {len(out[0])} tensors but lists[{j}] has {len(lst)}; they must pair up"
            )
    return out


def gram(lists: Sequence[Sequence[Tensor]], *, backend: str | None = None) -> Tensor:
    """The float32 ``[m, m]`` Gram matrix ``G[i, j] = <lists[i], lists[j]>`` of m gradient lists.

    Each input is read once; each entry accumulates in fp32 per chunk and fp64 across
    chunks, in a fixed order.
    """
    lists = _lists(lists)
    localized, info = distributed.localize(*lists, names=[f"lists[{j}]" for j in range(len(lists))])
    if info is None:
        return library.gram([t for lst in localized for t in lst], len(lists), backend)
    return distributed.all_reduce_gram(localized, info, lambda ls: gram(ls, backend=backend))


def combine_(
    out: Sequence[Tensor],
    lists: Sequence[Sequence[Tensor]],
    weights: Tensor,
    *,
    backend: str | None = None,
) -> None:
    """``out <- sum_j weights[j] * lists[j]`` in place.

    ``weights`` is a float ``[m]`` tensor on the gradients' device (a device tensor:
    no host sync). ``out`` may be ``lists[0]`` itself (the same tensor objects); no
    other overlap between ``out`` and the inputs is allowed.
    """
    out = validate.tensor_list("out", out)
    lists = _lists(lists)
    if len(out) != len(lists[0]):
        raise ValueError(
            f"out has {len(out)} tensors but lists[0] has {len(lists[0])}; they must pair up"
        )
    # Decided on the caller's objects: localizing DTensors makes new local tensor objects.
    out_is_first = all(o is t for o, t in zip(out, lists[0]))
    (out, *lists), _ = distributed.localize(
        out, *lists, names=["out", *(f"lists[{j}]" for j in range(len(lists)))]
    )
    rest = lists[1:] if out_is_first else lists
    validate.check_weights(weights, len(lists), out[0].device if out else None)
    library.combine_(out, [t for lst in rest for t in lst], weights, out_is_first, backend)
