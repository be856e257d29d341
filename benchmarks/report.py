"""bench_ops's CSV rows, its console tables and its current markdown tables.

Every measurement becomes one CSV row (``record``); the console and the markdown tables
are both drawn from such rows, so they show the same numbers. The markdown tables are
*current* tables: one file per workload holding the latest measurement of every case
(per machine, device and thread count) found in the CSV, rebuilt after every run. The
CSV keeps every run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .cases import TASKS, Row, case_label
from .families import FAMILIES
from .harness import (
    DTYPES,
    ELEMENT_BYTES,
    RUN_FIELDS,
    dtype_name,
    fmt_ms,
    markdown_table,
    read_csv,
    text_table,
)
from .workloads import WORKLOADS

CASE_FIELDS = ("workload", "n_tensors", "numel", "dtype", "elem_bytes", "op", "m", "conflict")
# Timing (ms), the bytes moved and their rate, its % of the copy bandwidth measured in the
# same run, and the error against the float64 reference.
RESULT_FIELDS = ("provider", "median_ms", "p20_ms", "p80_ms", "repeats", "bytes", "gbps")
RESULT_FIELDS += ("pct_bw", "bw_gbps", "rel_err")
CSV_FIELDS = (*RUN_FIELDS, *CASE_FIELDS, *RESULT_FIELDS)
# The current table keeps the latest run of each case per (machine, device, threads).
SETUP_FIELDS = ("machine", "cores", "device", "threads")

COLUMNS = (
    "provider",
    "median ms",
    "p20-p80 ms",
    "GB/s",
    "% bw",
    "x loop",
    "/ flat",
    "rel err",
    "n",
)
LEGEND = (
    "- time: median over interleaved repeats, spread = 20th-80th percentile; "
    "GB/s = bytes that must move / median (each op's count: its `bench_<op>.py`); "
    "'% bw' = that against the best streaming bandwidth measured just before the case "
    "(initialised buffers; the load on this shared VM varies); "
    "'x loop' = loop time / this time; '/ flat' = this time / flat time; "
    "a '!' after a provider = it disagreed with the float64 reference (see the run's log); "
    "'rel err' = largest relative error of the provider's sums (or Gram matrix, or sampled "
    "aggregate) against float64; n = timed samples"
)


def record(row: Row, prov: Mapping[str, str]) -> dict[str, str]:
    """The CSV row of one measurement (``prov``: the run's ``harness.provenance``)."""
    c, t = row.case, row.timing
    return {
        **{k: str(prov[k]) for k in RUN_FIELDS},
        "workload": c.work.name,
        "n_tensors": str(c.work.n_tensors),
        "numel": str(c.work.numel),
        "dtype": dtype_name(c.dtype),
        "elem_bytes": str(ELEMENT_BYTES[c.dtype]),
        "op": c.op,
        "m": str(c.m) if c.family.inputs == TASKS else "",
        "conflict": str(int(c.conflict)),
        "provider": row.provider,
        "median_ms": f"{t.median_s * 1e3:.4f}",
        "p20_ms": f"{t.quantile_s(0.2) * 1e3:.4f}",
        "p80_ms": f"{t.quantile_s(0.8) * 1e3:.4f}",
        "repeats": str(len(t.samples_s)),
        "bytes": str(c.bytes_moved()),
        "gbps": f"{row.gbps:.3f}",
        "pct_bw": f"{row.pct_bw:.2f}",
        "bw_gbps": f"{row.bw_gbps:.3f}",
        "rel_err": f"{row.rel_err:.2e}",
    }


def label(r: Mapping[str, str]) -> str:
    family = FAMILIES.get(r["op"])
    matters = family is None or family.conflict_matters
    return case_label(
        r["workload"], r["dtype"], r["op"], r["m"], r["conflict"] == "1" if matters else None
    )


def _ms(r: Mapping[str, str], key: str) -> str:
    return fmt_ms(float(r[key]) / 1e3)


def _err(x: str) -> str:
    v = float(x)
    return "-" if math.isnan(v) else f"{v:.0e}"


def provider_cells(rows: Sequence[Mapping[str, str]]) -> list[list[str]]:
    """One case's providers, fastest first, as the cells of ``COLUMNS``."""
    by = {r["provider"]: float(r["median_ms"]) for r in rows}
    out = []
    for r in sorted(rows, key=lambda r: float(r["median_ms"])):
        t = float(r["median_ms"])
        out.append(
            [
                r["provider"],
                _ms(r, "median_ms"),
                f"{_ms(r, 'p20_ms')}-{_ms(r, 'p80_ms')}",
                f"{float(r['gbps']):.1f}",
                f"{float(r['pct_bw']):.0f}",
                f"{by['loop'] / t:.1f}" if "loop" in by else "-",
                f"{t / by['flat']:.2f}" if "flat" in by else "-",
                _err(r["rel_err"]),
                r["repeats"],
            ]
        )
    return out


def _sizes(r: Mapping[str, str]) -> str:
    return (
        f"{r['n_tensors']} tensors, {int(r['numel']) / 1e6:.1f}M elements, "
        f"{r['elem_bytes']} B/elem, must move {int(r['bytes']) / 1e6:.0f} MB"
    )


def _load(r: Mapping[str, str]) -> str:
    return " ".join(f"{float(x):.2f}" for x in r["loadavg"].split())


def console_lines(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """One case as the run prints it."""
    r0 = rows[0]
    head = f"{label(r0)}  [{_sizes(r0)}; bandwidth just before: {float(r0['bw_gbps']):.1f} GB/s]"
    return ["", head, *text_table(COLUMNS, provider_cells(rows))]


# --------------------------------------------------------------------------- current tables


def _case_key(r: Mapping[str, str]) -> tuple:
    return tuple(r[k] for k in (*SETUP_FIELDS, *CASE_FIELDS))


def latest(rows: Iterable[Mapping[str, str]]) -> list[list[Mapping[str, str]]]:
    """Per case (and setup), the providers' rows of the last run that measured it."""
    runs: dict[tuple, dict[str, list[Mapping[str, str]]]] = {}
    for r in rows:
        runs.setdefault(_case_key(r), {}).setdefault(r["date"], []).append(r)
    return [by_date[max(by_date)] for by_date in runs.values()]


def _order(case: list[Mapping[str, str]]) -> tuple:
    r = case[0]
    ops = list(FAMILIES)
    return (
        list(DTYPES).index(r["dtype"]) if r["dtype"] in DTYPES else len(DTYPES),
        ops.index(r["op"]) if r["op"] in ops else len(ops),
        int(r["m"] or 0),
        -int(r["conflict"]),
    )


def workload_table(workload: str, cases: Sequence[list[Mapping[str, str]]]) -> list[str]:
    """The current markdown table of one workload."""
    r0 = cases[0][0]
    work = WORKLOADS.get(workload)
    what = work.description if work else workload
    lines = [
        f"# bench_ops: {workload}",
        "",
        f"{what}: {r0['n_tensors']} tensors, {int(r0['numel']) / 1e6:.1f}M elements.",
        "",
        "The latest measurement of every case on this workload (per machine, device and "
        "thread count), rebuilt from the CSV history after each run of `python -m "
        "benchmarks.bench_ops` or of one op's `python -m benchmarks.bench_<op>`; earlier "
        "runs are in the CSV.",
        "",
        LEGEND,
        "",
    ]
    setups: dict[tuple, list[list[Mapping[str, str]]]] = {}
    for case in cases:
        setups.setdefault(tuple(case[0][k] for k in SETUP_FIELDS), []).append(case)
    for (machine, cores, device, threads), group in sorted(setups.items()):
        plural = "" if threads == "1" else "s"
        lines += [f"## {machine} ({cores} cores), {device}, {threads} torch thread{plural}", ""]
        for case in sorted(group, key=_order):
            r = case[0]
            lines += [
                f"### {label(r)}",
                "",
                f"{r['date']}, commit {r['commit']}, torch {r['torch']}, triton {r['triton']}, "
                f"load average {_load(r)}; {_sizes(r)}; bandwidth measured just before: "
                f"{float(r['bw_gbps']):.1f} GB/s",
                "",
                *markdown_table(COLUMNS, provider_cells(case)),
                "",
            ]
    return lines


def write_tables(csv_path: Path, md: str, workloads: Iterable[str]) -> list[Path]:
    """Rewrite the current tables of ``workloads`` from the CSV at ``csv_path``.

    ``md`` is a path; ``{workload}`` in it stands for the lower-cased workload name (one
    file per workload). Without it, the workloads share the one file, in turn.
    """
    cases = latest(read_csv(csv_path))
    texts: dict[Path, list[str]] = {}
    for w in dict.fromkeys(workloads):
        mine = [c for c in cases if c[0]["workload"] == w]
        if mine:
            path = Path(md.format(workload=w.lower()))
            texts.setdefault(path, []).extend(workload_table(w, mine))
    for path, lines in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return list(texts)


# --------------------------------------------------------------------------- targets


def target_report(rows: Sequence[Mapping[str, str]], backend: str = "cpp") -> list[str]:
    """Issue 2's targets on W1 project_conflicting_ with a conflict, per dtype."""
    out = []
    for name in ("fp32", "bf16"):
        by = {
            r["provider"]: float(r["median_ms"])
            for r in rows
            if r["workload"] == "W1"
            and r["op"] == "project_conflicting_"
            and r["conflict"] == "1"
            and r["dtype"] == name
        }
        if not by:
            continue
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
