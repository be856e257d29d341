"""project_conflicting_: ``g <- g - c r + rho r`` with ``c = <g, r> / ||r||^2`` where they conflict.

    python -m benchmarks.bench_project --quick      # W1, fp32 + bf16 (bench_ops's flags)

Must move 5N e bytes with a conflict (pass 1 reads g and r; pass 2 reads g, r and writes
g) and 2N e without one (coefficient 0 and rho 0: pass 2 skips).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import check
from benchmarks import providers as P
from benchmarks.cases import PAIR, OpFamily
from benchmarks.harness import Candidate


def must_move(list_bytes: int, m: int, conflict: bool) -> int:
    return (5 if conflict else 2) * list_bytes


def candidates(
    data: P.PairData, backends: Sequence[str], providers: Sequence[str], rho: float
) -> list[Candidate]:
    g, r, restore = data.grads, data.refs, data.restore_lists
    baselines = {
        "loop": Candidate("loop", lambda: P.project_loop(g, r, rho), restore),
        "cat": Candidate("cat", lambda: P.project_cat(g, r, rho), restore),
        "eager": Candidate("eager", lambda: P.project_eager(g, r, rho), restore),
        "flat": Candidate(
            "flat", lambda: P.project_flat(data.g_flat, data.r_flat, rho), data.restore_flat
        ),
    }
    if data.x2 is not None:
        baselines["flat-gemm"] = Candidate(
            "flat-gemm", lambda: P.project_flat_gemm(data.x2, rho), data.restore_x2
        )
    return P.assemble(
        "project_conflicting_", (g, r), {"rho": rho}, baselines, backends, providers, restore
    )


FAMILY = OpFamily(
    "project_conflicting_",
    PAIR,
    must_move,
    candidates,
    check.pair_reference,
    check.check_projection,
)

if __name__ == "__main__":
    from benchmarks.bench_ops import main

    main(ops=(FAMILY.op,))
