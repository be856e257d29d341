"""The public multi-tensor ops.

Each function does two things before the pipeline (``ops.pipeline``) takes over:

1. **types**: the arguments become what the op schema declares (tensor lists, Python
   floats, a weights tensor), with a ``TypeError`` naming the argument otherwise;
2. **localize** (``safegrad_kernels.distributed``): DTensors become their local
   tensors (no copy) plus a ``ShardInfo``.

Plain tensors then go through the ``safegrad::`` custom op of ``ops.library`` (one
node in a compiled graph); sharded ones call the same pipeline function directly with
the ``ShardInfo``, which adds one all-reduce of a few floats between the sums and the
update. Nothing here reads a tensor value on the host.

An eager call on plain tensors (see :func:`_eager`) also calls the pipeline directly:
the custom-op boundary costs ~0.8 us per mutated tensor in Python (its per-tensor
version bump) plus a redispatch, 0.35 ms of a 448-tensor call and 2 ms of a
1,120-tensor one (cProfile, 4-element tensors, 2 shared cores). The op then behaves as
through the boundary: the same checks (the pipeline's), the same kernels, and the
mutated tensors' version counters bumped once, in one C++ call.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .. import distributed
from . import library, pipeline, validate
from .pipeline import PAIR_NAMES, list_names

__all__ = ["combine_", "dot_norms", "gram", "project_conflicting_"]

_PLAIN = frozenset({Tensor, torch.nn.Parameter})
_REQUIRES_GRAD = attrgetter("requires_grad")


def _eager(*lists: list[Tensor]) -> bool:
    """Whether a call may skip the custom-op boundary and run the pipeline directly.

    Only where the boundary would do nothing but run the pipeline: no tracing
    (``torch.compile``), no dispatch or torch-function mode (fake tensors, ``make_fx``,
    functionalization), no functorch transform, only plain tensors (no subclass, no
    meta tensor, which the boundary hands to the fake), and no autograd edge to record
    (the boundary would attach a backward to the output when an input requires grad).
    """
    if (
        torch.compiler.is_compiling()
        or is_in_torch_dispatch_mode()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    types: set[type] = set()
    for lst in lists:
        types.update(map(type, lst))
    if not _PLAIN.issuperset(types):
        return False
    first = next((lst[0] for lst in lists if lst), None)
    if first is not None and first.device.type == "meta":
        return False
    return not (torch.is_grad_enabled() and any(any(map(_REQUIRES_GRAD, lst)) for lst in lists))


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
    grads, refs = validate.tensor_list("grads", grads), validate.tensor_list("refs", refs)
    (grads, refs), shard = distributed.localize(grads, refs, names=PAIR_NAMES)
    if shard is None and not _eager(grads, refs):
        return library.dot_norms(grads, refs, per_tensor, backend)
    return pipeline.dot_norms(grads, refs, per_tensor, backend, shard)


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
    grads, refs = validate.tensor_list("grads", grads), validate.tensor_list("refs", refs)
    rho, eps = validate.python_float("rho", rho), validate.python_float("eps", eps)
    (grads, refs), shard = distributed.localize(grads, refs, names=PAIR_NAMES)
    if shard is None and not _eager(grads, refs):
        return library.project_conflicting_(grads, refs, rho, eps, per_tensor, backend)
    # Every rank validates its local tensors before the collective, so a bad call
    # raises on every rank before any rank mutates.
    out = pipeline.project_conflicting_(grads, refs, rho, eps, per_tensor, backend, shard)
    if shard is None:  # what the boundary does for a mutated list (sharded: as before)
        torch._C._increment_version(grads)
    return out


def gram(lists: Sequence[Sequence[Tensor]], *, backend: str | None = None) -> Tensor:
    """The float32 ``[m, m]`` Gram matrix ``G[i, j] = <lists[i], lists[j]>`` of m gradient lists.

    Each input is read once; each entry accumulates in fp32 per chunk and fp64 across
    chunks, in a fixed order.
    """
    lists = validate.tensor_lists("lists", lists)
    lists, shard = distributed.localize(*lists, names=list_names(len(lists)))
    if shard is None:
        return library.gram([t for lst in lists for t in lst], len(lists), backend)
    return pipeline.gram(lists, backend, shard)


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
    other overlap between ``out`` and the inputs is allowed. Sharded tensors need no
    collective: every element is updated where it lives.
    """
    out = validate.tensor_list("out", out)
    lists = validate.tensor_lists("lists", lists)
    if len(out) != len(lists[0]):
        raise ValueError(
            f"out has {len(out)} tensors but lists[0] has {len(lists[0])}; they must pair up"
        )
    m = len(lists)
    validate.tensor(
        "weights",
        weights,
        f"a tensor of shape [{m}] on the gradients' device (a device tensor avoids a host sync)",
    )
    # Decided on the caller's objects: localizing DTensors makes new local tensor objects.
    out_is_first = all(o is t for o, t in zip(out, lists[0]))
    (out, *lists), _ = distributed.localize(out, *lists, names=["out", *list_names(m)])
    rest = lists[1:] if out_is_first else lists
    library.combine_(out, [t for lst in rest for t in lst], weights, out_is_first, backend)
