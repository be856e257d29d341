"""What a backend is, and the registry in which each backend enters itself.

This module imports no backend. A backend module (``torch_backend``, ``cpp_backend``,
``triton_backend``) imports only this one, subclasses :class:`Backend` and calls
:func:`register_backend` at import time; ``ops.dispatch`` imports the backend modules on
first use and chooses among the registered ones. The dependency graph is therefore
``dispatch -> {backends} -> backend``, with no cycle.

A backend supplies four kernels over *one dtype group on one device*. Splitting mixed
lists into such groups, merging their results in a fixed order and turning sums into
coefficients is the op pipeline's job (``ops.pipeline``), written once for every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailable", "register_backend", "registered"]

# Every backend there is, and the module ``ops.<name>_backend`` that registers it.
BACKEND_NAMES = ("triton", "cpp", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class Backend:
    """What a backend implements. Every method works on one dtype group.

    Shared preconditions (checked by ``ops.validate`` before any kernel runs):
    ``grads`` and ``refs`` (and each ``lists[j]``) are equal-length, non-empty lists of
    contiguous strided tensors on one device; ``grads[i].shape == refs[i].shape``; all
    grads share one dtype, all refs share one dtype (the two may differ); dtypes are
    float32, bfloat16 or float16; ``numel`` may be 0; written tensors do not overlap
    anything else that is read, except where stated.

    Results must be deterministic: fixed chunking and fixed-order sums, bitwise equal
    across calls and independent of the number of threads or programs.
    """

    name: str = "?"

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, why not), cheap after the first call."""
        raise NotImplementedError

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def dot_norms(self, grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
        """float32 ``[n, 3]``: per tensor ``[<g, r>, ||r||^2, ||g||^2]``, fp32 accumulation."""
        raise NotImplementedError

    def axpy_(self, grads: Sequence[Tensor], refs: Sequence[Tensor], coef: Tensor) -> None:
        """``grads[i] += coef[i] * refs[i]`` in place; ``coef`` is float32 ``[n]`` on the device.

        Math in fp32, one rounding to the grad dtype. A tensor whose ``coef[i] == 0``
        must be left bitwise untouched, and kernel backends should not even read it
        (the no-conflict step then moves 2N elements, not 5N). No host sync.
        """
        raise NotImplementedError

    def gram(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        """float32 ``[m, m]`` Gram matrix of m gradient lists (each list one dtype)."""
        raise NotImplementedError

    def combine_(
        self, out: Sequence[Tensor], lists: Sequence[Sequence[Tensor]], weights: Tensor
    ) -> None:
        """``out[i] = sum_j weights[j] * lists[j][i]``; ``weights`` float32 ``[m]`` on the device.

        ``out`` may be ``lists[0]`` (the same tensor objects); no other aliasing.
        Math in fp32, one rounding to the out dtype.
        """
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Enter ``backend`` under its name (called once by each backend module on import)."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name {backend.name!r} is not one of {BACKEND_NAMES}")
    _REGISTRY[backend.name] = backend
    return backend


def registered(name: str) -> Backend | None:
    """The backend registered under ``name``, or None if its module has not been imported."""
    return _REGISTRY.get(name)
