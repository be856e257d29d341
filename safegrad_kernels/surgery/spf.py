"""SPF (arXiv 2601.10141): remove the task gradient's component in a low-rank safety subspace.

The paper publishes no code; this follows the reconstruction in BACKGROUND.md. Per
weight matrix ``W`` with safety gradient ``S`` and task gradient ``G``::

    U_k = top-k singular vectors of S (on one side, see below)
    P   = U_k U_k^T G      (G's component in span(U_k))
    G  <- G - P            if mode == "always" or <P, S> < 0

Which side. A ``[out, in]`` matrix has left singular vectors in ``R^out`` and right
ones in ``R^in``; we project on the *larger* side: ``P = U_k U_k^T G`` for tall or
square matrices (out >= in, basis in ``R^out``) and ``P = G V_k V_k^T`` for wide ones
(basis in ``R^in``). The removed subspace then holds ``k / max(out, in)`` of that
side's directions, the least of the two one-sided choices. On the smaller side a
rank-k basis is most or all of the space: for LoRA ``A`` (``[r, in]``, wide) and
``B`` (``[out, r]``, tall) with r = 8, the r side is only 8-dimensional, and k = 8
there would make ``P = G`` ("always" would zero the gradient). The larger side
keeps the removal targeted: k of the 4096 input directions for ``A``, k of the output
directions for ``B``. Either side gives ``<P, S> = <G, S_k>`` with ``S_k`` the rank-k
truncation of ``S``, so the conflict test asks whether G opposes the dominant safety
directions. ``k`` is capped at ``min(out, in)``, the rank ``S`` can have.

Parameters with more than two dims are viewed as ``[shape[0], prod(shape[1:])]``.
1-D parameters (biases, norm scales) are skipped, their gradients left as they are:
the low-rank finding concerns weight matrices, and a vector has no subspace to keep.

Cost. Matrices of one shape and dtype are stacked and handled with batched matmuls
(one ``bmm`` pair per shape group, not a Python loop per matrix). The basis and the
coordinates of ``S`` in it (``U_k^T S``, k x small) are kept between refreshes,
``k (out + in)`` numbers per matrix instead of a copy of ``S``. Singular directions
with (relatively) zero singular value are dropped, so a zero or rank-deficient ``S``
(e.g. a KL loss at step 0 of LoRA training) removes nothing it does not span.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import gather_whole, write_local_piece
from ..ops import dot_norms
from ..ops.validate import SUPPORTED_DTYPES
from .base import Surgeon, check_backend, check_choice, check_int
from .stats import SPFStats

__all__ = ["SPF"]

MODES = ("conflicting", "always")
SVD_METHODS = ("auto", "exact", "randomized")
# "auto" uses the exact batched SVD while the small side is at most this: LoRA factors
# (r <= 64) always qualify; full 4096 x 4096 weights go randomized, whose cost is
# O(out * in * (k + oversample)) per power iteration instead of O(out * in * min(out, in)).
EXACT_SVD_MAX_DIM = 256


@dataclass
class _Group:
    """Matrices sharing (tall shape, dtype, side); ``members`` index ``SPF.params``."""

    members: list[int]
    big: int
    small: int
    transposed: bool  # wide matrix: work on G^T so the basis lives on the larger side
    rank: int
    dtype: torch.dtype  # compute dtype
    basis: Tensor | None = None  # [b, big, rank], orthonormal or zero columns
    coords: Tensor | None = None  # [b, rank, small] = basis^T S
    nonempty: Tensor | None = None  # [b] bool: the basis has at least one direction


def _layout(g: _Group) -> tuple[int, int, bool, int, int]:
    return (g.big, g.small, g.transposed, len(g.members), g.rank)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _tall(t: Tensor, transposed: bool) -> Tensor:
    """The ``[big, small]`` view of a gradient (a view: writes land in the gradient).

    ``view`` rather than ``reshape``: a copy would silently drop the update, so a
    gradient that cannot be viewed as ``[shape[0], -1]`` (e.g. a channels-last 4-D
    weight) raises instead.
    """
    m = t.view(t.shape[0], -1)
    return m.T if transposed else m


def _op_ready(t: Tensor) -> Tensor:
    """``t`` as the fused ops read it: dense float32/bfloat16/float16 (else a float32 copy)."""
    if t.dtype in SUPPORTED_DTYPES and t.is_contiguous():
        return t
    return t.to(torch.float32, memory_format=torch.contiguous_format)


def _rows(t: Tensor, ks: list[int], b: int) -> Tensor:
    return t if len(ks) == b else torch.stack([t[k] for k in ks])


def _spread(vals: Tensor, ks: list[int], b: int) -> Tensor:
    """Per-member values for the present members ``ks``, zeros for the rest."""
    if len(ks) == b:
        return vals
    full = [vals.new_zeros(())] * b
    for pos, k in enumerate(ks):
        full[k] = vals[pos]
    return torch.stack(full)


class SPF(Surgeon):
    """Safety-subspace projection of the task gradient, called once per optimizer step.

    Usage::

        spf = SPF(trainable_params, rank=8, refresh_every=100)
        if spf.wants_reference:                 # host-side bool: no sync
            with spf.reference():
                safety_loss.backward()          # S, accumulates like p.grad
        task_loss.backward()                    # G in p.grad
        stats = spf.step()                      # p.grad <- G - P where due; no host sync
        optimizer.step(); optimizer.zero_grad()

    Args:
        params: trainable parameters (any floating dtype, one device).
        rank: k >= 1, the safety subspace's dimension per matrix (capped at min(out, in)).
        refresh_every: recompute the basis every this many steps; ``None`` computes it
            once, at the first step that has a reference gradient.
        mode: ``"conflicting"`` removes ``P`` only from matrices where ``<P, S> < 0``;
            ``"always"`` removes it from every matrix that has a basis.
        oversample: extra random directions for the randomized SVD (Halko et al. 2011).
        power_iters: subspace iterations of the randomized SVD.
        svd: ``"auto"`` (exact while min(out, in) <= 256, else randomized), ``"exact"``
            or ``"randomized"``.
        seed: seed of the randomized SVD's own generator (global RNG state untouched).
        backend: op backend (``None`` = auto, or ``"triton"``, ``"cpp"``, ``"torch"``) of
            the fused reduction SPF runs, ``||G||^2`` of every matrix in one
            ``dot_norms`` read; an explicit backend that cannot run raises
            ``BackendUnavailable`` from ``step()`` before anything changes. The SVD and
            the projection are batched torch matmuls.

    Per step: a captured reference ``S`` updates the stored coordinates ``U_k^T S``
    used by the conflict test, and when a refresh is due (``wants_reference``) also
    the basis. Steps without a reference reuse the stored basis and coordinates.
    Without any basis yet, ``step()`` leaves the gradients as they are.

    Missing gradients: a matrix without a safety gradient at a refresh gets no basis
    (left as it is until a refresh that has one); between refreshes, a reference for
    only some matrices updates only their coordinates; a matrix without a task
    gradient keeps ``grad = None``.
    The basis refresh (SVD) runs only on refresh steps; on CUDA the SVD's error check
    may synchronise there. Ordinary steps never read a device value on the host.

    Sharded parameters (FSDP2 / DTensor with ``Shard`` or ``Replicate`` placements): the
    SVD and the projection need whole matrices, so each step gathers every matrix's
    gradient (and, when captured, its safety gradient) with ``full_tensor()``, computes
    exactly what a single process computes, identically on every rank, and writes each
    rank's own shard back. The traffic is an all-gather of the adapter's gradients, about
    what one DDP all-reduce of them costs; for LoRA that is small. Every rank must call
    ``step()``, as with any collective.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        rank: int,
        refresh_every: int | None = None,
        mode: str = "conflicting",
        oversample: int = 8,
        power_iters: int = 2,
        svd: str = "auto",
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        self.rank = check_int("rank", rank, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1, allow_none=True)
        self.mode = check_choice("mode", mode, MODES)
        self.oversample = check_int("oversample", oversample, minimum=0)
        self.power_iters = check_int("power_iters", power_iters, minimum=0)
        self.svd = check_choice("svd", svd, SVD_METHODS)
        self.seed = check_int("seed", seed, minimum=0)
        self.backend = check_backend(backend)
        super().__init__(params, num_slots=1)

        self._groups: list[_Group] = []
        keys: dict[tuple, _Group] = {}
        self._matrix_idx = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        if not self._matrix_idx:
            raise ValueError(
                "params holds no weight matrix (tensor with >= 2 dims) for SPF to act on"
            )
        for i in self._matrix_idx:
            p = self.params[i]
            out, inn = p.shape[0], math.prod(p.shape[1:])
            transposed = out < inn
            big, small = (inn, out) if transposed else (out, inn)
            key = (big, small, transposed, p.dtype)
            if key not in keys:
                keys[key] = _Group(
                    [], big, small, transposed, min(self.rank, small), _compute_dtype(p.dtype)
                )
                self._groups.append(keys[key])
            keys[key].members.append(i)
        # Stats come out group by group; this permutation puts them in matrix order.
        pos = {i: k for k, i in enumerate(self._matrix_idx)}
        order = [pos[i] for g in self._groups for i in g.members]
        self._unpermute = torch.empty(len(order), dtype=torch.int64)
        self._unpermute[torch.tensor(order)] = torch.arange(len(order))
        self._unpermute = self._unpermute.to(self.device)
        self._step = 0
        self._last_refresh: int | None = None
        self._generator: torch.Generator | None = None

    @property
    def matrices(self) -> tuple[Tensor, ...]:
        """The parameters SPF acts on, in the order of ``SPFStats`` fields."""
        return tuple(self.params[i] for i in self._matrix_idx)

    @property
    def wants_reference(self) -> bool:
        """Whether this step's ``step()`` would (re)compute the basis from a reference."""
        if self._last_refresh is None:
            return True
        return (
            self.refresh_every is not None and self._step - self._last_refresh >= self.refresh_every
        )

    def reference(self) -> AbstractContextManager[None]:
        """Context in which backward passes accumulate into the safety gradient ``S``."""
        return self._capture(0)

    def step(self, *, allow_missing: bool = False) -> SPFStats:
        """Refresh the basis if due and a reference was captured, then project ``p.grad`` in place.

        Raises ``RuntimeError`` (before anything is touched) when no parameter has a task
        gradient and nothing was captured, or when there is no basis yet and no safety gradient was captured at
        all: the projection would silently do nothing. (A later refresh without a
        reference keeps using the current basis, as documented above.)
        ``allow_missing=True`` accepts such a step (gradients are then left as they are).
        """
        self._check_idle("step()")
        self._check_found(
            # A reference-only step still refreshes the basis: not a silent no-op.
            task=self.has_captured(0) or any(p.grad is not None for p in self.params),
            reference=self._last_refresh is not None or self.has_captured(0),
            allow_missing=allow_missing,
        )
        # Whole matrices (gathered where sharded); 1-D parameters are not touched.
        refs: list[Tensor | None] = [None] * len(self.params)
        grads: list[Tensor | None] = [None] * len(self.params)
        captured = self._peek(0)
        for i in self._matrix_idx:
            refs[i], grads[i] = gather_whole(captured[i]), gather_whole(self.params[i].grad)
        # First, so that a failing op (e.g. an unavailable backend) leaves everything as it was.
        gsq = self._grad_norm_sq(grads)
        refresh = self.wants_reference and any(refs[i] is not None for i in self._matrix_idx)
        for group in self._groups:
            group_refs = [refs[i] for i in group.members]
            if any(r is not None for r in group_refs):
                self._absorb_reference(group, group_refs, refresh)
            elif refresh:  # no safety gradient at a refresh: nothing to protect here
                group.basis = group.coords = group.nonempty = None
        if refresh:
            self._last_refresh = self._step

        scores, applied, removed = [], [], []
        for group in self._groups:
            s, a, r = self._project(group, grads)
            scores.append(s)
            applied.append(a)
            removed.append(r)
        for i in self._matrix_idx:
            grad = self.params[i].grad
            if grad is not None and grads[i] is not grad:  # a DTensor: keep this rank's shard
                write_local_piece(grad, grads[i])
        self._take(0)
        self._step += 1

        def ordered(vals: list[Tensor]) -> Tensor:
            return torch.cat(vals).index_select(0, self._unpermute)

        return SPFStats(
            score=ordered(scores),
            applied=ordered(applied),
            removed_norm_sq=ordered(removed),
            grad_norm_sq=gsq,
            refreshed=refresh,
        )

    def state_dict(self) -> dict[str, Any]:
        """Step counters, the randomized SVD's generator, and each shape group's basis.

        With it a resumed run refreshes on the same steps and projects with the same
        basis as an uninterrupted one.
        """
        return {
            "step": self._step,
            "last_refresh": self._last_refresh,
            "generator": None if self._generator is None else self._generator.get_state(),
            "layout": [_layout(g) for g in self._groups],
            "groups": [
                {"basis": g.basis, "coords": g.coords, "nonempty": g.nonempty} for g in self._groups
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s result; the parameters' shapes must match."""
        keys = {"step", "last_refresh", "generator", "layout", "groups"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an SPF state: expected keys {sorted(keys)}, got {got}")
        mine = [_layout(g) for g in self._groups]
        theirs = [tuple(x) for x in state["layout"]]
        if theirs != mine:
            raise ValueError(
                "SPF state was saved for other parameters: shape groups (big, small, "
                f"transposed, count, rank) {theirs} != {mine}"
            )
        for g, saved in zip(self._groups, state["groups"]):
            for name in ("basis", "coords", "nonempty"):
                t = saved[name]
                setattr(g, name, None if t is None else t.to(self.device))
        self._step = int(state["step"])
        last = state["last_refresh"]
        self._last_refresh = None if last is None else int(last)
        self._generator = None
        if state["generator"] is not None:
            self._gen().set_state(state["generator"])

    # -- internals ---------------------------------------------------------------

    def _absorb_reference(self, group: _Group, refs: list[Tensor | None], refresh: bool) -> None:
        shape = (group.big, group.small)
        s = torch.stack(
            [
                _tall(r, group.transposed).to(group.dtype)
                if r is not None
                else torch.zeros(shape, dtype=group.dtype, device=self.device)
                for r in refs
            ]
        )
        # A non-finite S gives no basis for that matrix (and would make the SVD fail).
        s = torch.where(torch.isfinite(s).all(-1, keepdim=True).all(-2, keepdim=True), s, 0.0)
        if refresh:  # a matrix without a reference gets an empty basis (S = 0)
            group.basis = self._basis(s, group.rank)
            group.nonempty = group.basis.ne(0).any(-1).any(-1)
        if group.basis is None:
            return
        coords = torch.bmm(group.basis.transpose(1, 2), s)
        present = [k for k, r in enumerate(refs) if r is not None]
        if not refresh and group.coords is not None and len(present) < len(refs):
            # Between refreshes, keep the stored coordinates of matrices that got no
            # new reference (rare; a per-member copy avoids uploading an index).
            kept = group.coords.clone()
            for k in present:
                kept[k] = coords[k]
            coords = kept
        group.coords = coords

    def _basis(self, s: Tensor, k: int) -> Tensor:
        """Top-k left singular vectors of each ``[big, small]`` matrix in ``s`` (batched)."""
        small = s.shape[-1]
        q = min(k + self.oversample, small)
        exact = self.svd == "exact" or (self.svd == "auto" and small <= EXACT_SVD_MAX_DIM)
        if exact or q >= small:
            u, sig, _ = torch.linalg.svd(s, full_matrices=False)
        else:
            # Randomized range finder with subspace iteration (Halko, Martinsson, Tropp
            # 2011, Alg. 4.4), drawing from our own generator so the caller's RNG
            # stream is unchanged and refreshes are reproducible.
            omega = torch.randn(
                s.shape[0], small, q, generator=self._gen(), device=s.device, dtype=s.dtype
            )
            basis = torch.linalg.qr(torch.bmm(s, omega)).Q
            st = s.transpose(1, 2)
            for _ in range(self.power_iters):
                basis = torch.linalg.qr(torch.bmm(st, basis)).Q
                basis = torch.linalg.qr(torch.bmm(s, basis)).Q
            ub, sig, _ = torch.linalg.svd(torch.bmm(basis.transpose(1, 2), s), full_matrices=False)
            u = torch.bmm(basis, ub)
        u, sig = u[..., :k], sig[..., :k]
        # Drop directions whose singular value is zero up to rounding (the rule of
        # torch.linalg.matrix_rank): there S has no energy and U's column is arbitrary.
        tol = sig[..., :1] * max(s.shape[-2:]) * torch.finfo(s.dtype).eps
        return u * (sig > tol).unsqueeze(-2).to(u.dtype)

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    def _grad_norm_sq(self, all_grads: list[Tensor | None]) -> Tensor:
        """float32 ``||G||^2`` per matrix, in ``matrices`` order (0 without a gradient).

        One fused ``dot_norms`` read on ``self.backend``. The op reads dense float32,
        bfloat16 or float16 tensors; any other gradient (float64, or not contiguous) is
        read through a contiguous float32 copy, which is all a float32 statistic needs.
        """
        n = len(self._matrix_idx)
        present = [k for k, i in enumerate(self._matrix_idx) if all_grads[i] is not None]
        if not present:
            return torch.zeros(n, dtype=torch.float32, device=self.device)
        xs = [_op_ready(all_grads[self._matrix_idx[k]]) for k in present]  # type: ignore[arg-type]
        rows = dot_norms(xs, xs, per_tensor=True, backend=self.backend)
        return _spread(rows[:, 2], present, n)

    def _project(
        self, group: _Group, all_grads: list[Tensor | None]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project the group's gradients in place (``all_grads``: whole tensors, by param)."""
        b = len(group.members)
        zeros = torch.zeros(b, dtype=torch.float32, device=self.device)
        present = [k for k, i in enumerate(group.members) if all_grads[i] is not None]
        if group.basis is None or group.coords is None or not present:
            return zeros, zeros.bool(), zeros
        grads = [_tall(all_grads[group.members[k]], group.transposed) for k in present]  # type: ignore[arg-type]
        basis = _rows(group.basis, present, b)
        coords = _rows(group.coords, present, b)
        nonempty = _rows(group.nonempty, present, b)  # type: ignore[arg-type]
        g = torch.stack(grads).to(group.dtype)
        x = torch.bmm(basis.transpose(1, 2), g)  # G's coordinates in the basis: [b, k, small]
        score = (x * coords).sum((1, 2))  # <P, S> = <U^T G, U^T S>
        apply = nonempty if self.mode == "always" else nonempty & (score < 0)
        x = x * apply[:, None, None].to(x.dtype)
        new = torch.baddbmm(g, basis, x, alpha=-1)  # G - U (U^T G), only where applied
        # One rounding back to the gradient dtype; where nothing was removed the
        # value round-trips exactly. One foreach call instead of a copy_ per matrix.
        torch._foreach_copy_(grads, list(new.to(grads[0].dtype).unbind(0)))
        removed = (x * x).sum((1, 2))  # ||P||^2 = ||U^T G||^2 for orthonormal/zero columns
        return (
            _spread(score.float(), present, b),
            _spread(apply, present, b),
            _spread(removed.float(), present, b),
        )
