"""PCGrad (Yu et al., NeurIPS 2020) from one Gram pass and one combine pass.

Every projected gradient ``g_i^PC`` is a linear combination ``sum_k C[i, k] g_k`` of
the original gradients, and each step of the textbook algorithm only needs inner
products of those combinations with some ``g_j``: ``<g_i^PC, g_j> = (C G)[i, j]``
with ``G`` the Gram matrix. So the whole recurrence runs on the ``m x m`` matrices
(on the device, branch-free via ``torch.where``), and the gradients are read twice
(``gram``) and written once (``combine_`` with weights ``C.sum(0)``) instead of being
flattened, copied and re-read for each of the ``m (m - 1)`` projections.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .functional import combine_, gram

__all__ = ["pcgrad_", "pcgrad_coefficients", "pcgrad_with_gram_", "register_generator"]


def _check_order(order: object, m: int, device: torch.device) -> Tensor:
    if not isinstance(order, Tensor):
        if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
            raise TypeError(
                f"order must be an integer tensor of shape [{m}, {m}], got {type(order).__name__}"
            )
        order = torch.tensor(order)
    if order.dtype == torch.bool or order.is_floating_point() or order.is_complex():
        raise TypeError(f"order must be an integer tensor, got dtype {order.dtype}")
    if order.shape != (m, m):
        raise ValueError(
            f"order must have shape [{m}, {m}] (row i: the order in which g_i visits the "
            f"others), got {tuple(order.shape)}"
        )
    if order.device.type == "cpu" and not torch.compiler.is_compiling():
        # Free on a CPU tensor; a device-resident order is trusted (checking it would
        # cost a host sync on every step), and so is one traced by torch.compile
        # (a Python branch on its values cannot be part of a graph).
        expected = torch.arange(m)
        for i, row in enumerate(order):
            if not torch.equal(row.sort().values.to(torch.int64), expected):
                raise ValueError(
                    f"order[{i}] must be a permutation of 0..{m - 1}, got {row.tolist()}"
                )
    if order.device != device:
        order = order.to(device, non_blocking=True)
    return order.to(torch.int64)


# torch.compile cannot put a torch.Generator into a graph (dynamo graph-breaks on it by
# design), so an explicit generator is drawn from inside an opaque op that receives only
# the generator's id; the op looks the generator up here when it runs. Compiled and eager
# code thus draw the same numbers from the same generator state. Weak references: the
# table never keeps a generator alive.
_GENERATORS: dict[int, Callable[[], torch.Generator | None]] = {}


def register_generator(generator: torch.Generator) -> int:
    """Make ``generator`` reachable from compiled code; returns the key the op receives.

    Called eagerly (by ``PCGrad.__init__`` and every eager ``pcgrad_`` call); a trace
    only reads the key, so a generator first seen inside ``torch.compile`` must have
    been registered before.
    """
    key = id(generator)
    if not torch.compiler.is_compiling():
        try:
            ref = weakref.ref(generator, lambda _, k=key: _GENERATORS.pop(k, None))
        except TypeError:
            # Older torch (2.10) generators take no weak references: hold it (a registered
            # generator then lives as long as the process; its id cannot be reused).
            ref = lambda g=generator: g  # noqa: E731
        _GENERATORS[key] = ref
    return key


@torch.library.custom_op("safegrad::pcgrad_random_order", mutates_args=())
def _generator_order(m: int, generator_key: int, device: torch.device) -> Tensor:
    ref = _GENERATORS.get(generator_key)
    generator = ref() if ref is not None else None
    if generator is None:
        raise RuntimeError(
            "pcgrad_: the generator used under torch.compile was never registered; build "
            "the PCGrad surgeon with it, or call pcgrad_ (or "
            "safegrad_kernels.ops.pcgrad.register_generator) with it once outside compile"
        )
    keys = torch.rand(m, m, generator=generator, device=device)
    return keys.argsort(dim=1)


@_generator_order.register_fake
def _(m, generator_key, device):
    return torch.empty(m, m, dtype=torch.int64, device=device)


def _random_order(m: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Each row an independent uniform permutation (argsort of uniforms: no host sync)."""
    if generator is None:
        order = torch.rand(m, m, device=device).argsort(dim=1)
    else:
        order = _generator_order(m, register_generator(generator), generator.device)
    return order.to(device, non_blocking=True)


