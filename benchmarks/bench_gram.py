"""gram: the ``m x m`` matrix of inner products between m gradient lists.

    python -m benchmarks.bench_gram --workloads W1 --ms 2,4    # bench_ops's flags

Must move mN e bytes (every list read once; N elements per list, e bytes per element).
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
    return m * list_bytes


def candidates(
    data: P.TaskData, backends: Sequence[str], providers: Sequence[str], rho: float
) -> list[Candidate]:
    lists = data.lists
    baselines = {
        "loop": Candidate("loop", lambda: P.gram_loop(lists)),
        "cat": Candidate("cat", lambda: P.gram_cat(lists)),
        "eager": Candidate("eager", lambda: P.gram_eager(lists)),
        "flat": Candidate("flat", lambda: P.gram_flat(data.x)),
    }
    return P.assemble("gram", (lists,), {}, baselines, backends, providers)


FAMILY = OpFamily("gram", TASKS, must_move, candidates, check.task_reference, check.check_gram)

if __name__ == "__main__":
    from benchmarks.bench_ops import main

    main(ops=(FAMILY.op,))
