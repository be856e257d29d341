"""Throughput of the multi-tensor surgery ops beside the ways people compute them today.

    python -m benchmarks.bench_ops                     # full suite (~10 min on 2 cores)
    python -m benchmarks.bench_ops --quick             # W1, project_conflicting_, fp32+bf16
    python -m benchmarks.bench_ops --workloads W1 --ops project_conflicting_ --dtypes bf16
    python -m benchmarks.bench_ops --tiny --no-save    # seconds; what the smoke test runs
    python -m benchmarks.bench_ops --tables-only       # rebuild the tables from the CSV
    python -m benchmarks.bench_ops --overhead          # host overhead per step (bench_overhead)

This runs every op family; ``python -m benchmarks.bench_<op>`` (dot_norms, project,
gram, pcgrad) runs one, with the same flags. For every case (workload x dtype x op x m x
conflict) all providers (see ``benchmarks/providers.py``) run interleaved; we print
median time with its 20-80 % spread, GB/s computed from the bytes that *must* move (each
family module gives its count) and that as a % of the memory bandwidth measured in the
same run.

Every run appends rows to ``benchmarks/results/ops.csv`` (machine, versions, commit,
date, load average) and rewrites the current table of each workload it measured,
``benchmarks/results/ops_<workload>.md``: the latest measurement of every case, from the
CSV (see ``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import providers as P
from benchmarks import report
from benchmarks.cases import PAIR, TASKS, Case, Row
from benchmarks.check import Checker
from benchmarks.families import FAMILIES
from benchmarks.harness import (
    DTYPES,
    RESULTS_DIR,
    Bandwidth,
    CacheFlusher,
    add_threads_argument,
    append_csv,
    csv_list,
    measure_bandwidth,
    mem_available_gb,
    provenance,
    read_csv,
    run_header,
    time_interleaved,
)
from benchmarks.workloads import WORKLOADS, tiny_workload

ALL_OPS = tuple(FAMILIES)
PAIR_OPS = tuple(op for op, f in FAMILIES.items() if f.inputs == PAIR)
TASK_OPS = tuple(op for op, f in FAMILIES.items() if f.inputs == TASKS)
QUICK_OPS = ("dot_norms", "project_conflicting_")
QUICK_HELP = (
    "W1 with a conflict, fp32 and bf16: dot_norms and project_conflicting_ (bench_<op>: its op)"
)
ALL_PROVIDERS = ("loop", "cat", "eager", "flat", "flat-gemm", "torchjd")
# flat-gemm (one X @ X.T over a [2, N] buffer) is opt-in: a single read like the fused
# kernels, but MKL's fp32 sgemm with k = 40M is off by 2e-3 relative in ||r||^2 (measured
# on W1), so it is not a valid fp32 competitor; bf16 rounds the result anyway.
DEFAULT_PROVIDERS = ("loop", "cat", "eager", "flat", "torchjd")
# W3 (207M elements) with m = 4 or 8 lists needs 10-20 GB and minutes per case for the
# Python-loop providers; by default it runs m = 2 only (override with --ms).
DEFAULT_MS = {"W3": (2,)}
TABLES = str(RESULTS_DIR / "ops_{workload}.md")


# --------------------------------------------------------------------------- backends


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


# --------------------------------------------------------------------------- running


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
    data = case.build(device, providers)
    cands = case.family.candidates(data, backends, providers, rho)
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


def build_cases(args: argparse.Namespace) -> list[Case]:
    if args.tiny:
        works = [tiny_workload()]
    else:
        works = [WORKLOADS[w] for w in csv_list(args.workloads)]
    conflicts = {"both": (True, False), "yes": (True,), "no": (False,)}[args.conflict]
    cases = []
    for work in works:
        for dname in csv_list(args.dtypes):
            dtype = DTYPES[dname]
            for op in csv_list(args.ops):
                if op not in FAMILIES:
                    raise SystemExit(f"unknown op {op!r}; choose from {ALL_OPS}")
                family = FAMILIES[op]
                if not family.conflict_matters:
                    cases.append(Case(work, dtype, family, 2, True))
                    continue
                ms = [2]
                if family.inputs == TASKS:
                    ms = (
                        [int(m) for m in csv_list(args.ms)]
                        if args.ms
                        else list(DEFAULT_MS.get(work.name, (2, 4, 8)))
                    )
                for m in ms:
                    for conflict in conflicts:
                        cases.append(Case(work, dtype, family, m, conflict))
    return cases


def parse_args(
    argv: Sequence[str] | None = None, ops: Sequence[str] | None = None
) -> argparse.Namespace:
    """The command line; ``ops`` fixes the op set (one family's entry point: no --ops)."""
    what = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=what if ops is None else f"{', '.join(ops)}: {what}")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma list of W1..W4")
    if ops is None:
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
    p.add_argument("--quick", action="store_true", help=QUICK_HELP)
    p.add_argument("--tiny", action="store_true", help="a tiny workload, seconds (smoke test)")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="only the host-overhead case: python -m benchmarks.bench_overhead (its defaults)",
    )
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
    p.add_argument("--csv", default=str(RESULTS_DIR / "ops.csv"), help="the history, appended to")
    p.add_argument(
        "--md",
        default=TABLES,
        help="the current tables, rewritten from --csv; {workload} = one file per workload "
        "(default %(default)s)",
    )
    p.add_argument("--no-save", action="store_true")
    p.add_argument(
        "--tables-only",
        action="store_true",
        help="measure nothing: rebuild the tables of every workload in --csv",
    )
    p.add_argument("--strict", action="store_true", help="stop when a provider disagrees")
    args = p.parse_args(argv)
    if ops is not None:
        args.ops = ",".join(ops)
    if args.quick:
        args.workloads, args.conflict = "W1", "yes"
        if ops is None:
            args.ops = ",".join(QUICK_OPS)
    if args.tiny:
        args.repeats, args.budget, args.conflict = 3, 0.2, "yes"
        args.ms = args.ms or "2"
    return args


