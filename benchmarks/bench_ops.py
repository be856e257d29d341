"""Throughput of the multi-tensor surgery ops beside the ways people compute them today.

    python -m benchmarks.bench_ops                     # full suite (~10 min on 2 cores)
    python -m benchmarks.bench_ops --quick             # W1, project_conflicting_, fp32+bf16
    python -m benchmarks.bench_ops --workloads W1 --ops project_conflicting_ --dtypes bf16
    python -m benchmarks.bench_ops --tiny --no-save    # seconds; what the smoke test runs

For every case (workload x dtype x op x m x conflict) all providers (see
``benchmarks/providers.py``) run interleaved; we print median time with its 20-80 %
spread, GB/s computed from the bytes that *must* move, and that as a % of the memory
bandwidth measured in the same run. Bytes that must move, with N elements per list and
e bytes per element (fp32 4, bf16 2):

    dot_norms                      2N e   (read g, r once)
    project_conflicting_, conflict 5N e   (pass 1 reads g, r; pass 2 reads g, r, writes g)
    project_conflicting_, none     2N e   (coefficient 0 and rho 0: pass 2 skips)
    gram, m lists                  mN e
    pcgrad_, m lists               (2m+1)N e  (gram pass + combine pass writing lists[0])

Every run appends rows to ``benchmarks/results/ops.csv`` (machine, versions, commit,
date, load average) and rewrites ``benchmarks/results/ops.md`` with this run's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import providers as P
from benchmarks.harness import (
    DTYPES,
    ELEMENT_BYTES,
    RESULTS_DIR,
    Bandwidth,
    CacheFlusher,
    Timing,
    add_threads_argument,
    dtype_name,
    fmt_ms,
    measure_bandwidth,
    provenance,
    time_interleaved,
)
from benchmarks.workloads import (
    WORKLOADS,
    Workload,
    flatten_into,
    make_pair,
    make_tasks,
    tiny_workload,
)

PAIR_OPS = ("dot_norms", "project_conflicting_")
TASK_OPS = ("gram", "pcgrad_")
ALL_OPS = PAIR_OPS + TASK_OPS
ALL_PROVIDERS = ("loop", "cat", "eager", "flat", "flat-gemm", "torchjd")
# flat-gemm (one X @ X.T over a [2, N] buffer) is opt-in: a single read like the fused
# kernels, but MKL's fp32 sgemm with k = 40M is off by 2e-3 relative in ||r||^2 (measured
# on W1), so it is not a valid fp32 competitor; bf16 rounds the result anyway.
DEFAULT_PROVIDERS = ("loop", "cat", "eager", "flat", "torchjd")
# W3 (207M elements) with m = 4 or 8 lists needs 10-20 GB and minutes per case for the
# Python-loop providers; by default it runs m = 2 only (override with --ms).
DEFAULT_MS = {"W3": (2,)}

CSV_FIELDS = (
    "date",
    "commit",
    "machine",
    "cores",
    "threads",
    "torch",
    "triton",
    "device",
    "loadavg",
    "workload",
    "n_tensors",
    "numel",
    "dtype",
    "elem_bytes",
    "op",
    "m",
    "conflict",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "repeats",
    "bytes",
    "gbps",
    "pct_bw",
    "bw_gbps",
    "rel_err",
)


@dataclass
class Case:
    work: Workload
    dtype: torch.dtype
    op: str
    m: int  # 2 for the pair ops
    conflict: bool

    @property
    def label(self) -> str:
        ms = f" m={self.m}" if self.op in TASK_OPS else ""
        c = "" if self.op == "dot_norms" else (" conflict" if self.conflict else " no-conflict")
        return f"{self.work.name} {dtype_name(self.dtype)} {self.op}{ms}{c}"

    def bytes_moved(self) -> int:
        n, e = self.work.numel, ELEMENT_BYTES[self.dtype]
        if self.op == "dot_norms":
            return 2 * n * e
        if self.op == "project_conflicting_":
            return (5 if self.conflict else 2) * n * e
        if self.op == "gram":
            return self.m * n * e
        return (2 * self.m + 1) * n * e

    def memory_estimate(self, providers: Sequence[str]) -> int:
        """Peak bytes this case allocates (inputs, copies, the worst provider's temporaries)."""
        n, e = self.work.numel, ELEMENT_BYTES[self.dtype]
        if self.op in PAIR_OPS:
            base = (5 + (2 if "flat-gemm" in providers else 0)) * n * e
            transient = 2 * n * 4 if {"cat", "flat"} & set(providers) else n * 4
            return base + transient
        base = (2 * self.m + 2) * n * e
        transient = 3 * self.m * n * 4 if {"cat", "loop"} & set(providers) else n * 4
        return base + transient


# --------------------------------------------------------------------------- reference checks


def _close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    # A sanity check that each provider computes the op, not a precision test (tests/ do
    # that; the measured error is reported as rel_err): an fp32 sgemm with k = 40M (the
    # flat-gemm provider, torch.cat + matmul Gram matrices) is off by ~2e-3 relative.
    rtol, atol = (5e-3, 5e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    return bool(((x.double() - ref).abs() <= atol + rtol * ref.abs()).all())


def _sample(n: int) -> list[int]:
    return sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))


