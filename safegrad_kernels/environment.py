"""What this machine offers safegrad_kernels: versions, devices, backends and why one is missing.

Needs only torch. ``collect_info`` is what ``safegrad info`` reports.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from . import compat

__all__ = ["collect_info", "cpu_model", "machine_line"]

_VERSIONED = ("torch", "triton", "transformers", "peft", "accelerate", "numpy")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows.

    Results recorded on CPUs of two vendors can differ beyond rounding (their math
    libraries sum in other orders, and training amplifies it), so reports name it.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """``"Intel(R) Xeon(R) Processor, x86_64 Linux, 2 CPUs"``: what the demo and study record."""
    return f"{cpu_model()}, {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _aot_report() -> Any:
    """Rows of ``ops.triton_aot.aot_report()`` (registers, spills, access widths), or an error."""
    try:
        from .ops import triton_aot

        return triton_aot.aot_report()
    except Exception as exc:  # no triton, no compiler target...: report, never crash `info`
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"}


def _auto_backends(cuda: bool) -> dict[str, str | None]:
    """The backend automatic selection picks per device (None: no such device)."""
    import torch

    from .ops import dispatch

    picked: dict[str, str | None] = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not cuda:
            picked[device] = None
            continue
        try:
            picked[device] = dispatch.resolve(None, torch.device(device)).name
        except Exception as exc:  # e.g. SAFEGRAD_BACKEND names an unavailable backend
            picked[device] = f"error: {exc}"
    return picked


def collect_info(*, aot: bool = False) -> dict[str, Any]:
    """Everything ``safegrad info`` prints, as a JSON-serialisable dict."""
    import torch

    from . import __version__, available_backends
    from .ops import dispatch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "safegrad_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _VERSIONED},
        "cpu": {
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
        },
        "env": {dispatch.ENV_VAR: os.environ.get(dispatch.ENV_VAR)},
        "backends": {
            name: {"available": ok, "reason": reason}
            for name, (ok, reason) in available_backends().items()
        },
        "auto_backend": _auto_backends(cuda),
    }
    build_info = getattr(dispatch.get_backend("cpp"), "build_info", None)
    info["cpp_build"] = build_info() if callable(build_info) else None
    # Installed frameworks against the ranges pyproject.toml declares (compat.version_rows).
    info["supported_ranges"] = [row._asdict() for row in compat.version_rows()]
    if aot:
        info["triton_aot"] = _aot_report()
    return info
