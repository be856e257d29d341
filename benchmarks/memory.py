"""Peak host memory of one configuration, each in a fresh process of its own.

Host memory of torch's CPU allocator is invisible to ``tracemalloc`` (it bypasses Python's:
a 4 MB tensor shows as 80 bytes) and torch keeps no CPU allocator statistics, so the memory
benchmarks read the kernel's counters (``/proc/self/status``, Linux) and run every
configuration in a fresh process (``run_worker``), whose peak is that configuration's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from benchmarks.harness import REPO_ROOT

T = TypeVar("T")

# glibc keeps freed heap memory resident and reuses it in an order that depends on the
# allocation history, so peak RSS measured the allocator's fragmentation as much as the
# live tensors (bench_step: runs of one method differed by 10-20 MiB on the demo config).
# Serving every allocation above 64 KiB by mmap, returned on free, makes RSS follow the
# live bytes. Other C libraries ignore these variables.
MALLOC_RSS_FOLLOWS_LIVE_BYTES = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def proc_status_mib(field: str) -> float:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``: resident now, peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_rss(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the peak RSS it reached above the RSS at the call, in MiB: the memory it
    needs on top of what exists (the peak is reset first with Linux's ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = proc_status_mib("VmRSS")
    result = fn()
    return result, proc_status_mib("VmHWM") - base


def run_worker(module: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict:
    """``python -m module *argv`` in a fresh process at the repository root (``env``: set
    there unless already set); the JSON object it printed last on its own line."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")])
    )
    for key, value in (env or {}).items():
        child_env.setdefault(key, value)
    cmd = [sys.executable, "-m", module, *argv]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd[2:])}: no result line in:\n{out.stdout[-2000:]}")


def run_workers(module: str, argv: Sequence[str] | None, names: Iterable[str]) -> list[dict]:
    """One fresh worker per name, ``python -m module *argv --worker NAME`` (``argv``: this
    run's command line, None for ``sys.argv[1:]``), in turn; their results."""
    passthrough = list(argv if argv is not None else sys.argv[1:])
    return [run_worker(module, [*passthrough, "--worker", name]) for name in names]
