"""The case model: which op, on which gradients, in which dtype, and what it must move.

An :class:`OpFamily` is one library op as the benchmarks see it (its ``bench_<op>``
module fills one in: byte count, candidates, correctness check); a :class:`Case` is one
op on one workload, dtype, list count ``m`` and conflict setting; a :class:`Row` is one
provider's measurement of one case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .harness import ELEMENT_BYTES, Candidate, Timing, dtype_name
from .providers import PairData, TaskData
from .workloads import Workload

PAIR = "pair"  # a gradient list and a reference list: PairData
TASKS = "tasks"  # m task-gradient lists: TaskData


@dataclass(frozen=True)
class OpFamily:
    """One op: how many bytes it must move, who computes it, how to check them."""

    op: str
    inputs: str  # PAIR or TASKS
    # Bytes of one list (N elements x e bytes), m, conflict -> bytes that must move.
    must_move: Callable[[int, int, bool], int]
    # (data, backends, providers, rho) -> the candidates to time.
    candidates: Callable[..., list[Candidate]]
    # (data) -> a float64 reference; (reference, data, provider, result, rho) -> (why, rel err).
    reference: Callable[..., object]
    check: Callable[..., tuple[str, float]]
    conflict_matters: bool = True  # False: the op does not branch on the sign (dot_norms)


@dataclass(frozen=True)
class Case:
    work: Workload
    dtype: torch.dtype
    family: OpFamily
    m: int  # 2 for the pair ops
    conflict: bool

    @property
    def op(self) -> str:
        return self.family.op

    @property
    def label(self) -> str:
        return case_label(
            self.work.name,
            dtype_name(self.dtype),
            self.op,
            self.m if self.family.inputs == TASKS else None,
            self.conflict if self.family.conflict_matters else None,
        )

    def bytes_moved(self) -> int:
        return self.family.must_move(
            self.work.numel * ELEMENT_BYTES[self.dtype], self.m, self.conflict
        )

    def memory_estimate(self, providers: Sequence[str]) -> int:
        """Peak bytes this case allocates (inputs, copies, the worst provider's temporaries)."""
        n, e = self.work.numel, ELEMENT_BYTES[self.dtype]
        if self.family.inputs == PAIR:
            base = (5 + (2 if "flat-gemm" in providers else 0)) * n * e
            transient = 2 * n * 4 if {"cat", "flat"} & set(providers) else n * 4
            return base + transient
        base = (2 * self.m + 2) * n * e
        transient = 3 * self.m * n * 4 if {"cat", "loop"} & set(providers) else n * 4
        return base + transient

    def build(self, device: torch.device, providers: Sequence[str]) -> PairData | TaskData:
        """The case's inputs, with the flat copies the providers work on."""
        if self.family.inputs == PAIR:
            gemm = "flat-gemm" in providers
            return PairData.build(self.work, self.dtype, device, conflict=self.conflict, gemm=gemm)
        return TaskData.build(self.work, self.m, self.dtype, device, conflict=self.conflict)


def case_label(
    workload: str, dtype: str, op: str, m: int | str | None, conflict: bool | None
) -> str:
    """``W1 fp32 pcgrad_ m=4 conflict``: ``m`` and ``conflict`` shown where they matter."""
    ms = f" m={m}" if m not in (None, "") else ""
    c = "" if conflict is None else (" conflict" if conflict else " no-conflict")
    return f"{workload} {dtype} {op}{ms}{c}"


@dataclass
class Row:
    """One provider's timing of one case."""

    case: Case
    provider: str  # with a trailing "!" if it disagreed with the float64 reference
    timing: Timing
    gbps: float
    pct_bw: float
    bw_gbps: float  # the streaming bandwidth measured just before the case
    rel_err: float = math.nan
