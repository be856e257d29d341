"""Time vs gradient-set size per provider, from ``benchmarks/results/ops.csv``.

    python -m benchmarks.plot                       # latest run in the CSV
    python -m benchmarks.plot --run 2026-11-22T08:10:00Z --out my.png
    python -m benchmarks.plot --ops project_conflicting_ --m 2

One panel per (op, dtype); x = elements per list (the workloads' sizes), y = median
time (log-log), one line per provider, error bars = the 20-80 % spread. The workloads
differ in tensor count as well as size (W4 is 5000 tiny tensors), so the points are
labelled with the workload name.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import RESULTS_DIR

STYLE = {  # stable colours per provider across plots
    "cpp": "tab:red",
    "triton": "tab:purple",
    "torch": "tab:brown",
    "loop": "tab:gray",
    "cat": "tab:orange",
    "eager": "tab:blue",
    "flat": "tab:green",
    "flat-gemm": "tab:olive",
    "torchjd": "tab:cyan",
}


def load(path: Path, run: str | None) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    if run is None:
        run = max(r["date"] for r in rows)
    picked = [r for r in rows if r["date"] == run]
    if not picked:
        raise SystemExit(f"no rows with date {run} in {path}")
    return picked


def plot(rows: Sequence[dict], out: Path, ops: Sequence[str] | None, m: str, conflict: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def keep(r: dict) -> bool:
        if ops and r["op"] not in ops:
            return False
        if r["op"] in ("gram", "pcgrad_") and r["m"] != m:
            return False
        return r["op"] == "dot_norms" or r["conflict"] == conflict

    rows = [r for r in rows if keep(r)]
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["dtype"])].append(r)
    if not panels:
        raise SystemExit("nothing to plot with these filters")
    keys = sorted(panels)
    ncols = 2
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        by_provider: dict[str, list[dict]] = defaultdict(list)
        for r in panels[key]:
            by_provider[r["provider"]].append(r)
        for prov, rs in sorted(by_provider.items()):
            rs.sort(key=lambda r: int(r["numel"]))
            x = [int(r["numel"]) for r in rs]
            y = [float(r["median_ms"]) for r in rs]
            lo = [yy - float(r["p20_ms"]) for yy, r in zip(y, rs)]
            hi = [float(r["p80_ms"]) - yy for yy, r in zip(y, rs)]
            ax.errorbar(
                x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=prov, color=STYLE.get(prov)
            )
        for r in panels[key]:
            if r["provider"] == "flat":
                ax.annotate(
                    r["workload"],
                    (int(r["numel"]), float(r["median_ms"])),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
        op, dtype = key
        extra = f", m={m}" if op in ("gram", "pcgrad_") else ""
        extra += "" if op == "dot_norms" else (", conflict" if conflict == "1" else ", no conflict")
        ax.set_title(f"{op} {dtype}{extra}", fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements per list")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    r0 = rows[0]
    fig.suptitle(
        f"{r0['machine']} ({r0['cores']} cores), torch {r0['torch']}, {r0['date']}", fontsize=10
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=str(RESULTS_DIR / "ops.csv"))
    p.add_argument("--run", default=None, help="the 'date' column of the run (default: latest)")
    p.add_argument("--ops", default="", help="comma list (default: all)")
    p.add_argument("--m", default="2", help="m for gram/pcgrad_ panels")
    p.add_argument("--conflict", choices=("1", "0"), default="1")
    p.add_argument("--out", default=str(RESULTS_DIR / "ops_time_vs_size.png"))
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o] or None
    plot(load(Path(args.csv), args.run), Path(args.out), ops, args.m, args.conflict)


if __name__ == "__main__":
    main()
