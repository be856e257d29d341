"""Timing, bandwidth, provenance, CSV history and table writing shared by the benchmarks.

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
import contextlib
import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safegrad_kernels.environment import cpu_model

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


# The columns every benchmark's CSV starts with: which machine, software and load.
RUN_FIELDS = (
    "date",
    "commit",
    "machine",
    "cores",
    "threads",
    "torch",
    "triton",
    "device",
    "loadavg",
)


def provenance(device: torch.device) -> dict[str, str]:
    """The ``RUN_FIELDS`` of a run starting now on ``device``."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = cpu_model()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "machine": machine,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device.type,
        # The VMs are shared: a busy neighbour cuts the bandwidth ten-fold.
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def run_header(prov: Mapping[str, str], *versions: str) -> str:
    """One line saying where and when a run ran: machine, threads, torch, ``versions``
    (e.g. ``"triton 3.2"``), commit, date and load, from ``provenance``'s fields."""
    return " | ".join(
        [
            prov["machine"],
            f"{prov['cores']} cores, {prov['threads']} torch threads",
            f"torch {prov['torch']}",
            *versions,
            f"commit {prov['commit']}",
            prov["date"],
            f"load {prov['loadavg']}",
        ]
    )


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


def mem_available_gb(default: float = 8.0) -> float:
    """MemAvailable from /proc/meminfo in GiB (``default`` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return default


def csv_list(s: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the comma-list command-line options)."""
    return [x.strip() for x in s.split(",") if x.strip()]


# --------------------------------------------------------------------------- CSV history


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Append ``rows`` to the history at ``path``, writing the header if the file is new.

    A file written with other columns is rewritten once under the union of both headers
    (missing values left empty) rather than appended to out of line: the CSVs are the
    only record of past runs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(fields)
    if path.exists():
        with path.open(newline="") as f:
            old_header = next(csv.reader(f), [])
        if old_header and old_header != header:
            union = old_header + [k for k in header if k not in old_header]
            if union != old_header:
                old_rows = read_csv(path)
                with path.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=union, restval="")
                    w.writeheader()
                    w.writerows(old_rows)
            header = union
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- tables


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A GitHub table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def text_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "  "
) -> list[str]:
    """The same cells for a terminal: padded columns, the first left-aligned."""
    rows = [list(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return indent + "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return [line(header), *(line(r) for r in rows)]
