"""torchjd's ``jac_to_grad`` beside ours, on LoRA-shaped Jacobians.

    python -m benchmarks.bench_torchjd --threads 1          # W1/8, m = 2 and 4, fp32
    python -m benchmarks.bench_torchjd --workload W1        # the full 40M-element W1
    python -m benchmarks.bench_torchjd --aggregator upgrad  # needs torchjd[quadprog_projector]
    python -m benchmarks.bench_torchjd --tiny --no-save     # seconds; what the smoke test runs

Every parameter holds ``p.jac`` of shape ``[m, *p.shape]`` (what ``torchjd.autojac.backward``
leaves) and starts without ``.grad``; each provider turns the Jacobians into ``.grad``:

    torchjd          torchjd.autojac.jac_to_grad: concatenates every p.jac into one [m, N]
                     matrix, aggregates it, splits the result (torchjd's default)
    torchjd-gram     the same with optimize_gramian_computation=True: one Gram matrix and
                     one tensordot per tensor (torchjd's optimised path)
    ours-<backend>   safegrad_kernels.integrations.torchjd.jac_to_grad with our
                     device-side PCGradWeighting (random order from a generator): one
                     fused gram pass over the p.jac[j] views, one combine_ pass
    ours-<backend>+jd  ours with torchjd's own weighting (the weighting's cost isolated)

With ``--aggregator upgrad`` every provider uses torchjd's UPGrad weighting (we have no
device-side UPGrad). Before timing, every provider's ``.grad`` is compared with
torchjd's default path run in float64 under the same random orders ('rel err': largest
|error| relative to the largest entry). Times: median over interleaved repeats with cold caches (``harness``), spread
20th-80th percentile. Rows are appended to ``results/torchjd.csv`` (machine, versions,
commit, date, load) and this run's table is written to ``results/torchjd.md`` (the latest run; the CSV keeps them all).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    DTYPES,
    RESULTS_DIR,
    RUN_FIELDS,
    CacheFlusher,
    Candidate,
    Timing,
    add_threads_argument,
    append_csv,
    fmt_ms,
    provenance,
    run_header,
    time_interleaved,
)
from benchmarks.workloads import WORKLOADS, Workload, lora_shapes, tiny_workload

# W1's 448 tensors (Llama-2-7B, LoRA r=16 on q,k,v,o,gate,up,down) with every model
# dimension divided by 8: 5.0M elements, so that m = 4 Jacobians plus torchjd's
# concatenated copy fit a shared 2-core VM's cache-flushed timing loop in minutes.
_H, _I = 4096 // 8, 11008 // 8
W1_EIGHTH = Workload(
    "W1/8",
    "W1's 448 LoRA tensors, dimensions / 8",
    lora_shapes(32, [(_H, _H)] * 4 + [(_H, _I), (_H, _I), (_I, _H)], 16),
)
CSV_FIELDS = [
    *RUN_FIELDS,
    "torchjd",
    "workload",
    "n_tensors",
    "numel",
    "dtype",
    "m",
    "aggregator",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "repeats",
    "rel_err",
]


def make_params(work: Workload, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Parameters with conflicting ``.jac`` rows (alternating signs on a shared direction)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in work.shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        common = torch.randn(shape, generator=gen, device=device)
        rows = [
            torch.randn(shape, generator=gen, device=device).add_(common, alpha=0.5 * (-1) ** j)
            for j in range(m)
        ]
        p.jac = torch.stack(rows).to(dtype)
        params.append(p)
    return params


def torchjd_orders(seed: int, m: int) -> torch.Tensor:
    """The visiting orders torchjd's PCGradWeighting draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.stack([torch.randperm(m) for _ in range(m)])


def providers(
    aggregator: str, m: int, backends: Sequence[str], seed: int
) -> dict[str, tuple[Callable[[list], None], Callable[[list], None]]]:
    """name -> (timed call, the same computation with torchjd's orders for ``seed``)."""
    from torchjd.aggregation import PCGrad, UPGrad
    from torchjd.autojac import jac_to_grad as theirs

    from safegrad_kernels.integrations.torchjd import PCGradWeighting
    from safegrad_kernels.integrations.torchjd import jac_to_grad as ours

    make = PCGrad if aggregator == "pcgrad" else UPGrad
    jd_agg = make()

    def seeded(fn):
        def run(ps):
            torch.manual_seed(seed)
            fn(ps)

        return run

    def jd(ps):
        theirs(ps, jd_agg, retain_jac=True)

    def jd_gram(ps):
        theirs(ps, jd_agg, retain_jac=True, optimize_gramian_computation=True)

    table = {"torchjd": (jd, seeded(jd)), "torchjd-gram": (jd_gram, seeded(jd_gram))}
    for b in backends:
        if aggregator == "pcgrad":
            mine = PCGradWeighting(generator=torch.Generator().manual_seed(seed))
            fixed = PCGradWeighting(order=torchjd_orders(seed, m))
            table[f"ours-{b}"] = (
                lambda ps, w=mine, b=b: ours(ps, w, retain_jac=True, backend=b),
                lambda ps, w=fixed, b=b: ours(ps, w, retain_jac=True, backend=b),
            )

        def with_jd(ps, b=b):
            ours(ps, jd_agg, retain_jac=True, backend=b)

        table[f"ours-{b}+jd"] = (with_jd, seeded(with_jd))
    return table


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    scale = max(w.abs().max().item() for w in want)
    return max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want)) / scale


