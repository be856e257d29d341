"""Peak host memory and time: the fused linear losses vs their logits-path twins.

Usage: python -m benchmarks.kl_fused_memory [--vocab 128256 --hidden 256 --batch 2 --seq 256]

Each variant runs in a fresh subprocess: inputs (hidden states with grad, a frozen LM head,
reference hidden states, labels with the first ``--prompt`` of each row masked) are built,
the peak RSS is reset (``/proc/self/clear_refs``), then one forward + backward of the loss
runs, logits (and the reference logits) included. Peak = VmHWM minus the RSS at the reset:
the memory the loss needs on top of its inputs. tracemalloc cannot do this: torch's CPU
allocator bypasses Python's (a 4 MB tensor shows as 80 bytes). Time: median and 20th-80th
percentile of ``--repeats`` further forward + backward calls in the same process.

Results: a table on stdout, rows appended to results/kl_fused_memory.csv with provenance,
the latest table in results/kl_fused_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import DTYPES, RESULTS_DIR, append_csv, provenance
from benchmarks.memory import measure_peak_rss, run_workers

# variant -> the logits-path twin its memory is compared with
VARIANTS = {
    "kl logits": "kl logits",
    "kl fused (ref hidden)": "kl logits",
    "kl fused (top-64 store)": "kl logits",
    "kl logits (top-64 store)": "kl logits",
    "ce logits": "ce logits",
    "ce fused": "ce logits",
}


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _loss_fn(variant: str, args: argparse.Namespace):
    """Inputs and a closure running one forward + backward; everything it allocates counts."""
    from safegrad_kernels.fused_losses import (
        fused_linear_cross_entropy,
        fused_linear_kl,
        kl_from_reference,
    )
    from safegrad_kernels.losses import kl_alignment_loss, response_ce, response_token_count
    from safegrad_kernels.reference_store import ReferenceStore

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    b, t, h, v = args.batch, args.seq, args.hidden, args.vocab
    hidden = torch.randn(b, t, h, dtype=dtype).requires_grad_()
    # Logits of std 4: entropy ~ log V - 16/2 = 3.8 nats at V = 128,256, nearer a language
    # model's next-token distributions than std 1 (11.3 nats, near uniform: no top-k can
    # summarise it). The top-64 store still leaves ~0.3 of the mass in the tail here.
    weight = (torch.randn(v, h) * 4 / h**0.5).to(dtype).requires_grad_(args.head_grad)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(b, t, h)).to(dtype)
    labels = torch.randint(0, v, (b, t))
    labels[:, : int(t * args.prompt)] = -100
    count = response_token_count(labels)
    store = None
    if "store" in variant:
        store = ReferenceStore.build(
            lambda batch: (ref_hidden, weight.detach(), None),
            [(list(range(b)), {"labels": labels})],
            top_k=64,
        ).get(range(b))
    budget = args.budget
    tail = None if store is None else float(store.tail_logmass.exp().mean())

    def step() -> float:
        hidden.grad = None
        weight.grad = None
        if variant == "kl logits":
            with torch.no_grad():
                ref = F.linear(ref_hidden, weight)
            loss = kl_alignment_loss(F.linear(hidden, weight), ref, labels)
        elif variant == "kl logits (top-64 store)":
            loss = kl_from_reference(F.linear(hidden, weight), store, labels, memory_budget=budget)
        elif variant == "kl fused (ref hidden)":
            loss = fused_linear_kl(hidden, weight, labels, ref_hidden, memory_budget=budget)
        elif variant == "kl fused (top-64 store)":
            loss = fused_linear_kl(hidden, weight, labels, store, memory_budget=budget)
        elif variant == "ce logits":
            loss = response_ce(F.linear(hidden, weight), labels, num_items_in_batch=count)
        elif variant == "ce fused":
            loss = fused_linear_cross_entropy(hidden, weight, labels, memory_budget=budget)
        else:
            raise ValueError(variant)
        loss.backward()
        return float(loss)

    return step, tail


def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    step, tail = _loss_fn(variant, args)
    loss, peak = measure_peak_rss(step)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return {
        "variant": variant,
        "peak_mib": round(peak, 1),
        "ms_median": round(1e3 * statistics.median(samples), 2),
        "ms_p20": round(1e3 * q[0], 2),
        "ms_p80": round(1e3 * q[-1], 2),
        "loss": loss,
        "tail_mass": "" if tail is None else round(tail, 5),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--prompt", type=float, default=0.5, help="masked fraction of each row")
    p.add_argument("--head-grad", action="store_true", help="the LM head trains too")
    p.add_argument("--budget", type=int, default=None, help="memory_budget bytes (default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    # An empty value writes no file (Path("") would be the current directory).
    p.add_argument(
        "--csv", type=_optional_path, default=RESULTS_DIR / "kl_fused_memory.csv",
        help="history CSV to append to ('' : none)",
    )  # fmt: skip
    p.add_argument(
        "--md", type=_optional_path, default=RESULTS_DIR / "kl_fused_memory.md",
        help="current table ('' : none)",
    )  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_run_variant(args.worker, args)))
        return []
    rows = run_workers("benchmarks.kl_fused_memory", argv, args.variants.split(","))
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        twin = by_name.get(VARIANTS[r["variant"]])
        r["peak_vs_twin"] = round(r["peak_mib"] / twin["peak_mib"], 3) if twin else ""
        r["ms_vs_twin"] = round(r["ms_median"] / twin["ms_median"], 3) if twin else ""

    b, t, v, h = args.batch, args.seq, args.vocab, args.hidden
    logits_mib = b * t * v * torch.empty(0, dtype=DTYPES[args.dtype]).element_size() / 2**20
    info = provenance(torch.device("cpu"))
    info["threads"] = str(args.threads)
    head = (
        f"{b} x {t} tokens ({args.prompt:.0%} prompt), hidden {h}, vocab {v}, {args.dtype}, "
        f"head {'trains' if args.head_grad else 'frozen'}; one logits tensor = "
        f"{logits_mib:.0f} MiB. {info['date']}, {info['machine']}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the end."
    )
    lines = [
        head,
        "",
        "| variant | peak MiB above inputs | x twin | ms median [p20, p80] | x twin | loss "
        "| ref tail mass |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['peak_vs_twin']} | "
            f"{r['ms_median']:.1f} [{r['ms_p20']:.1f}, {r['ms_p80']:.1f}] | {r['ms_vs_twin']} | "
            f"{r['loss']:.6f} | {r['tail_mass']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    if args.csv:
        case = {
            "batch": b,
            "seq": t,
            "hidden": h,
            "vocab": v,
            "dtype": args.dtype,
            "prompt": args.prompt,
            "head_grad": args.head_grad,
            "budget": args.budget,
        }
        fields = [
            "variant",
            "peak_mib",
            "peak_vs_twin",
            "ms_median",
            "ms_p20",
            "ms_p80",
            "ms_vs_twin",
            "loss",
            "tail_mass",
            *case,
            *info,
        ]
        append_csv(args.csv, fields, [{**r, **case, **info} for r in rows])
    return rows


if __name__ == "__main__":
    main()