class Checker:
    """Float64 references for one case, and a verdict on a provider's output."""

    def __init__(self, case: Case, data: P.PairData | P.TaskData) -> None:
        self.case = case
        self.data = data
        if isinstance(data, P.PairData):
            sums = torch.zeros(3, dtype=torch.float64)
            for g, r in zip(data.grads, data.refs):
                g64, r64 = g.double().reshape(-1), r.double().reshape(-1)
                sums += torch.stack([g64 @ r64, r64 @ r64, g64 @ g64]).cpu()
            self.sums = sums
            dot, rr = float(sums[0]), float(sums[1])
            self.c = dot / rr if dot < 0 and rr > P.EPS else 0.0
        else:
            m = len(data.lists)
            gram = torch.zeros(m, m, dtype=torch.float64)
            for ts in zip(*data.lists):
                x = torch.stack([t.reshape(-1).double() for t in ts])
                gram += (x @ x.T).cpu()
            self.gram = gram
            self.w = P.pcgrad_weights_host(gram, data.order)

    def verify(self, name: str, result: object, rho: float) -> str:
        """'' if the provider's output matches the float64 reference, else a short reason.

        Also sets ``self.rel_err``: the provider's largest relative error on the reduced
        sums (dot_norms, project_conflicting_), the Gram matrix (relative to its largest
        entry) or the sampled aggregate (pcgrad_); NaN where not measured.
        """
        case, data = self.case, self.data
        tol = 1e-2
        self.rel_err = float("nan")
        if case.op in ("dot_norms", "project_conflicting_") and isinstance(result, torch.Tensor):
            got = result.reshape(-1)[:2].double().cpu()
            ref = self.sums[:2]
            self.rel_err = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
            if not self.rel_err <= tol:
                return f"sums {got.tolist()} vs {ref.tolist()}"
        if case.op == "gram":
            got = result.double().cpu()
            self.rel_err = float((got - self.gram).abs().max() / self.gram.abs().max())
            if not self.rel_err <= tol:
                return "gram differs"
        if case.op == "project_conflicting_":
            assert isinstance(data, P.PairData)
            outs = self._written_pair(name)
            pristine = P._split_views(data.pristine, data.grads)
            for i in _sample(len(data.grads)):
                ref = (
                    pristine[i].double()
                    - self.c * data.refs[i].double()
                    + rho * data.refs[i].double()
                )
                if not _close(outs[i], ref, case.dtype):
                    return f"grads[{i}] differs after the update"
        if case.op == "pcgrad_":
            assert isinstance(data, P.TaskData)
            if name == "torchjd":
                return ""  # random order by design; compared in shape only
            outs = self._written_tasks(name)
            firsts = P._split_views(data.pristine0, data.lists[0])
            err = 0.0
            for i in _sample(len(firsts)):
                ref = self.w[0] * firsts[i].double()
                for j in range(1, len(data.lists)):
                    ref = ref + self.w[j] * data.lists[j][i].double()
                if ref.numel():
                    err = max(err, float((outs[i].double() - ref).abs().max() / ref.abs().max()))
                if not _close(outs[i], ref, case.dtype):
                    return f"aggregate[{i}] differs"
            self.rel_err = err
        return ""

    def _written_pair(self, name: str) -> list[torch.Tensor]:
        data = self.data
        if name == "flat":
            return P._split_views(data.g_flat, data.grads)
        if name == "flat-gemm":
            return P._split_views(data.x2[0], data.grads)
        return data.grads

    def _written_tasks(self, name: str) -> list[torch.Tensor]:
        data = self.data
        if name == "flat":
            return P._split_views(data.out_flat, data.lists[0])
        return data.lists[0]