def main(argv: Sequence[str] | None = None, ops: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv, ops)
    if args.overhead:
        from benchmarks import bench_overhead

        bench_overhead.main([])
        return []
    if args.tables_only:
        workloads = {r["workload"]: None for r in read_csv(Path(args.csv))}
        for path in report.write_tables(Path(args.csv), args.md, workloads):
            print(f"# wrote {path}")
        return []
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    prov = provenance(device)
    backends = csv_list(args.backends) or available_backend_names(device, args.allow_interpreter)
    providers = csv_list(args.providers)
    if "torchjd" in providers and P.torchjd_pcgrad() is None:
        print("# torchjd: not installed (pip install torchjd); its PCGrad provider is skipped")
    warm_backends(backends, device)
    mem_gb = args.mem_gb or 0.7 * mem_available_gb()
    print("# " + run_header(prov, f"triton {prov['triton']}"))
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
    records: list[dict[str, str]] = []
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
        case_records = [report.record(r, prov) for r in case_rows]
        print("\n".join(report.console_lines(case_records)))
        rows.extend(case_rows)
        records.extend(case_records)
        if not args.no_save:  # saved as we go: a long run that dies keeps what it measured
            append_csv(Path(args.csv), report.CSV_FIELDS, case_records)
            report.write_tables(Path(args.csv), args.md, [case.work.name])
    bw_end = measure_bandwidth(device, megabytes=64 if args.tiny else 512)
    print(
        f"\n# bandwidth at the end: best {bw_end.best_gbps:.1f} GB/s "
        f"(start {bw.best_gbps:.1f}); total {time.perf_counter() - t_start:.0f} s"
    )
    for line in report.target_report(records):
        print(f"# target {line}")
    if not args.no_save and rows:
        workloads = [r["workload"] for r in records]
        paths = report.write_tables(Path(args.csv), args.md, workloads)
        print(f"# appended {len(rows)} rows to {args.csv}; tables in {', '.join(map(str, paths))}")
    return rows


if __name__ == "__main__":
    main()