def pcgrad_coefficients(gram_matrix: Tensor, order: Tensor) -> Tensor:
    """The ``[m, m]`` matrix ``C`` with ``g_i^PC = sum_k C[i, k] g_k``.

    ``gram_matrix`` is ``G[i, j] = <g_i, g_j>``; ``order`` an ``[m, m]`` int64 tensor on
    the same device (row i visits ``order[i, 0], order[i, 1], ...``; entries equal to
    ``i`` are skipped). All m rows advance together, one visit per iteration, which
    is exact because row i's recurrence never reads another row. Math in float64
    (float32 on devices without it); no host sync.
    """
    m = gram_matrix.shape[0]
    device = gram_matrix.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    g = gram_matrix.to(dtype)
    coef = torch.eye(m, dtype=dtype, device=device)
    rows = torch.arange(m, device=device)
    sq_norms = g.diagonal()
    for step in range(m):
        j = order[:, step]
        dot = (coef * g[j]).sum(1)  # <g_i^PC, g_j>, using G's symmetry: (C G)[i, j] = C[i] . G[j]
        nsq = sq_norms[j]
        # A zero g_j gives dot == 0, so the nsq guard only avoids 0/0; non-finite
        # entries compare False and leave the row as it is.
        hit = (dot < 0) & (j != rows) & (nsq > 0)
        step_coef = torch.where(hit, dot / torch.where(hit, nsq, 1.0), 0.0)
        coef = coef.index_put((rows, j), -step_coef, accumulate=True)
    return coef


def pcgrad_(
    lists: Sequence[Sequence[Tensor]],
    *,
    order: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """PCGrad over m gradient lists; the aggregate ``sum_i g_i^PC`` is written into ``lists[0]``.

    For each objective i, visit the others j in ``order[i]``; whenever
    ``<g_i^PC, g_j> < 0``, set ``g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 * g_j``
    (projections use the original ``g_j``, as in the paper). Cost: one ``gram`` pass
    (reads all m lists) and one ``combine_`` pass (reads them again, writes
    ``lists[0]``); the recurrence itself runs on ``m x m`` device tensors.

    Args:
        lists: m >= 1 equal-length lists of equally shaped gradient tensors, one list
            per objective (the same constraints as ``gram``/``combine_``).
        order: optional ``[m, m]`` integer tensor, row i a permutation of ``0..m-1``
            (entries equal to i are skipped). Values are checked when it is on the CPU
            in eager mode; a device-resident order, or any order inside
            ``torch.compile``, is trusted (checking would sync the host or break the
            graph). Default: each row an independent random permutation, as in the paper.
        generator: random source for the default order (its device is used to draw).
            Compiled and eager calls draw the same orders from the same generator state.
        backend: op backend for ``gram`` and ``combine_``.

    Returns:
        float32 ``[m]`` weights on the gradients' device: ``lists[0] <- sum_j w[j] * lists[j]``.
        With m == 1 nothing is read or written and the weight is 1. A non-finite Gram
        entry makes every comparison with it false (no projection), so the result is
        then the plain sum of whatever the gradients hold.
    """
    return pcgrad_with_gram_(lists, order=order, generator=generator, backend=backend)[0]


def pcgrad_with_gram_(
    lists: Sequence[Sequence[Tensor]],
    *,
    order: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``pcgrad_`` that also returns the float32 ``[m, m]`` Gram matrix it computed.

    The Gram matrix describes the gradients before the update (for statistics); with
    m == 1 it is not computed and ``[[nan]]`` is returned in its place.
    """
    if isinstance(lists, Tensor) or not isinstance(lists, Sequence):
        raise TypeError(f"lists must be a sequence of m gradient lists, got {type(lists).__name__}")
    m = len(lists)
    if m < 1:
        raise ValueError("lists must hold at least one gradient list (m >= 1)")
    first = lists[0]
    if isinstance(first, Tensor) or not isinstance(first, Sequence):
        raise TypeError(f"lists[0] must be a list of tensors, got {type(first).__name__}")
    for i, t in enumerate(first):
        if not isinstance(t, Tensor):
            raise TypeError(f"lists[0][{i}] must be a torch.Tensor, got {type(t).__name__}")
    device = first[0].device if len(first) else torch.device("cpu")
    if order is not None:
        order = _check_order(order, m, device)
    if m == 1:
        ones = torch.ones(1, dtype=torch.float32, device=device)
        return ones, torch.full((1, 1), torch.nan, device=device)
    g = gram(lists, backend=backend)  # validates every list before anything is written
    if order is None:
        order = _random_order(m, g.device, generator)
    weights = pcgrad_coefficients(g, order).sum(0).to(torch.float32)
    combine_(lists[0], lists, weights, backend=backend)
    return weights, g
