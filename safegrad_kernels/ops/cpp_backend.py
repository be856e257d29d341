"""C++ CPU backend: loads the ``csrc/`` extension and exposes it as a :class:`Backend`.

The extension only registers CPU implementations of the ``safegrad::cpp_*`` kernel ops;
their schemas and fakes are ``ops.library``'s, imported with the package. The order does
not matter: a process that loaded the compiled extension by hand before importing the
package works too, since the dispatcher takes an implementation before its schema.

The extension is compiled just in time with ``torch.utils.cpp_extension.load`` (ninja)
on first use and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``), so
only the first call in a fresh environment pays the compile (~40 s on 2 cores).
Importing this module never compiles and never fails: :meth:`CppBackend.available`
does the work lazily and reports ``(False, why)`` when there is no compiler, no ninja,
no sources or the build breaks, and the op layer falls back to the torch backend.

The kernels are compiled with ``-march=native``; the build directory name carries a hash
of the flags, the CPU model, torch's version and the sources, so a cached build is never
loaded on a different CPU (or against a different torch).

Set ``SAFEGRAD_DISABLE_CPP=1`` to make the backend report itself unavailable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .backend import Backend, register_backend

log = logging.getLogger(__name__)

DISABLE_ENV = "SAFEGRAD_DISABLE_CPP"
# The kernel ops this backend calls; their schemas and fakes are in ops.library.
KERNEL_OPS = ("cpp_dot_norms", "cpp_axpy_", "cpp_gram", "cpp_combine_")
# -O3 for the lane loops' vectorisation, OpenMP because ATen's parallel_for is OpenMP
# here. No -ffast-math: the kernels spell out their summation order (see csrc/kernels.h).
_BASE_FLAGS = ("-O3", "-fopenmp")
_NATIVE_FLAGS = ("-march=native",)


def sources_dir() -> Path | None:
    """``csrc/`` of a source checkout (editable install), else the copy bundled in a wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "_csrc"):
        if (candidate / "safegrad_cpu.cpp").is_file():
            return candidate
    return None


def _cpu_identity() -> str:
    """Model name and feature flags of the first CPU: what -march=native compiles for."""
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    found = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # end of the first processor's block
                if line.startswith(keys):
                    found.append(line.strip())
    except OSError:
        pass
    return "\n".join(found) or f"{platform.processor()} {platform.machine()}"


def _build_name(src: Path, flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (*flags, _cpu_identity(), platform.machine(), torch.__version__):
        digest.update(part.encode() + b"\0")
    for path in sorted(src.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"safegrad_cpu_{digest.hexdigest()[:12]}"


def kernels_registered() -> bool:
    """Whether every ``safegrad::cpp_*`` op has a CPU kernel in this process (library loaded).

    Not ``hasattr(torch.ops.safegrad, ...)``: ``ops.library`` defines the ops' schemas
    whether or not the extension is loaded.
    """
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"safegrad::{op}", "CPU")
            for op in KERNEL_OPS
        )
    except RuntimeError:  # "operator ... does not exist": neither schema nor kernel yet
        return False


def _first_error_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line[:300]
    return (lines[0] if lines else "unknown error")[:300]


class CppBackend(Backend):
    """The ``torch.ops.safegrad.cpp_*`` kernels of ``csrc/safegrad_cpu.cpp``."""

    name = "cpp"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: tuple[bool, str] | None = None
        self._info: dict[str, object] = {}

    # ------------------------------------------------------------------ loading
    def available(self) -> tuple[bool, str]:
        if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
            return False, f"disabled by {DISABLE_ENV}=1"
        if self._status is None:
            with self._lock:
                if self._status is None:
                    self._status = self._load()
        return self._status

    def build_info(self) -> dict[str, object]:
        """Where the extension comes from and how it was built (for ``safegrad info``)."""
        src = sources_dir()
        info: dict[str, object] = {
            "sources": str(src) if src else None,
            "loaded": bool(self._status and self._status[0]),
        }
        info.update(self._info)
        if self._status is not None and not self._status[0]:
            info["error"] = self._status[1]
        return info

    def _load(self) -> tuple[bool, str]:
        try:
            ok, why = self._build()
        except Exception as exc:  # availability must be an answer, never an exception
            ok, why = False, f"{type(exc).__name__}: {exc}"[:300]
        if ok:
            log.info("safegrad cpp backend loaded (%s)", self._info.get("build_dir"))
        else:
            log.warning("safegrad cpp backend unavailable: %s", why)
        return ok, why

    def _build(self) -> tuple[bool, str]:
        if kernels_registered():
            # Already in the process (loaded by hand, or by another copy of this module).
            return True, ""
        src = sources_dir()
        if src is None:
            return False, "C++ sources not found (neither csrc/ nor safegrad_kernels/_csrc/)"
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return False, f"no C++ compiler ({compiler!r} not on PATH)"
        try:
            from torch.utils import cpp_extension
        except Exception as exc:  # a broken torch install: report, do not raise
            return False, f"torch.utils.cpp_extension unavailable: {exc}"
        if not cpp_extension.is_ninja_available():
            return False, "ninja not found (pip install ninja)"

        sources = [str(p) for p in sorted(src.glob("*.cpp"))]
        attempts = [(*_BASE_FLAGS, *_NATIVE_FLAGS), _BASE_FLAGS]
        why = ""
        for flags in attempts:
            name = _build_name(src, flags)
            build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
            cached = (build_dir / f"{name}.so").is_file()
            start = time.perf_counter()
            try:
                cpp_extension.load(
                    name=name,
                    sources=sources,
                    extra_cflags=list(flags),
                    extra_include_paths=[str(src)],
                    is_python_module=False,
                    verbose=False,
                )
            except Exception as exc:
                why = f"build failed: {_first_error_line(str(exc))}"
                # Only a compiler that rejects -march=native is worth a second (portable) try.
                if "march" not in str(exc):
                    break
                continue
            seconds = round(time.perf_counter() - start, 2)
            self._info = {
                "name": name,
                "build_dir": str(build_dir),
                "flags": list(flags),
                "cached": cached,
                "compile_seconds": 0.0 if cached else seconds,
                "load_seconds": seconds,
            }
            if not kernels_registered():
                return False, f"{name}.so loaded but registered no safegrad::cpp_* kernels"
            return True, ""
        return False, why

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    # ------------------------------------------------------------------ kernels
    def dot_norms(self, grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
        return torch.ops.safegrad.cpp_dot_norms(list(grads), list(refs))

    def axpy_(self, grads: Sequence[Tensor], refs: Sequence[Tensor], coef: Tensor) -> None:
        torch.ops.safegrad.cpp_axpy_(list(grads), list(refs), coef)

    def gram(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        flat = [t for tensors in lists for t in tensors]
        return torch.ops.safegrad.cpp_gram(flat, len(lists))

    def combine_(
        self, out: Sequence[Tensor], lists: Sequence[Sequence[Tensor]], weights: Tensor
    ) -> None:
        out = list(out)
        # The kernel reads each list's block before writing it back, so passing out again as
        # lists[0] would also be correct; recognising it just avoids reading it twice.
        out_is_first = all(o is t for o, t in zip(out, lists[0]))
        rest = lists[1:] if out_is_first else lists
        flat = [t for tensors in rest for t in tensors]
        torch.ops.safegrad.cpp_combine_(out, flat, weights, out_is_first)


BACKEND = register_backend(CppBackend())