def run_case(work, m, dtype, device, aggregator, backends, *, repeats, flush):
    params = make_params(work, m, dtype, device)

    def reset():
        for p in params:
            p.grad = None

    table = providers(aggregator, m, backends, seed=1234)
    # The reference: torchjd's default path on float64 copies, under the same orders.
    wide = [torch.nn.Parameter(p.detach().double()) for p in params]
    for w, p in zip(wide, params):
        w.jac = p.jac.double()
    table["torchjd"][1](wide)
    reference = [w.grad for w in wide]
    del wide
    diffs = {}
    for name, (_, checked) in table.items():
        reset()
        checked(params)
        diffs[name] = rel_err([p.grad for p in params], reference)
    candidates = [
        Candidate(name, lambda fn=fn: fn(params), reset) for name, (fn, _) in table.items()
    ]
    timings = time_interleaved(candidates, device, repeats=repeats, flush=flush)
    return timings, diffs


def table_lines(label: str, timings: dict[str, Timing], diffs: dict[str, float]) -> list[str]:
    base = timings["torchjd-gram"].median_s
    lines = [
        f"## {label}",
        "",
        "| provider | median ms | p20-p80 ms | torchjd-gram / this | rel err | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in sorted(timings.items(), key=lambda kv: kv[1].median_s):
        lines.append(
            f"| {name} | {fmt_ms(t.median_s)} | {fmt_ms(t.quantile_s(0.2))}-"
            f"{fmt_ms(t.quantile_s(0.8))} | {base / t.median_s:.2f} | {diffs[name]:.1e} "
            f"| {len(t.samples_s)} |"
        )
    return [*lines, ""]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W1/8", help="W1/8 (default) or W1..W4")
    p.add_argument("--ms", default="2,4", help="comma list of objective counts")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--aggregator", default="pcgrad", choices=("pcgrad", "upgrad"))
    p.add_argument("--backends", default="", help="comma list; default cpp (if built), torch")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tiny", action="store_true", help="a tiny workload, seconds (smoke test)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--csv", default=str(RESULTS_DIR / "torchjd.csv"))
    p.add_argument("--md", default="", help="default: results/torchjd.md")
    add_threads_argument(p)
    return p.parse_args(argv)


def main(
    argv: Sequence[str] | None = None,
) -> dict[str, tuple[dict[str, Timing], dict[str, float]]]:
    """Per case label: each provider's timing and its relative error against float64."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchjd  # noqa: F401  (fail early and clearly when it is missing)

    import safegrad_kernels as sgk

    device = torch.device("cpu")
    prov = provenance(device)
    prov["torchjd"] = version("torchjd")
    backends = [b for b in args.backends.split(",") if b] or [
        b for b in ("cpp", "torch") if sgk.available_backends(device)[b][0]
    ]
    for b in backends:  # first use may JIT-compile the C++ extension: not in the timings
        sgk.gram([[torch.randn(5)]], backend=b)
    work = (
        tiny_workload()
        if args.tiny
        else (W1_EIGHTH if args.workload == "W1/8" else WORKLOADS[args.workload])
    )
    dtype = DTYPES[args.dtype]
    flush = CacheFlusher(device, 8 if args.tiny else 64)
    argv_str = "python -m benchmarks.bench_torchjd " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    header = run_header(prov, f"torchjd {prov['torchjd']}")
    print(f"# {header}")
    md = [
        "# bench_torchjd results",
        "",
        f"- {header}",
        f"- command: `{argv_str}`",
        f"- {work.name}: {work.description}, {work.n_tensors} tensors, "
        f"{work.numel / 1e6:.1f}M elements, {args.dtype}, aggregator {args.aggregator}",
        "- median over interleaved repeats, cold caches; 'rel err' = largest |error| of the "
        ".grad against torchjd's default path in float64 under the same orders, relative to "
        "its largest entry",
        "",
    ]
    results = {}
    t0 = time.perf_counter()
    for m in (int(x) for x in args.ms.split(",")):
        repeats = 3 if args.tiny else args.repeats
        timings, diffs = run_case(
            work, m, dtype, device, args.aggregator, backends, repeats=repeats, flush=flush
        )
        label = f"{work.name} {args.dtype} m={m} {args.aggregator}"
        lines = table_lines(label, timings, diffs)
        print("\n".join(lines))
        md += lines
        results[label] = (timings, diffs)
        if not args.no_save:
            case = {
                **prov,
                "workload": work.name,
                "n_tensors": work.n_tensors,
                "numel": work.numel,
                "dtype": args.dtype,
                "m": m,
                "aggregator": args.aggregator,
            }
            rows = [
                {
                    **case,
                    "provider": name,
                    "median_ms": f"{t.median_s * 1e3:.4f}",
                    "p20_ms": f"{t.quantile_s(0.2) * 1e3:.4f}",
                    "p80_ms": f"{t.quantile_s(0.8) * 1e3:.4f}",
                    "repeats": len(t.samples_s),
                    "rel_err": f"{diffs[name]:.2e}",
                }
                for name, t in timings.items()
            ]
            append_csv(Path(args.csv), CSV_FIELDS, rows)
    if not args.no_save:
        md_path = Path(args.md or RESULTS_DIR / "torchjd.md")
        md_path.write_text("\n".join(md) + "\n")
    print(f"# total {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
