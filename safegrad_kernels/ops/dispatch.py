"""Backend selection: which registered backend runs an op on a device.

Selection: an explicit ``backend=`` wins and raises if that backend cannot run;
otherwise ``SAFEGRAD_BACKEND`` (same names, or ``auto``) wins; otherwise the first
available backend in ``AUTO_ORDER`` that supports the tensors' device.

Backend modules are imported here, one by one and on first use, so that
``import safegrad_kernels`` never touches triton or a compiler (and asking for the
torch backend never imports the other two). They register themselves in
``ops.backend``, which imports none of them.
"""

from __future__ import annotations

import importlib
import os

import torch

from .backend import BACKEND_NAMES, Backend, BackendUnavailable, registered

__all__ = [
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "ENV_VAR",
    "BackendUnavailable",
    "available_backends",
    "get_backend",
    "resolve",
]

# Auto order per device type. Triton on CPU only runs under the (slow) interpreter,
# so auto never picks it there; ask for backend="triton" explicitly to test it.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "SAFEGRAD_BACKEND"


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its module on first use."""
    backend = registered(name)
    if backend is not None:
        return backend
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or None")
    importlib.import_module(f"{__package__}.{name}_backend")  # registers itself
    backend = registered(name)
    if backend is None:  # pragma: no cover - a backend module that forgot to register
        raise RuntimeError(f"{__package__}.{name}_backend did not register a backend")
    return backend


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}``; with ``device``, also whether it supports that device."""
    out = {}
    for name in BACKEND_NAMES:
        backend = get_backend(name)
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
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        backend = get_backend(name)
        if backend.available()[0] and backend.supports(device):
            return backend
    return get_backend("torch")