# --------------------------------------------------------------------------- data


def build_pair(case: Case, device: torch.device, with_gemm: bool) -> P.PairData:
    grads, refs = make_pair(case.work, case.dtype, device, conflict=case.conflict)
    pristine, _ = flatten_into(grads)
    g_flat = pristine.clone()
    r_flat, _ = flatten_into(refs)
    x2 = None
    if with_gemm:
        x2 = torch.stack([pristine, r_flat])
    return P.PairData(grads, refs, pristine, g_flat, r_flat, x2)


def build_tasks(case: Case, device: torch.device) -> P.TaskData:
    lists = make_tasks(case.work, case.m, case.dtype, device, conflict=case.conflict)
    x = torch.empty(case.m, case.work.numel, dtype=case.dtype, device=device)
    for j, lst in enumerate(lists):
        off = 0
        for t in lst:
            x[j, off : off + t.numel()].copy_(t.reshape(-1))
            off += t.numel()
    pristine0 = x[0].clone()
    out_flat = torch.empty_like(pristine0)
    order = torch.arange(case.m).repeat(case.m, 1)
    return P.TaskData(lists, pristine0, x, out_flat, order)


# --------------------------------------------------------------------------- running


@dataclass
class Row:
    case: Case
    provider: str
    timing: Timing
    gbps: float
    pct_bw: float
    bw_gbps: float
    rel_err: float = float("nan")


def available_backend_names(device: torch.device, allow_interpreter: bool) -> list[str]:
    try:
        import safegrad_kernels as sgk
    except Exception as exc:
        print(f"# safegrad_kernels not importable ({exc}); baselines only")
        return []
    names = []
    for name, (ok, why) in sgk.available_backends(device).items():
        if name == "triton" and device.type == "cpu" and not allow_interpreter:
            # The interpreter runs kernels in numpy, ~1000x slower: meaningless timings.
            print("# triton: skipped on CPU (interpreter only; use --allow-interpreter)")
            continue
        if ok:
            names.append(name)
        else:
            print(f"# backend {name}: unavailable ({why})")
    return names


def warm_backends(backends: Sequence[str], device: torch.device) -> None:
    """First use JIT-compiles the C++ extension (~1 min): do it before any timing."""
    if not backends:
        return
    import safegrad_kernels as sgk

    g = [torch.randn(5, device=device)]
    r = [torch.randn(5, device=device)]
    for b in backends:
        t0 = time.perf_counter()
        sgk.dot_norms(g, r, backend=b)
        dt = time.perf_counter() - t0
        if dt > 1:
            print(f"# backend {b}: first call took {dt:.0f} s (compile/load)")


def run_case(
    case: Case,
    device: torch.device,
    backends: Sequence[str],
    providers: Sequence[str],
    *,
    repeats: int,
    budget_s: float,
    slow_s: float,
    rho: float,
    check: bool,
    flush: CacheFlusher | None,
    bw: Bandwidth,
    strict: bool = False,
) -> list[Row]:
    if case.op in PAIR_OPS:
        data = build_pair(case, device, with_gemm="flat-gemm" in providers)
        cands = P.pair_candidates(case.op, data, backends, providers, rho=rho)
    else:
        data = build_tasks(case, device)
        cands = P.task_candidates(case.op, data, backends, providers)
    errors: dict[str, float] = {}
    mismatched: set[str] = set()
    if check:
        checker = Checker(case, data)
        for c in cands:
            if c.reset:
                c.reset()
            why = checker.verify(c.name, c.fn(), rho)
            errors[c.name] = checker.rel_err
            if why:
                # Not fatal: an fp32 provider can legitimately take another branch where a
                # PCGrad dot is near zero (cat with m = 8 on W1 did). Flagged in the tables.
                print(f"# WARNING {case.label}: provider {c.name!r} disagrees with float64: {why}")
                mismatched.add(c.name)
                if strict:
                    raise AssertionError(f"{case.label}: provider {c.name!r} is wrong: {why}")
    timings = time_interleaved(
        cands,
        device,
        repeats=repeats,
        warmup=0 if check else 1,
        budget_s=budget_s,
        slow_s=slow_s,
        flush=flush,
    )
    nbytes = case.bytes_moved()
    rows = []
    for name, t in timings.items():
        gbps = nbytes / t.median_s / 1e9
        rows.append(
            Row(
                case,
                f"{name}!" if name in mismatched else name,
                t,
                gbps,
                100 * gbps / bw.best_gbps,
                bw.best_gbps,
                errors.get(name, math.nan),
            )
        )
    del data, cands
    gc.collect()
    return rows


