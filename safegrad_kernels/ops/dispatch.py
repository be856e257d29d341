"""Backend registry and selection.

A backend supplies four kernels over *one dtype group on one device* (every grad
shares a dtype, every ref shares a dtype; inputs already validated). The op layer
(`ops.compose`) splits mixed lists into such groups, combines the groups' results in
a fixed order and computes the surgery coefficients on the device.

Selection: an explicit ``backend=`` wins and raises if that backend cannot run;
otherwise ``SAFEGRAD_BACKEND`` (same names, or ``auto``) wins; otherwise the first
available backend in ``AUTO_ORDER`` that supports the tensors' device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

BACKEND_NAMES = ("triton", "cpp", "torch")
# Auto order per device type. Triton on CPU only runs under the (slow) interpreter,
# so auto never picks it there; ask for backend="triton" explicitly to test it.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "SAFEGRAD_BACKEND"


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
    _REGISTRY[backend.name] = backend
    return backend


def _load_all() -> None:
    # Imported lazily so that `import safegrad_kernels` never touches triton or a compiler.
    if len(_REGISTRY) == len(BACKEND_NAMES):
        return
    from . import cpp_backend, torch_backend, triton_backend  # noqa: F401  (they register)


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or None")
    return _REGISTRY[name]


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}``; with ``device``, also whether it supports that device."""
    _load_all()
    out = {}
    for name in BACKEND_NAMES:
        backend = _REGISTRY[name]
        ok, why = backend.available()
        if ok and device is not None and not backend.supports(torch.device(device)):
            ok, why = False, f"does not support device {torch.device(device)}"
        out[name] = (ok, why)
    return out


def resolve(requested: str | None, device: torch.device) -> Backend:
    """The backend that runs an op on ``device`` (see the module docstring)."""
    explicit = requested is not None
    if requested is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            requested = env
    if requested is not None:
        backend = get_backend(requested)
        ok, why = backend.available()
        if not ok:
            source = "backend=" if explicit else f"{ENV_VAR}="
            raise BackendUnavailable(f"{source}{requested!r} is not available: {why}")
        if not backend.supports(device):
            raise BackendUnavailable(f"backend {requested!r} does not support device {device}")
        return backend
    _load_all()
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        backend = _REGISTRY[name]
        if backend.available()[0] and backend.supports(device):
            return backend
    return _REGISTRY["torch"]
