"""Float64 references for a case, and the verdict on one provider's output.

A sanity check that each provider computes the op before it is timed, not a precision
test (tests/ does that): the measured error is reported in the tables as ``rel err``.
Each check returns ``(why, rel_err)``: ``why`` is ``""`` when the output matches, else a
short reason; ``rel_err`` is the provider's largest relative error on the reduced sums
(pair ops), the Gram matrix (relative to its largest entry) or the sampled aggregate
(pcgrad_), NaN where not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import providers as P
from .cases import Case
from .providers import PairData, TaskData

# On the reduced sums and the Gram matrix.
SUM_TOL = 1e-2


def _close(x: Tensor, ref: Tensor, dtype: torch.dtype) -> bool:
    # An fp32 sgemm with k = 40M (the flat-gemm provider, torch.cat + matmul Gram
    # matrices) is off by ~2e-3 relative: the tolerance only has to catch a wrong op.
    rtol, atol = (5e-3, 5e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    return bool(((x.double() - ref).abs() <= atol + rtol * ref.abs()).all())


def _sample(n: int) -> list[int]:
    """The tensors compared element by element: both ends and the middle."""
    return sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))


# --------------------------------------------------------------------------- pair ops


@dataclass
class PairReference:
    sums: Tensor  # float64 [<g, r>, ||r||^2, ||g||^2]
    c: float  # the projection coefficient <g, r> / ||r||^2 where they conflict, else 0


def pair_reference(data: PairData) -> PairReference:
    sums = torch.zeros(3, dtype=torch.float64)
    for g, r in zip(data.grads, data.refs):
        g64, r64 = g.double().reshape(-1), r.double().reshape(-1)
        sums += torch.stack([g64 @ r64, r64 @ r64, g64 @ g64]).cpu()
    dot, rr = float(sums[0]), float(sums[1])
    return PairReference(sums, dot / rr if dot < 0 and rr > P.EPS else 0.0)


def check_sums(
    ref: PairReference, data: PairData, provider: str, result: object, rho: float
) -> tuple[str, float]:
    """``<g, r>`` and ``||r||^2``: the first two entries of every pair provider's result."""
    if not isinstance(result, Tensor):
        return "", math.nan
    got = result.reshape(-1)[:2].double().cpu()
    want = ref.sums[:2]
    err = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
    return ("" if err <= SUM_TOL else f"sums {got.tolist()} vs {want.tolist()}"), err


def check_projection(
    ref: PairReference, data: PairData, provider: str, result: object, rho: float
) -> tuple[str, float]:
    """The sums, then sampled gradients against ``g - c r + rho r`` in float64."""
    why, err = check_sums(ref, data, provider, result, rho)
    if why:
        return why, err
    outs = data.written(provider)
    pristine = P._split_views(data.pristine, data.grads)
    for i in _sample(len(data.grads)):
        r64 = data.refs[i].double()
        want = pristine[i].double() - ref.c * r64 + rho * r64
        if not _close(outs[i], want, data.grads[i].dtype):
            return f"grads[{i}] differs after the update", err
    return "", err


# --------------------------------------------------------------------------- task ops


@dataclass
class TaskReference:
    gram: Tensor  # float64 [m, m]
    weights: list[float]  # PCGrad's aggregate weights for ``data.order``


def task_reference(data: TaskData) -> TaskReference:
    m = len(data.lists)
    gram = torch.zeros(m, m, dtype=torch.float64)
    for ts in zip(*data.lists):
        x = torch.stack([t.reshape(-1).double() for t in ts])
        gram += (x @ x.T).cpu()
    return TaskReference(gram, P.pcgrad_weights_host(gram, data.order))


def check_gram(
    ref: TaskReference, data: TaskData, provider: str, result: object, rho: float
) -> tuple[str, float]:
    assert isinstance(result, Tensor)
    err = float((result.double().cpu() - ref.gram).abs().max() / ref.gram.abs().max())
    return ("" if err <= SUM_TOL else "gram differs"), err


def check_pcgrad(
    ref: TaskReference, data: TaskData, provider: str, result: object, rho: float
) -> tuple[str, float]:
    """Sampled tensors of the aggregate ``sum_j w_j g_j`` (torchjd: random order by design)."""
    if provider == "torchjd":
        return "", math.nan
    outs = data.written(provider)
    firsts = P._split_views(data.pristine0, data.lists[0])
    err = 0.0
    for i in _sample(len(firsts)):
        want = ref.weights[0] * firsts[i].double()
        for j in range(1, len(data.lists)):
            want = want + ref.weights[j] * data.lists[j][i].double()
        if want.numel():
            err = max(err, float((outs[i].double() - want).abs().max() / want.abs().max()))
        if not _close(outs[i], want, firsts[i].dtype):
            return f"aggregate[{i}] differs", err
    return "", err


class Checker:
    """The reference for one case, and the verdict on a provider's output."""

    def __init__(self, case: Case, data: PairData | TaskData) -> None:
        self.case = case
        self.data = data
        self.reference = case.family.reference(data)
        self.rel_err = math.nan

    def verify(self, provider: str, result: object, rho: float) -> str:
        """``""`` if the output matches the float64 reference; sets ``self.rel_err``."""
        why, self.rel_err = self.case.family.check(self.reference, self.data, provider, result, rho)
        return why
