"""``safegrad demo``: the SafeGrad paper's finding in miniature, on a CPU, offline.

A small Llama is aligned (cached), then fine-tuned with a fresh LoRA adapter on a
templated sentiment task poisoned with a fraction p of harmful prompt -> harmful
answer pairs, by each method (sft, mixed, safegrad, spf) over a sweep of p, of the
alignment weight and of seeds. Held-out prompts measure harmful compliance, refusal,
task accuracy and benign-instruction accuracy. See ``world`` for the toy world.

The CLI calls :func:`add_arguments` and :func:`run`; ``python -m safegrad_kernels.demo``
does the same.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

__all__ = ["add_arguments", "run", "start_line"]

# Quick mode (CI smoke test, ~1 minute): a smaller model and a few steps of everything.
# Its numbers mean nothing; it checks that every stage runs and every file is written.
QUICK = {
    "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
    "align": {"steps": 120, "batch_size": 32, "samples": 1200},
    "user": {"samples": 160, "epochs": 1},
    "eval": (8, 40, 40),
    "ratios": "0,0.3",
    "seeds": "0",
    "weights": "1.0",
}
EVAL_SIZES = (25, 150, 120)  # harmful prompts per template group, sentiment, benign
EVAL_SEED = 12_345
# For the start line's estimate, from the default run of 2026-11-30 (docs/demo/results.json:
# 745 s on an idle 2-core Xeon, one thread): user-stage ms per step by method, seconds per
# run of evaluation and set-up, and the alignment stage (600 steps). A smaller model
# (--quick) runs faster than this predicts; a busy machine slower.
_MS_PER_STEP = {"sft": 30.0, "mixed": 54.0, "safegrad": 57.0, "spf": 35.0}
_SECONDS_PER_RUN = 0.6
_ALIGN_MS_PER_STEP = 78.0

T = TypeVar("T", int, float)


def _comma_list(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse type: comma-separated values, each read by ``convert`` (empty ones skipped)."""

    def parse(text: str) -> list[T]:
        try:
            return [convert(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


_floats = _comma_list(float, "numbers")
_ints = _comma_list(int, "integers")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _methods(text: str) -> list[str]:
    from .train import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"methods must be from {', '.join(METHODS)}; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``safegrad demo`` and ``python -m safegrad_kernels.demo``)."""
    parser.add_argument(
        "--methods", type=_methods, default=None, help="comma list (default sft,mixed,safegrad,spf)"
    )
    parser.add_argument(
        "--ratios", type=_floats, default=None, help="harmful ratios p (default 0,0.1,0.2,0.3,0.5)"
    )
    parser.add_argument("--seeds", type=_ints, default=None, help="comma list (default 0,1,2)")
    parser.add_argument(
        "--rho", type=_floats, default=None, help="SafeGrad rho values (default 0.1,1.0)"
    )
    parser.add_argument(
        "--lam", type=_floats, default=None, help="mixed lambda values (default 0.1,1.0)"
    )
    parser.add_argument(
        "--alignment-every",
        type=_ints,
        default=None,
        metavar="K,...",
        help="SafeGrad alignment refresh periods to compare (e.g. 1,2,4,8): safegrad runs "
        "once per k on the same seeds, and the report gives HS/FA per k (default: k=1 only)",
    )
    parser.add_argument(
        "--alignment-batch-size", type=_positive, default=None, metavar="N",
        help="safety examples per step in every run (default: the task batch, 16)",
    )  # fmt: skip
    parser.add_argument(
        "--reference-top-k", type=_positive, default=None, metavar="K",
        help="keep the reference as a top-K store (the trainer's reference_top_k) in every run",
    )  # fmt: skip
    parser.add_argument(
        "--fused-loss", action="store_true",
        help="task CE and KL from the LM head's input (fused_losses) in every run",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("safegrad_demo_out"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (CI)")
    parser.add_argument(
        "--no-cache", action="store_true", help="rebuild the aligned model, write no cache"
    )
    # One thread by default: every op is tiny (batch 16 x ~25 tokens), so per-op overhead
    # dominates and a second thread buys little, while on a busy 2-core machine two
    # threads oversubscribed badly (the quick run: 359 s with 2 threads beside another
    # job, 14 s with 1).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument(
        "--safety-covers-poison",
        action="store_true",
        help="ablation: the defender's safety set also holds the poison-only templates",
    )


def _settings(args: argparse.Namespace) -> dict:
    from . import world
    from .model import ModelSpec
    from .train import METHODS, AlignSpec, UserSpec

    quick = args.quick
    mspec, aspec, uspec = ModelSpec(), AlignSpec(), UserSpec()
    if quick:
        mspec = replace(mspec, **QUICK["model"])
        aspec = replace(aspec, **QUICK["align"])
        uspec = replace(uspec, **QUICK["user"])
    if getattr(args, "safety_covers_poison", False):
        uspec = replace(uspec, safety_groups=(*world.ALIGNMENT_GROUPS, "poison"))
    weights = _floats(QUICK["weights"]) if quick else [0.1, 1.0]
    refresh = getattr(args, "alignment_every", None)
    if refresh is not None:
        from ..surgery import HYPERPARAMETERS

        refresh = [HYPERPARAMETERS["alignment_every"].validate(k) for k in refresh]
        if not refresh:
            raise ValueError("--alignment-every needs at least one k")
    # SafeGrad's other step-cost options, the same in every run (``safegrad study`` sweeps
    # them one at a time against the default recipe); user_stage checks the values.
    options = {
        "alignment_batch_size": getattr(args, "alignment_batch_size", None),
        "reference_top_k": getattr(args, "reference_top_k", None),
        "fused_loss": bool(getattr(args, "fused_loss", False)),
    }
    return {
        "methods": args.methods or list(METHODS),
        "ratios": args.ratios or (_floats(QUICK["ratios"]) if quick else [0.0, 0.1, 0.2, 0.3, 0.5]),
        "seeds": args.seeds or (_ints(QUICK["seeds"]) if quick else [0, 1, 2]),
        "rho": args.rho or weights,
        "lam": args.lam or weights,
        # None: no refresh sweep (every method at its default, labels without k).
        "alignment_every": refresh,
        "options": options,
        "model": mspec,
        "align": aspec,
        "user": uspec,
        "eval_sizes": QUICK["eval"] if quick else EVAL_SIZES,
    }


def _grid(s: dict) -> list[tuple[str, float | None, int | None, float, int]]:
    """(method, swept weight, alignment_every k or None, p, seed) of every run.

    The k sweep applies to the methods that have the setting (SafeGrad); each k runs on
    the same seeds (same data, same adapter init), so runs differ only in k.
    """
    from ..surgery import get_method
    from .train import swept

    runs = []
    for method in s["methods"]:
        name = swept(method)
        weights = s[name] if name is not None else [None]
        refresh = s.get("alignment_every")
        has_refresh = "alignment_every" in get_method(method).defaults
        periods = refresh if refresh is not None and has_refresh else [None]
        for weight in weights:
            for k in periods:
                for p in s["ratios"]:
                    for seed in s["seeds"]:
                        runs.append((method, weight, k, p, seed))
    return runs


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def start_line(s: dict, grid: list, steps_per_run: int, out: Path) -> str:
    """What is about to run, how long it should take, and where the results go."""
    user = sum(_MS_PER_STEP.get(method, 60.0) for method, *_ in grid) * steps_per_run / 1e3
    user += _SECONDS_PER_RUN * len(grid)
    align = _ALIGN_MS_PER_STEP * s["align"].steps / 1e3
    return (
        f"safegrad demo: {len(grid)} fine-tuning runs ({', '.join(s['methods'])}; p in "
        f"{', '.join(f'{p:g}' for p in s['ratios'])}; {len(s['seeds'])} seed(s)) of "
        f"{steps_per_run} steps each, after the aligned model (cached after the first run). "
        f"Expected: about {_duration(user)} (+{_duration(align)} to build the aligned model "
        f"the first time) on one idle CPU core; longer on a busy machine. Output: {out}/"
    )


def run(args: argparse.Namespace) -> dict:
    """Run the demo; write ``results.json``, ``report.md`` and ``plot.png`` to ``args.out``."""
    import torch
    from tqdm.auto import tqdm

    from . import evaluate, report, world
    from .train import aligned_state, user_stage, warm_up_ops

    started, cpu_started = time.perf_counter(), time.process_time()
    if args.threads is not None and args.threads > 0:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = world.WordTokenizer()
    quiet = getattr(args, "no_progress", False)
    grid = _grid(s)
    uspec = s["user"]
    steps_per_run = uspec.epochs * (uspec.samples // uspec.batch_size)
    print(start_line(s, grid, steps_per_run, out), flush=True)

    with tqdm(total=s["align"].steps, desc="alignment stage", disable=quiet) as bar:
        state, stage = aligned_state(
            tok, s["model"], s["align"], use_cache=not args.no_cache, progress=bar.update
        )
        if stage["cache"] == "hit":
            bar.set_postfix_str("cached")
    evals = world.eval_data(*s["eval_sizes"], seed=EVAL_SEED)
    base = _aligned_metrics(state, tok, s, evals)

    warm_up_ops()
    runs = []
    with tqdm(total=len(grid) * steps_per_run, desc="user stage", disable=quiet) as bar:
        for method, weight, k, p, seed in grid:
            name = report.label(method, weight, k)
            bar.set_postfix_str(f"{name} p={p:g} seed={seed}")
            model, log = user_stage(
                state, tok, s["model"], uspec, method=method, weight=weight or 0.0,
                harmful_ratio=p, seed=seed, alignment_every=k or 1, progress=bar.update,
                **s["options"],
            )  # fmt: skip
            metrics = evaluate.evaluate(model, tok, evals)
            runs.append(
                {"label": name, "method": method, "weight": weight, "harmful_ratio": p}
                | {"alignment_every": k, "seed": seed, **metrics, **log.summary()}
            )

    summary = report.summarize(runs)
    results = {
        "meta": _meta(args, s, time.perf_counter() - started, time.process_time() - cpu_started),
        "aligned": {"metrics": base, "stage": stage},
        "summary": summary,
        "runs": runs,
    }
    report.write_all(out, results)
    print(report.main_table(summary, markdown=False))
    for line in report.refresh_observations(runs):
        print(line)
    print(f"\naligned model: HS {100 * base['harmful_score']:.0f}%  FA "
          f"{100 * base['finetune_accuracy']:.0f}%  benign {100 * base['benign_accuracy']:.0f}%")  # fmt: skip
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'plot.png'} "
          f"in {results['meta']['runtime_s']:.0f} s")  # fmt: skip
    return results


def _aligned_metrics(state, tok, s: dict, evals) -> dict:
    from . import evaluate
    from .model import build_model

    model = build_model(s["model"], len(tok), s["align"].seed)
    model.load_state_dict(state)
    return evaluate.evaluate(model, tok, evals)


def _command(args: argparse.Namespace) -> str:
    """The options as given, in ``safegrad demo`` form (sys.argv differs by entry point)."""
    parts = ["safegrad", "demo"]
    for flag in ("methods", "ratios", "seeds", "rho", "lam", "alignment_every"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += [
                f"--{flag.replace('_', '-')}",
                ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value),
            ]
    for flag in ("alignment_batch_size", "reference_top_k"):
        if getattr(args, flag, None) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("quick", "no_cache", "safety_covers_poison", "fused_loss"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def _meta(args: argparse.Namespace, s: dict, runtime: float, cpu: float) -> dict:
    import peft
    import torch
    import transformers

    from .. import environment

    settings = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in s.items()}
    return {
        "command": _command(args),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": environment.machine_line(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "runtime_s": runtime,
        # CPU time of this process (all threads): with --threads 1 on a shared machine it
        # is the runtime the demo would have had with a core to itself.
        "cpu_s": cpu,
        # Other processes share the CPU in some environments (CI, a busy dev box):
        # the 1/5/15-minute load averages at the end put the timings in context.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "seeds": s["seeds"],
        "quick": bool(args.quick),
        "settings": settings,
    }