def _err(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0e}"


def print_case(rows: Sequence[Row]) -> None:
    case = rows[0].case
    by = {r.provider: r for r in rows}
    base = by.get("loop")
    flat = by.get("flat")
    e = ELEMENT_BYTES[case.dtype]
    print(
        f"\n{case.label}  [{case.work.n_tensors} tensors, {case.work.numel / 1e6:.1f}M elements, "
        f"{e} B/elem, must move {case.bytes_moved() / 1e6:.0f} MB; bandwidth just before: "
        f"{rows[0].bw_gbps:.1f} GB/s]"
    )
    print(
        f"  {'provider':<10} {'median ms':>10} {'p20-p80 ms':>16} {'GB/s':>7} {'% bw':>6} "
        f"{'x loop':>7} {'/ flat':>7} {'rel err':>8} {'n':>3}"
    )
    for r in sorted(rows, key=lambda r: r.timing.median_s):
        t = r.timing
        spread = f"{fmt_ms(t.quantile_s(0.2))}-{fmt_ms(t.quantile_s(0.8))}"
        vs_loop = f"{base.timing.median_s / t.median_s:.1f}" if base else "-"
        vs_flat = f"{t.median_s / flat.timing.median_s:.2f}" if flat else "-"
        print(
            f"  {r.provider:<10} {fmt_ms(t.median_s):>10} {spread:>16} {r.gbps:>7.1f} "
            f"{r.pct_bw:>6.0f} {vs_loop:>7} {vs_flat:>7} {_err(r.rel_err):>8} {len(t.samples_s):>3}"
        )


