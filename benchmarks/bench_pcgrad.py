"""pcgrad_: PCGrad's aggregate of m task lists, written into ``lists[0]`` (a Gram pass, then a combine pass).

    python -m benchmarks.bench_pcgrad --workloads W4 --ms 8    # bench_ops's flags

Must move (2m+1)N e bytes (the Gram pass reads m lists; the combine pass reads them
again and writes lists[0]).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import check
from benchmarks import providers as P
from benchmarks.cases import TASKS, OpFamily
from benchmarks.harness import Candidate


def must_move(list_bytes: int, m: int, conflict: bool) -> int:
    return (2 * m + 1) * list_bytes


def candidates(
    data: P.TaskData, backends: Sequence[str], providers: Sequence[str], rho: float
) -> list[Candidate]:
    lists, order, restore = data.lists, data.order, data.restore_lists
    baselines = {
        "loop": Candidate("loop", lambda: P.pcgrad_loop(lists, order), restore),
        "cat": Candidate("cat", lambda: P.pcgrad_cat(lists, order), restore),
        "eager": Candidate("eager", lambda: P.pcgrad_eager(lists, order), restore),
        "flat": Candidate("flat", lambda: P.pcgrad_flat(data.x, data.out_flat, order)),
    }
    agg = P.torchjd_pcgrad()
    if agg is not None:
        baselines["torchjd"] = Candidate("torchjd", lambda: agg(data.x))
    return P.assemble(
        "pcgrad_", (lists,), {"order": order}, baselines, backends, providers, restore
    )


FAMILY = OpFamily("pcgrad_", TASKS, must_move, candidates, check.task_reference, check.check_pcgrad)

if __name__ == "__main__":
    from benchmarks.bench_ops import main

    main(ops=(FAMILY.op,))
