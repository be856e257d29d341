"""Timing, bandwidth and provenance shared by the benchmark scripts.

Timing rules (why each):

* Providers are *interleaved*: repeat k runs every provider once, in a rotated order, so
  that slow drifts of the machine (turbo, a neighbour's load) hit every provider alike.
  On this 2-core VM single timings of a 160 MB stream vary by +-15 % run to run.
* Every timed call starts from the same state: a ``reset`` restores in-place-modified
  gradients outside the timed region, then the caches are flushed by streaming over a
  64 MB buffer (cold caches, as ``triton.testing.do_bench`` does on GPUs). Otherwise a
  4.2M-element workload (W2) partly lives in cache and reads at impossible speeds.
* CPU: ``time.perf_counter`` around the call. CUDA: a pair of ``torch.cuda.Event``s per
  call and a device synchronisation before reading them.
* Reported: median, and the 20th/80th percentiles as the spread.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

ELEMENT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Streams over a buffer larger than the last-level cache between timed calls."""

    def __init__(self, device: torch.device, megabytes: int = 64) -> None:
        if device.type == "cuda":
            # H100 L2 is 50 MB; 256 MB clears it with room to spare.
            megabytes = max(megabytes, 256)
        self.buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buf.add_(1.0)


@dataclass
class Timing:
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    def quantile_s(self, q: float) -> float:
        xs = sorted(self.samples_s)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Candidate:
    """One provider's way to run one case: ``fn`` is timed, ``reset`` (untimed) runs first."""

    name: str
    fn: Callable[[], object]
    reset: Callable[[], None] | None = None


def time_interleaved(
    candidates: Sequence[Candidate],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    slow_s: float | None = None,
    flush: CacheFlusher | None = None,
) -> dict[str, Timing]:
    """Median-ready samples for every candidate, interleaved and rotated.

    ``budget_s`` caps the wall time of the timed rounds: after the first round, the number
    of repeats shrinks so that all providers together fit (never below 3), which keeps a
    run over the 207M-element W3 with slow Python-loop providers within minutes.
    A candidate whose first timed call exceeds ``slow_s`` is not run again (one sample;
    the tables show the sample count), so that a 30 s loop does not eat the budget.
    """
    timings = {c.name: Timing() for c in candidates}
    for _ in range(warmup):
        for c in candidates:
            if c.reset:
                c.reset()
            c.fn()
    synchronize(device)
    use_events = device.type == "cuda"
    k = 0
    active = list(candidates)
    while k < repeats and active:
        order = active[k % len(active) :] + active[: k % len(active)]
        for c in order:
            if c.reset:
                c.reset()
            if flush is not None:
                flush()
            synchronize(device)
            if use_events:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                c.fn()
                end.record()
                end.synchronize()
                timings[c.name].samples_s.append(start.elapsed_time(end) / 1e3)
            else:
                s = time.perf_counter()
                c.fn()
                timings[c.name].samples_s.append(time.perf_counter() - s)
        k += 1
        if k == 1:
            if slow_s is not None:
                active = [c for c in active if timings[c.name].samples_s[0] <= slow_s]
            if budget_s is not None:
                per_round = sum(timings[c.name].samples_s[0] for c in active)
                per_round += 0.01 * len(active)  # reset + flush
                repeats = max(3, min(repeats, 1 + int(budget_s / max(per_round, 1e-9))))
    return timings


# --------------------------------------------------------------------------- bandwidth


@dataclass
class Bandwidth:
    read_gbps: float
    copy_gbps: float
    triad_gbps: float

    @property
    def best_gbps(self) -> float:
        # The denominator for "% of bandwidth": the best streaming figure of the three, so
        # the percentage is conservative.
        return max(self.read_gbps, self.copy_gbps, self.triad_gbps)


def measure_bandwidth(device: torch.device, *, megabytes: int = 512, repeats: int = 7) -> Bandwidth:
    """Streaming bandwidth on *initialised* buffers (randn, not empty).

    Fresh ``torch.empty`` pages are all mapped to the kernel's zero page until written, so
    reading them hits one cached page and reports several hundred GB/s; writing randn
    first makes every page real. Bytes counted: read = 1x, copy = 2x (read + write),
    triad ``c = a + b`` = 3x the buffer size (write-allocate traffic is not counted, as
    in STREAM). These are torch's own kernels, so a well-vectorised fused kernel can
    exceed them (the C++ backend did, by up to 2x, on a loaded 2-vCPU VM).
    """
    n = megabytes * 2**20 // 4
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    c = torch.randn(n, device=device)
    size = n * 4

    def best(fn: Callable[[], object]) -> float:
        fn()
        synchronize(device)
        ts = []
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            synchronize(device)
            ts.append(time.perf_counter() - s)
        # The fastest repeat, as STREAM reports: this is a ceiling, and on a shared VM the
        # median mostly measures the neighbours.
        return min(ts)

    read = size / best(lambda: a.sum()) / 1e9
    copy = 2 * size / best(lambda: c.copy_(a)) / 1e9
    triad = 3 * size / best(lambda: torch.add(a, b, out=c)) / 1e9
    return Bandwidth(read, copy, triad)


# --------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha[:12] if out.returncode == 0 and sha else "uncommitted"


def provenance(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = _cpu_model()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "machine": machine,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device.type,
    }


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's). On a shared, oversubscribed VM use 1: "
        "2-thread OpenMP regions then stall on every op waiting for a descheduled thread",
    )


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"