def markdown(rows: Sequence[Row], prov: dict[str, str], bw: Bandwidth, argv: str) -> str:
    lines = [
        "# bench_ops results",
        "",
        f"- machine: {prov['machine']} ({prov['cores']} cores, torch threads {prov['threads']}), "
        f"device {prov['device']}",
        f"- torch {prov['torch']}, triton {prov['triton']}, commit {prov['commit']}, "
        f"date {prov['date']}, load average at start {prov['loadavg']}",
        f"- memory bandwidth measured in this run (initialised buffers): read "
        f"{bw.read_gbps:.1f} GB/s, copy {bw.copy_gbps:.1f} GB/s, triad {bw.triad_gbps:.1f} GB/s; "
        f"'% bw' uses the best streaming figure measured again just before each case "
        "(the load on this shared VM varies)",
        f"- command: `{argv}`",
        "- time: median over interleaved repeats, spread = 20th-80th percentile; "
        "GB/s = bytes that must move / median (see bench_ops.py docstring); "
        "'x loop' = loop time / this time; '/ flat' = this time / flat time; "
        "a '!' after a provider = it disagreed with the float64 reference (see the log); "
        "'rel err' = largest relative error of the provider's sums (or Gram matrix, or sampled "
        "aggregate) against float64; n = timed samples",
        "",
    ]
    cases: dict[str, list[Row]] = {}
    for r in rows:
        cases.setdefault(r.case.label, []).append(r)
    for label, rs in cases.items():
        case = rs[0].case
        by = {r.provider: r for r in rs}
        lines += [
            f"## {label}",
            "",
            f"{case.work.description}: {case.work.n_tensors} tensors, "
            f"{case.work.numel / 1e6:.1f}M elements, must move {case.bytes_moved() / 1e6:.0f} MB; "
            f"bandwidth measured just before: {rs[0].bw_gbps:.1f} GB/s",
            "",
            "| provider | median ms | p20-p80 ms | GB/s | % bw | x loop | / flat | rel err | n |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(rs, key=lambda r: r.timing.median_s):
            t = r.timing
            vs_loop = f"{by['loop'].timing.median_s / t.median_s:.1f}" if "loop" in by else "-"
            vs_flat = f"{t.median_s / by['flat'].timing.median_s:.2f}" if "flat" in by else "-"
            lines.append(
                f"| {r.provider} | {fmt_ms(t.median_s)} | {fmt_ms(t.quantile_s(0.2))}-"
                f"{fmt_ms(t.quantile_s(0.8))} | {r.gbps:.1f} | {r.pct_bw:.0f} | {vs_loop} | {vs_flat} "
                f"| {_err(r.rel_err)} | {len(t.samples_s)} |"
            )
        lines.append("")
    return "\n".join(lines)


def target_report(rows: Sequence[Row], backend: str = "cpp") -> list[str]:
    """Issue 2's targets on W1 project_conflicting_ with a conflict, per dtype."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        by = {
            r.provider: r.timing.median_s
            for r in rows
            if r.case.work.name == "W1"
            and r.case.op == "project_conflicting_"
            and r.case.conflict
            and r.case.dtype == dtype
        }
        if not by:
            continue
        name = dtype_name(dtype)
        if backend not in by:
            out.append(f"{name}: backend {backend!r} not measured; targets not evaluated")
            continue
        t = by[backend]
        if "flat" in by:
            ratio = t / by["flat"]
            out.append(
                f"{name}: {backend} / flat = {ratio:.2f} (target <= 0.80: "
                f"{'MET' if ratio <= 0.8 else 'NOT MET'})"
            )
        if "loop" in by:
            speed = by["loop"] / t
            out.append(
                f"{name}: loop / {backend} = {speed:.1f}x (target >= 8: "
                f"{'MET' if speed >= 8 else 'NOT MET'})"
            )
    return out


def append_csv(path: Path, rows: Sequence[Row], prov: dict[str, str], bw: Bandwidth) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            c, t = r.case, r.timing
            w.writerow(
                {
                    **{
                        k: prov[k]
                        for k in (
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
                    },
                    "workload": c.work.name,
                    "n_tensors": c.work.n_tensors,
                    "numel": c.work.numel,
                    "dtype": dtype_name(c.dtype),
                    "elem_bytes": ELEMENT_BYTES[c.dtype],
                    "op": c.op,
                    "m": c.m if c.op in TASK_OPS else "",
                    "conflict": int(c.conflict),
                    "provider": r.provider,
                    "median_ms": f"{t.median_s * 1e3:.4f}",
                    "p20_ms": f"{t.quantile_s(0.2) * 1e3:.4f}",
                    "p80_ms": f"{t.quantile_s(0.8) * 1e3:.4f}",
                    "repeats": len(t.samples_s),
                    "bytes": c.bytes_moved(),
                    "gbps": f"{r.gbps:.3f}",
                    "pct_bw": f"{r.pct_bw:.2f}",
                    "bw_gbps": f"{r.bw_gbps:.3f}",
                    "rel_err": f"{r.rel_err:.2e}",
                }
            )


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_cases(args: argparse.Namespace) -> list[Case]:
    if args.tiny:
        works = [tiny_workload()]
    else:
        works = [WORKLOADS[w] for w in _csv_list(args.workloads)]
    conflicts = {"both": (True, False), "yes": (True,), "no": (False,)}[args.conflict]
    cases = []
    for work in works:
        for dname in _csv_list(args.dtypes):
            dtype = DTYPES[dname]
            for op in _csv_list(args.ops):
                if op not in ALL_OPS:
                    raise SystemExit(f"unknown op {op!r}; choose from {ALL_OPS}")
                if op == "dot_norms":
                    cases.append(Case(work, dtype, op, 2, True))
                    continue
                ms = [2]
                if op in TASK_OPS:
                    ms = (
                        [int(m) for m in _csv_list(args.ms)]
                        if args.ms
                        else list(DEFAULT_MS.get(work.name, (2, 4, 8)))
                    )
                for m in ms:
                    for conflict in conflicts:
                        cases.append(Case(work, dtype, op, m, conflict))
    return cases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma list of W1..W4")
    p.add_argument("--ops", default=",".join(ALL_OPS))
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--ms", default="", help="m values for gram/pcgrad_ (default 2,4,8; W3: 2)")
    p.add_argument("--conflict", choices=("both", "yes", "no"), default="both")
    p.add_argument(
        "--providers", default=",".join(DEFAULT_PROVIDERS), help=f"from {', '.join(ALL_PROVIDERS)}"
    )
    p.add_argument("--backends", default="", help="comma list; default: every available one")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--budget",
        type=float,
        default=4.0,
        help="seconds of timed rounds per case; repeats shrink to fit (min 3)",
    )
    p.add_argument(
        "--slow",
        type=float,
        default=5.0,
        help="a provider whose first timed call takes longer than this many seconds is timed once",
    )
    p.add_argument("--rho", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help="W1 project_conflicting_ (conflict) + dot_norms, fp32 and bf16",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny workload, seconds (smoke test)")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the float64 correctness check of every provider",
    )
    p.add_argument("--no-flush", dest="flush", action="store_false")
    p.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="time triton on CPU under TRITON_INTERPRET=1 (very slow)",
    )
    p.add_argument(
        "--mem-gb",
        type=float,
        default=0.0,
        help="skip cases estimated above this (default: 70%% of MemAvailable)",
    )
    p.add_argument("--csv", default=str(RESULTS_DIR / "ops.csv"))
    p.add_argument("--md", default=str(RESULTS_DIR / "ops.md"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop when a provider disagrees")
    args = p.parse_args(argv)
    if args.quick:
        args.workloads, args.ops, args.conflict = "W1", "dot_norms,project_conflicting_", "yes"
    if args.tiny:
        args.repeats, args.budget, args.conflict = 3, 0.2, "yes"
        args.ms = args.ms or "2"
    return args


def _mem_available_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return 8.0


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    prov = provenance(device)
    prov["loadavg"] = " ".join(os.getloadavg().__str__().strip("()").split(", "))
    backends = _csv_list(args.backends) or available_backend_names(device, args.allow_interpreter)
    providers = _csv_list(args.providers)
    if "torchjd" in providers and P.torchjd_pcgrad() is None:
        print("# torchjd: not installed (pip install torchjd); its PCGrad provider is skipped")
    warm_backends(backends, device)
    mem_gb = args.mem_gb or 0.7 * _mem_available_gb()
    print(
        f"# {prov['machine']} | {prov['cores']} cores, {prov['threads']} torch threads | "
        f"torch {prov['torch']} | triton {prov['triton']} | commit {prov['commit']} | "
        f"{prov['date']} | load {prov['loadavg']}"
    )
    print(
        f"# backends: {', '.join(backends) or 'none'}; providers: {', '.join(providers)}; "
        f"memory budget {mem_gb:.1f} GB"
    )
    bw = measure_bandwidth(device, megabytes=64 if args.tiny else 512)
    print(
        f"# bandwidth (initialised buffers): read {bw.read_gbps:.1f}, copy {bw.copy_gbps:.1f}, "
        f"triad {bw.triad_gbps:.1f} GB/s -> reference {bw.best_gbps:.1f} GB/s"
    )
    flush = CacheFlusher(device, 8 if args.tiny else 64) if args.flush else None
    rows: list[Row] = []
    argv_str = "python -m benchmarks.bench_ops " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    t_start = time.perf_counter()
    for case in build_cases(args):
        need = case.memory_estimate(providers) / 2**30
        if need > mem_gb:
            print(f"\n{case.label}: skipped, needs ~{need:.1f} GB (budget {mem_gb:.1f} GB)")
            continue
        case_rows = run_case(
            case,
            device,
            backends,
            providers,
            repeats=args.repeats,
            budget_s=args.budget,
            slow_s=args.slow,
            rho=args.rho,
            check=args.check,
            flush=flush,
            bw=measure_bandwidth(device, megabytes=8 if args.tiny else 256, repeats=3),
            strict=args.strict,
        )
        print_case(case_rows)
        rows.extend(case_rows)
        if not args.no_save:  # saved as we go: a long run that dies keeps what it measured
            append_csv(Path(args.csv), case_rows, prov, bw)
            Path(args.md).write_text(markdown(rows, prov, bw, argv_str) + "\n")
    bw_end = measure_bandwidth(device, megabytes=64 if args.tiny else 512)
    print(
        f"\n# bandwidth at the end: best {bw_end.best_gbps:.1f} GB/s "
        f"(start {bw.best_gbps:.1f}); total {time.perf_counter() - t_start:.0f} s"
    )
    for line in target_report(rows):
        print(f"# target {line}")
    if not args.no_save and rows:
        Path(args.md).write_text(markdown(rows, prov, bw, argv_str) + "\n")
        print(f"# appended {len(rows)} rows to {args.csv}; tables in {args.md}")
    return rows


if __name__ == "__main__":
    main()
