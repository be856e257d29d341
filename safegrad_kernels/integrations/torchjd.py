"""torchjd's ``jac_to_grad`` on the fused ``gram`` and ``combine_`` passes.

torchjd (https://torchjd.org) runs one backward pass for m losses and leaves each
parameter's Jacobian in ``p.jac``, shape ``[m, *p.shape]``; ``jac_to_grad`` then turns
the Jacobians into ``.grad``. Its default path concatenates every ``p.jac`` into one
``[m, N]`` matrix (a copy of all m Jacobians); its ``optimize_gramian_computation``
path sums one small Gram matrix per parameter (one matmul and one tensordot per
tensor). The drop-in here reads the row views ``p.jac[j]`` in place::

    from torchjd.autojac import backward
    from safegrad_kernels.integrations.torchjd import PCGradWeighting, jac_to_grad

    backward([loss_0, loss_1, loss_2])                 # torchjd fills p.jac
    weights = jac_to_grad(model.parameters(), PCGradWeighting())   # p.grad

One ``gram`` pass reads all m Jacobians to build ``G[i, j] = <J_i, J_j>`` (float32,
fixed-order sums), a weighting turns ``G`` into ``m`` weights, and one ``combine_``
pass writes ``p.grad (+)= sum_j w_j p.jac[j]``. The aggregator is any torchjd
``GramianWeightedAggregator`` (``UPGrad()``, ``PCGrad()``, ``MGDA()``, ...: its
``gramian_weighting`` is used), any ``Weighting`` declared on Gramians
(``Weighting[PSDMatrix]``, e.g. ``UPGradWeighting()``), or one of the device-side
weightings below; ``PCGradWeighting`` and ``SafeGradWeighting`` are torchjd
``Weighting`` modules, so they also work with torchjd's own ``autogram.Engine`` and
inside ``GramianWeightedAggregator``.

torchjd >= 0.11 (``GramianWeightedAggregator`` and ``PSDMatrix`` became public
there); importing ``safegrad_kernels`` never imports torchjd, only this module does.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

try:
    from torchjd.aggregation import GramianWeightedAggregator, Weighting
    from torchjd.linalg import PSDMatrix
except ImportError as err:  # pragma: no cover - exercised only without torchjd
    raise ImportError(
        "safegrad_kernels.integrations.torchjd needs torchjd>=0.11 "
        "(pip install 'safegrad_kernels[torchjd]')"
    ) from err

from ..ops import combine_, gram
from ..ops.pcgrad import _check_order, _random_order, pcgrad_coefficients, register_generator
from ..ops.pipeline import coefficients
from ..ops.validate import SUPPORTED_DTYPES, check_scalar
from ..surgery.base import check_backend

__all__ = ["PCGradWeighting", "SafeGradWeighting", "jac_to_grad"]


class PCGradWeighting(Weighting[PSDMatrix]):
    """PCGrad's weights from the Gram matrix, computed on its device (no host round trip).

    The same recurrence as ``safegrad_kernels.pcgrad_`` (float64 ``m x m`` math,
    branch-free), whereas torchjd's ``PCGradWeighting`` copies the Gramian to the CPU
    and loops in Python with a comparison per pair (a host sync per step on a GPU).

    Args:
        generator: random source of each call's visiting orders (each row an
            independent uniform permutation: argsort of ``generator``'s uniforms).
            Default: torch's global generator on the Gramian's device.
        order: a fixed ``[m, m]`` visiting order used at every call instead (row i: the
            order in which g_i visits the others; entries equal to i are skipped), e.g.
            ``torch.arange(m).expand(m, m)``. Checked once here; not with ``generator``.
    """

    def __init__(
        self,
        *,
        generator: torch.Generator | None = None,
        order: Tensor | Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and order is not None:
            raise ValueError("give either generator (a random order per call) or order, not both")
        self.generator = generator
        if generator is not None:
            register_generator(generator)  # reachable from torch.compile'd code too
        self._order: dict[torch.device, Tensor] = {}
        if order is not None:
            if not isinstance(order, Tensor):
                order = torch.tensor(order)
            if order.dim() != 2:
                raise ValueError(f"order must be an [m, m] tensor, got shape {tuple(order.shape)}")
            cpu = torch.device("cpu")
            self._order[cpu] = _check_order(order.to(cpu), order.shape[0], cpu)

    @property
    def order(self) -> Tensor | None:
        """The fixed ``[m, m]`` order (int64, CPU), or None for a random one per call."""
        return self._order.get(torch.device("cpu"))

    def forward(self, gramian: Tensor, /) -> Tensor:
        m = gramian.shape[0]
        if not self._order:
            order = _random_order(m, gramian.device, self.generator)
        else:
            fixed = self._order[torch.device("cpu")]
            if fixed.shape[0] != m:
                raise ValueError(
                    f"PCGradWeighting has a fixed order for m={fixed.shape[0]} objectives, "
                    f"got a {m} x {m} Gramian"
                )
            if gramian.device not in self._order:  # one upload per device, then cached
                self._order[gramian.device] = fixed.to(gramian.device, non_blocking=True)
            order = self._order[gramian.device]
        return pcgrad_coefficients(gramian, order).sum(0).to(gramian.dtype)

    def __repr__(self) -> str:
        how = "fixed order" if self._order else "random order"
        return f"{type(self).__name__}({how})"


class SafeGradWeighting(Weighting[PSDMatrix]):
    """SafeGrad's weights ``[1, rho - c]`` for m = 2 objectives: row 0 the task, row 1 alignment.

    ``c = G01 / G11`` where ``G01 < 0`` and ``G11 > eps`` (else 0), the rule of
    ``SafeGrad(granularity="global")``, so that ``w0 J_0 + w1 J_1`` is its update
    ``g_u - c g_a + rho g_a``. A non-finite Gram entry gives ``[1, 0]``; note that
    ``combine_`` then still reads ``J_1`` (``0 * inf`` is NaN), where the surgeon leaves
    the task gradient untouched. Per-tensor SafeGrad has one coefficient per tensor
    and no Gram form: use the ``SafeGrad`` surgeon for it.
    """

    def __init__(self, *, rho: float = 1.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.rho = check_scalar("rho", rho)
        self.eps = check_scalar("eps", eps)

    def forward(self, gramian: Tensor, /) -> Tensor:
        if gramian.shape != (2, 2):
            raise ValueError(
                "SafeGradWeighting needs exactly 2 objectives (task, alignment), got a "
                f"Gramian of shape {tuple(gramian.shape)}"
            )
        g = gramian.to(torch.float32)
        _, a = coefficients(torch.stack([g[0, 1], g[1, 1], g[0, 0]]), self.rho, self.eps)
        return torch.stack([torch.ones_like(a), a]).to(gramian.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.rho}, eps={self.eps})"


def _declares_gramian_input(weighting: Weighting) -> bool:
    """Whether the weighting's class is declared as ``Weighting[PSDMatrix]`` (torchjd's marker)."""
    for cls in type(weighting).__mro__:
        for base in cls.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is Weighting and typing.get_args(base) == (PSDMatrix,):
                return True
    return False


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _gramian_weighting(aggregator: object) -> Weighting:
    if isinstance(aggregator, GramianWeightedAggregator):
        # The same rule as torchjd's own Gramian path: hooks on the aggregator or on its
        # Jacobian-level weighting would see the concatenated Jacobian, which never exists here.
        if _has_forward_hooks(aggregator) or _has_forward_hooks(aggregator.weighting):
            raise ValueError(
                f"aggregator {aggregator} has forward hooks on itself or on its Jacobian "
                "weighting; they need the concatenated Jacobian (use torchjd.autojac."
                "jac_to_grad), or register them on aggregator.gramian_weighting"
            )
        return aggregator.gramian_weighting
    if isinstance(aggregator, Weighting):
        if not _declares_gramian_input(aggregator):
            raise TypeError(
                f"weighting {aggregator!r} is not declared as a Weighting[PSDMatrix] (it may "
                "read the Jacobian itself); this jac_to_grad only has the Gram matrix"
            )
        return aggregator
    raise TypeError(
        "aggregator must be a torchjd GramianWeightedAggregator (e.g. UPGrad(), PCGrad()) or "
        f"a Gramian Weighting (e.g. PCGradWeighting()), got {type(aggregator).__name__}; "
        "other aggregators need the concatenated Jacobian (use torchjd.autojac.jac_to_grad)"
    )


def _checked_tensors(tensors: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor], int]:
    """The tensors, their ``.jac`` and m, or an error naming the index; reads metadata only."""
    if isinstance(tensors, Tensor):
        raise TypeError("tensors must be an iterable of tensors (e.g. model.parameters())")
    items = list(tensors)
    if not items:
        raise ValueError("tensors is empty")
    jacs: list[Tensor] = []
    seen: set[int] = set()
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if id(t) in seen:
            raise ValueError(f"tensors[{i}] is listed twice; each tensor's Jacobian counts once")
        seen.add(id(t))
        jac = getattr(t, "jac", None)
        if not isinstance(jac, Tensor):
            raise ValueError(
                f"tensors[{i}] has no .jac; run torchjd.autojac.backward or mtl_backward first"
            )
        if not (t.requires_grad and (t.is_leaf or t.retains_grad)):
            raise ValueError(
                f"tensors[{i}] does not expect a .grad (needs requires_grad and to be a leaf "
                "or to retain its grad)"
            )
        if jac.dim() < 1 or jac.shape[1:] != t.shape:
            raise ValueError(
                f"tensors[{i}].jac has shape {tuple(jac.shape)}; expected [m, *{tuple(t.shape)}]"
            )
        if jacs and jac.shape[0] != jacs[0].shape[0]:
            raise ValueError(
                f"tensors[{i}].jac has {jac.shape[0]} rows but tensors[0].jac has "
                f"{jacs[0].shape[0]}; every Jacobian needs the same number of objectives"
            )
        for name, x in ((f"tensors[{i}].jac", jac), (f"tensors[{i}].grad", t.grad)):
            if x is not None and x.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{name} has dtype {x.dtype}; the fused ops support float32, bfloat16 "
                    "and float16 (torchjd.autojac.jac_to_grad handles other dtypes)"
                )
        if t.grad is not None and not t.grad.is_contiguous():
            raise ValueError(f"tensors[{i}].grad is not contiguous; it is accumulated in place")
        jacs.append(jac)
    return items, jacs, jacs[0].shape[0]


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: GramianWeightedAggregator | Weighting,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Aggregate every ``t.jac`` into ``t.grad`` (added to an existing ``.grad``, as torchjd does).

    Args:
        tensors: the tensors whose ``.jac`` torchjd filled (float32/bfloat16/float16,
            one device), e.g. ``model.parameters()``.
        aggregator: a torchjd ``GramianWeightedAggregator``, or a Gramian ``Weighting``
            (ours or torchjd's); the weighting receives the float32 ``[m, m]`` Gram matrix.
        retain_jac: keep the ``.jac`` fields (default: deleted after success).
        optimize_gramian_computation: accepted for signature compatibility with torchjd;
            this function always works from the Gram matrix (it never concatenates).
        backend: op backend for ``gram``/``combine_`` (``None`` = auto).

    Returns:
        The ``[m]`` weights, on the Jacobians' device: ``t.grad (+)= sum_j w[j] t.jac[j]``.

    Everything is checked before anything is written: on an error (including one raised
    by the weighting) no ``.grad`` changes and every ``.jac`` is kept, whereas torchjd
    deletes the ``.jac`` fields before aggregating. The result is not differentiable.
    With our weightings nothing reads a tensor value on the host.
    """
    del optimize_gramian_computation  # see the docstring: always the Gram path
    backend = check_backend(backend)
    weighting = _gramian_weighting(aggregator)
    items, jacs, m = _checked_tensors(tensors)
    # Row views (no copy, no concatenation); torchjd's Jacobians are contiguous already.
    views = [j.detach().contiguous().unbind(0) for j in jacs]
    lists = [list(row) for row in zip(*views)]
    gm = gram(lists, backend=backend)  # also checks devices before anything is written
    weights = weighting(gm)
    if not isinstance(weights, Tensor) or weights.shape != (m,):
        raise ValueError(
            f"weighting {weighting!r} returned {getattr(weights, 'shape', type(weights))}; "
            f"expected a tensor of shape [{m}]"
        )

    fresh = [i for i, t in enumerate(items) if t.grad is None]
    held = [i for i, t in enumerate(items) if t.grad is not None]
    new_grads = [torch.empty_like(items[i], memory_format=torch.contiguous_format) for i in fresh]
    if fresh:
        combine_(new_grads, [[lst[i] for i in fresh] for lst in lists], weights, backend=backend)
    if held:
        grads = [items[i].grad for i in held]
        one = torch.ones(1, dtype=weights.dtype, device=weights.device)
        combine_(
            grads,
            [grads, *([lst[i] for i in held] for lst in lists)],
            torch.cat([one, weights]),
            backend=backend,
        )
    for i, g in zip(fresh, new_grads):
        items[i].grad = g
    if not retain_jac:
        for t in items:
            del t.jac
    return weights
