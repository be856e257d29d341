"""Per-step surgery statistics that stay on the device until asked.

A training loop gets one of these from every ``step()``. Building it launches a few
tiny device kernels but never waits for them; the host reads values only in
``to_dict()`` (one transfer for all scalars: the explicit sync point, meant for
logging steps) or when the caller converts a field itself (``float(stats.cosine)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["PCGradStats", "SPFStats", "SafeGradStats", "SurgeryStats"]


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (device-side, no branch)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


class SurgeryStats:
    """Base: subclasses list their loggable 0-d tensors in ``scalars()``."""

    def scalars(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, float]:
        """Every scalar as a Python float: one device-to-host transfer (a host sync)."""
        items = self.scalars()
        if not items:
            return {}
        flat = torch.stack([v.detach().reshape(()).to(torch.float32) for v in items.values()])
        return dict(zip(items, flat.tolist()))


@dataclass(frozen=True, eq=False)
class SafeGradStats(SurgeryStats):
    """What one ``SafeGrad.step()`` saw and did.

    Scalars describe the whole flattened gradients before the update, in both
    granularities: ``dot = <g_u, g_a>``, ``ref_norm_sq = ||g_a||^2``,
    ``grad_norm_sq = ||g_u||^2``, ``cosine`` (0 when a norm is 0).
    ``coef`` and ``conflict`` describe what was applied: 0-d in ``"global"`` mode;
    ``[n]`` per parameter (in ``surgeon.params`` order) in ``"per_tensor"`` mode, where
    ``rows`` is the ``[n, 4]`` table ``[dot, ref_norm_sq, grad_norm_sq, coef]``.
    The update was ``g_u <- g_u - coef * g_a + rho * g_a``; ``conflict`` is where
    ``coef != 0`` was used (``dot < 0``, ``||g_a||^2 > eps``, all sums finite).
    ``cosine`` and ``conflict`` are derived on first access (a step that nobody logs
    launches no kernel for them: issue 14's host budget).
    """

    dot: Tensor
    ref_norm_sq: Tensor
    grad_norm_sq: Tensor
    coef: Tensor
    rows: Tensor | None = None

    @cached_property
    def cosine(self) -> Tensor:
        return safe_div(self.dot, (self.ref_norm_sq * self.grad_norm_sq).sqrt())

    @cached_property
    def conflict(self) -> Tensor:
        # The op sets coef = dot / ||r||^2 < 0 exactly where it projects and 0
        # elsewhere, so this is its rule (dot < 0, ||r||^2 > eps, finite sums) in one op.
        return self.coef != 0

    def scalars(self) -> dict[str, Tensor]:
        # per_tensor: the mean coefficient and the fraction of tensors in conflict.
        return {
            "dot": self.dot,
            "ref_norm_sq": self.ref_norm_sq,
            "grad_norm_sq": self.grad_norm_sq,
            "cosine": self.cosine,
            "coef": self.coef.float().mean() if self.coef.ndim else self.coef,
            "conflict": self.conflict.float().mean(),
        }


@dataclass(frozen=True, eq=False)
class PCGradStats(SurgeryStats):
    """What one ``PCGrad.step()`` saw and did.

    ``gram`` is the float32 ``[m, m]`` Gram matrix of the objectives' gradients before
    the update; ``weights`` the ``[m]`` combination written into ``p.grad``
    (``sum_j weights[j] * g_j``); ``cosine`` the ``[m, m]`` cosine matrix and
    ``conflict`` the ``[m, m]`` bool matrix of pairs with a negative inner product.
    """

    gram: Tensor
    weights: Tensor
    cosine: Tensor
    conflict: Tensor

    def scalars(self) -> dict[str, Tensor]:
        m = self.gram.shape[0]
        out = {f"weight_{j}": self.weights[j] for j in range(m)}
        if m > 1:
            off = ~torch.eye(m, dtype=torch.bool, device=self.gram.device)
            # Masks, not boolean indexing: indexing would size its output on the host.
            out["conflict_rate"] = (self.conflict & off).sum() / (m * (m - 1))
            out["min_cosine"] = torch.where(off, self.cosine, torch.inf).min()
        return out


@dataclass(frozen=True, eq=False)
class SPFStats(SurgeryStats):
    """What one ``SPF.step()`` saw and did, per weight matrix (``SPF.matrices`` order).

    ``score`` is ``<P, S>`` (task gradient's projection onto the safety subspace, with
    the stored safety gradient), ``applied`` whether ``P`` was subtracted,
    ``removed_norm_sq`` ``||P||^2`` where applied (else 0), ``grad_norm_sq`` ``||G||^2``
    before the update. Matrices without a task gradient this step show zeros.
    ``refreshed`` (host bool) says whether the basis was recomputed in this step.
    """

    score: Tensor
    applied: Tensor
    removed_norm_sq: Tensor
    grad_norm_sq: Tensor
    refreshed: bool = False

    def scalars(self) -> dict[str, Tensor]:
        return {
            "applied_fraction": self.applied.float().mean(),
            "conflict_fraction": (self.score < 0).float().mean(),
            "removed_energy": safe_div(self.removed_norm_sq.sum(), self.grad_norm_sq.sum()),
        }

    def to_dict(self) -> dict[str, float]:
        return {**super().to_dict(), "refreshed": float(self.refreshed)}
