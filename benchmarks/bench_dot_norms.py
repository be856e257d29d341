"""dot_norms: ``<g, r>``, ``||r||^2`` and ``||g||^2`` over a list pair in one read.

    python -m benchmarks.bench_dot_norms --quick    # W1, fp32 + bf16 (bench_ops's flags)

Must move 2N e bytes (read g and r once; N elements per list, e bytes per element).
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
    return 2 * list_bytes


def candidates(
    data: P.PairData, backends: Sequence[str], providers: Sequence[str], rho: float
) -> list[Candidate]:
    g, r = data.grads, data.refs
    baselines = {
        "loop": Candidate("loop", lambda: P.dot_norms_loop(g, r)),
        "cat": Candidate("cat", lambda: P.dot_norms_cat(g, r)),
        "eager": Candidate("eager", lambda: P.dot_norms_eager(g, r)),
        "flat": Candidate("flat", lambda: P.dot_norms_flat(data.g_flat, data.r_flat)),
    }
    if data.x2 is not None:
        baselines["flat-gemm"] = Candidate("flat-gemm", lambda: P.dot_norms_flat_gemm(data.x2))
    return P.assemble("dot_norms", (g, r), {}, baselines, backends, providers)


FAMILY = OpFamily(
    "dot_norms",
    PAIR,
    must_move,
    candidates,
    check.pair_reference,
    check.check_sums,
    conflict_matters=False,
)

if __name__ == "__main__":
    from benchmarks.bench_ops import main

    main(ops=(FAMILY.op,))
