"""The ways to compute each op that the benchmarks put side by side.

Every provider computes the same quantity as the library op (``bench_ops --check`` compares
them against a float64 reference before timing). Providers:

``<backend>``  the library op with ``backend=`` that name (cpp, triton, torch).
``loop``       the authors'-style per-parameter loop: fp32 products summed tensor by
               tensor, a Python ``if dot < 0`` on the result (a host sync), then a new
               ``g - s r + rho r`` per tensor written back. This mirrors the public
               SafeGrad trainer's ``training_step`` (which also clones every gradient
               first; the clones are not counted here).
``cat``        flatten with ``torch.cat`` as public PCGrad implementations do: one fp32
               vector per list, ``torch.dot``, a host branch, then split and copy back.
``eager``      the fastest eager torch over the same list that we could write with the
               same contract (fp32 sums, coefficient kept on the device): per-tensor
               BLAS dots, ``torch._foreach_norm`` and one ``addcmul_`` per tensor. The
               choices were measured (W1, fp32, 2 threads): ``_foreach_add_(g,
               _foreach_mul(r, a))`` 95 ms vs 26 ms for ``addcmul_`` per tensor;
               ``_foreach_mul`` + sum 106 ms vs 18-25 ms for per-tensor ``torch.dot``.
``flat``       torch on ONE pre-flattened contiguous buffer per list (``dot``, norm,
               ``addcmul_``): what a library with no multi-tensor problem would do; the
               flattening itself is not timed.
``flat-gemm``  (pair ops) ``g`` and ``r`` as the two rows of one ``[2, N]`` buffer, all
               three sums from one ``X @ X.T``: a single read, like the fused kernels.
``torchjd``    (pcgrad) torchjd's ``PCGrad`` aggregator on the pre-flattened ``[m, N]``
               Jacobian, if torchjd is importable.

bf16 notes: torch's CPU ``torch.dot`` on bf16 both rounds its result to bf16 and runs
far slower than fp32 (174 ms vs 12 ms for 40M elements here), so the fp32-accurate eager
and flat providers upcast (``.float()``) or use ``_foreach_norm(dtype=float32)`` per tensor
(over one 40M-element bf16 vector that norm is off by 5.7e-3 relative; per ~100k-element
tensor it is fine). ``gemm``
forms on bf16 (oneDNN) accumulate in fp32 and round the m x m result to bf16 (relative
error ~2^-9), which we accept for those providers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .harness import Candidate
from .workloads import Workload, flatten_into, make_pair, make_tasks

EPS = 1e-12  # the op's default; the authors use 1e-9, irrelevant for these data


# --------------------------------------------------------------------------- shared state


@dataclass
class PairData:
    """Everything the pair ops (dot_norms, project_conflicting_) need, built once per case."""

    grads: list[Tensor]
    refs: list[Tensor]
    pristine: Tensor  # flat copy of the original grads, for resets
    g_flat: Tensor
    r_flat: Tensor
    x2: Tensor | None  # [2, N]: g and r as rows (flat-gemm provider), or None

    def restore_lists(self) -> None:
        views = _split_views(self.pristine, self.grads)
        torch._foreach_copy_(self.grads, views)

    def restore_flat(self) -> None:
        self.g_flat.copy_(self.pristine)

    def restore_x2(self) -> None:
        assert self.x2 is not None
        self.x2[0].copy_(self.pristine)

    def written(self, provider: str) -> list[Tensor]:
        """Where ``provider``'s project_conflicting_ left the updated gradients."""
        if provider == "flat":
            return _split_views(self.g_flat, self.grads)
        if provider == "flat-gemm":
            assert self.x2 is not None
            return _split_views(self.x2[0], self.grads)
        return self.grads

    @classmethod
    def build(
        cls, work: Workload, dtype: torch.dtype, device: torch.device, *, conflict: bool, gemm: bool
    ) -> PairData:
        """The workload's ``(g, r)`` pair and its flat copies (``gemm``: also the [2, N] rows)."""
        grads, refs = make_pair(work, dtype, device, conflict=conflict)
        pristine, _ = flatten_into(grads)
        r_flat, _ = flatten_into(refs)
        x2 = torch.stack([pristine, r_flat]) if gemm else None
        return cls(grads, refs, pristine, pristine.clone(), r_flat, x2)


@dataclass
class TaskData:
    """m task-gradient lists (gram, pcgrad_); ``lists[0]`` is the written output."""

    lists: list[list[Tensor]]
    pristine0: Tensor  # flat copy of lists[0]
    x: Tensor  # [m, N] pre-flattened
    out_flat: Tensor  # [N]
    order: Tensor  # [m, m] int64, row i = 0..m-1 (fixed, so every provider agrees)

    def restore_lists(self) -> None:
        torch._foreach_copy_(self.lists[0], _split_views(self.pristine0, self.lists[0]))

    def written(self, provider: str) -> list[Tensor]:
        """Where ``provider``'s pcgrad_ left the aggregate."""
        if provider == "flat":
            return _split_views(self.out_flat, self.lists[0])
        return self.lists[0]

    @classmethod
    def build(
        cls, work: Workload, m: int, dtype: torch.dtype, device: torch.device, *, conflict: bool
    ) -> TaskData:
        """``m`` task lists over the workload, their ``[m, N]`` flat copy and a fixed order."""
        lists = make_tasks(work, m, dtype, device, conflict=conflict)
        x = torch.empty(m, work.numel, dtype=dtype, device=device)
        for row, lst in zip(x, lists):  # in place: no second [m, N] copy at the peak
            torch._foreach_copy_(_split_views(row, lst), lst)
        pristine0 = x[0].clone()
        order = torch.arange(m).repeat(m, 1)
        return cls(lists, pristine0, x, torch.empty_like(pristine0), order)


def _split_views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, off = [], 0
    for t in like:
        out.append(flat[off : off + t.numel()].view(t.shape))
        off += t.numel()
    return out


def _f32(t: Tensor) -> Tensor:
    return t.reshape(-1).float()


# --------------------------------------------------------------------------- dot_norms


def _loop_sums(grads: Sequence[Tensor], refs: Sequence[Tensor], *, gg: bool) -> list[Tensor]:
    """``<g, r>``, ``||r||^2`` (and ``||g||^2``) the authors' way: fp32 products, tensor by tensor."""
    sums = [torch.zeros((), device=grads[0].device) for _ in range(3 if gg else 2)]
    for g, r in zip(grads, refs):
        g32, r32 = g.float(), r.float()
        sums[0] += (g32 * r32).sum()
        sums[1] += (r32 * r32).sum()
        if gg:
            sums[2] += (g32 * g32).sum()
    return sums


def dot_norms_loop(grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
    return torch.stack(_loop_sums(grads, refs, gg=True))


def dot_norms_cat(grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
    gf = torch.cat([_f32(g) for g in grads])
    rf = torch.cat([_f32(r) for r in refs])
    return torch.stack([torch.dot(gf, rf), torch.dot(rf, rf), torch.dot(gf, gf)])


def _dots_eager(grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
    if grads[0].dtype == torch.float32:
        parts = [torch.dot(g.view(-1), r.view(-1)) for g, r in zip(grads, refs)]
    else:
        parts = [torch.dot(_f32(g), _f32(r)) for g, r in zip(grads, refs)]
    return torch.stack(parts).sum()


def _sq_norm_eager(tensors: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def dot_norms_eager(grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
    return torch.stack([_dots_eager(grads, refs), _sq_norm_eager(refs), _sq_norm_eager(grads)])


def dot_norms_flat(g: Tensor, r: Tensor) -> Tensor:
    if g.dtype == torch.float32:
        return torch.stack([torch.dot(g, r), torch.dot(r, r), torch.dot(g, g)])
    # vector_norm(bf16, dtype=float32) is off by 5.7e-3 relative at 40M elements (measured):
    # upcast once and use fp32 BLAS dots instead (~1e-4).
    g32, r32 = g.float(), r.float()
    return torch.stack([torch.dot(g32, r32), torch.dot(r32, r32), torch.dot(g32, g32)])


def dot_norms_flat_gemm(x2: Tensor) -> Tensor:
    gram2 = (x2 @ x2.T).float()
    return torch.stack([gram2[0, 1], gram2[1, 1], gram2[0, 0]])


# --------------------------------------------------------------------------- project_conflicting_


def _coef_on_device(sums: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    dot, rr = sums[0], sums[1]
    conflict = (dot < 0) & (rr > EPS)
    c = torch.where(conflict, dot / torch.where(conflict, rr, 1.0), 0.0)
    return c, rho - c


def project_loop(grads: Sequence[Tensor], refs: Sequence[Tensor], rho: float) -> Tensor:
    dot, rr = _loop_sums(grads, refs, gg=False)
    s = dot / rr if (dot < 0 and rr > EPS) else 0.0  # the host branch (a sync on GPUs)
    for g, r in zip(grads, refs):
        r32 = r.float()
        g.copy_(g.float() - s * r32 + rho * r32)
    return torch.stack([dot, rr, torch.as_tensor(s, device=dot.device)])


def project_cat(grads: Sequence[Tensor], refs: Sequence[Tensor], rho: float) -> Tensor:
    gf = torch.cat([_f32(g) for g in grads])
    rf = torch.cat([_f32(r) for r in refs])
    dot, rr = torch.dot(gf, rf), torch.dot(rf, rf)
    if dot < 0 and rr > EPS:  # host branch, as in public PCGrad code
        gf -= dot / rr * rf
    if rho:
        gf += rho * rf
    torch._foreach_copy_(list(grads), _split_views(gf, grads))
    return torch.stack([dot, rr])


def project_eager(grads: Sequence[Tensor], refs: Sequence[Tensor], rho: float) -> Tensor:
    sums = dot_norms_eager(grads, refs)
    c, a = _coef_on_device(sums, rho)
    for g, r in zip(grads, refs):
        g.addcmul_(r, a)
    return torch.cat([sums, c.view(1)])


def project_flat(g: Tensor, r: Tensor, rho: float) -> Tensor:
    sums = dot_norms_flat(g, r)
    c, a = _coef_on_device(sums, rho)
    g.addcmul_(r, a)
    return torch.cat([sums, c.view(1)])


def project_flat_gemm(x2: Tensor, rho: float) -> Tensor:
    sums = dot_norms_flat_gemm(x2)
    c, a = _coef_on_device(sums, rho)
    x2[0].addcmul_(x2[1], a)
    return torch.cat([sums, c.view(1)])


# --------------------------------------------------------------------------- gram / pcgrad


def gram_loop(lists: Sequence[Sequence[Tensor]]) -> Tensor:
    m = len(lists)
    out = torch.zeros(m, m, device=lists[0][0].device)
    for i in range(m):
        for j in range(i, m):
            acc = torch.zeros((), device=out.device)
            for a, b in zip(lists[i], lists[j]):
                acc += (a.float() * b.float()).sum()
            out[i, j] = acc
            out[j, i] = acc
    return out


def gram_cat(lists: Sequence[Sequence[Tensor]]) -> Tensor:
    flat = torch.stack([torch.cat([_f32(t) for t in lst]) for lst in lists])
    return flat @ flat.T


def gram_eager(lists: Sequence[Sequence[Tensor]]) -> Tensor:
    m = len(lists)
    dev = lists[0][0].device
    acc = torch.zeros(m, m, device=dev)
    for ts in zip(*lists):
        x = torch.stack([t.reshape(-1) for t in ts])
        if x.dtype != torch.float32:
            x = x.float()
        acc += x @ x.T
    return acc


def gram_flat(x: Tensor) -> Tensor:
    return (x @ x.T).float()


def pcgrad_weights_host(gram_matrix: Tensor, order: Tensor) -> list[float]:
    """PCGrad's aggregate weights from the Gram matrix, on the host (float64).

    ``g_i^PC = sum_k C[i, k] g_k``; the aggregate is ``sum_i g_i^PC = (sum_i C[i]) . g``.
    """
    g = gram_matrix.double().cpu()
    m = g.shape[0]
    total = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        coef = torch.zeros(m, dtype=torch.float64)
        coef[i] = 1.0
        for j in order[i].tolist():
            if j == i:
                continue
            dot = float(coef @ g[j])
            if dot < 0 and g[j, j] > 0:
                coef[j] -= dot / float(g[j, j])
        total += coef
    return total.tolist()


def pcgrad_loop(lists: Sequence[Sequence[Tensor]], order: Tensor) -> None:
    """Per-parameter PCGrad with a host branch per pair (the SafeGrad trainer's style)."""
    m = len(lists)
    originals = [[t.float() for t in lst] for lst in lists]
    projected = [[t.clone() for t in lst] for lst in originals]
    sq = []
    for j in range(m):
        acc = torch.zeros((), device=lists[0][0].device)
        for t in originals[j]:
            acc += (t * t).sum()
        sq.append(acc)
    for i in range(m):
        for j in order[i].tolist():
            if j == i:
                continue
            dot = torch.zeros((), device=sq[0].device)
            for a, b in zip(projected[i], originals[j]):
                dot += (a * b).sum()
            if dot < 0:  # host branch
                s = dot / sq[j]
                for a, b in zip(projected[i], originals[j]):
                    a.sub_(s * b)
    for k, out in enumerate(lists[0]):
        total = projected[0][k]
        for i in range(1, m):
            total = total + projected[i][k]
        out.copy_(total)


def pcgrad_cat(lists: Sequence[Sequence[Tensor]], order: Tensor) -> None:
    """Public-PCGrad style: flatten every task, project copies with host branches, sum."""
    grads = [torch.cat([_f32(t) for t in lst]) for lst in lists]
    pc = [g.clone() for g in grads]
    for i, g_i in enumerate(pc):
        for j in order[i].tolist():
            if j == i:
                continue
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot * g_j / g_j.norm() ** 2
    merged = torch.stack(pc).sum(0)
    torch._foreach_copy_(list(lists[0]), _split_views(merged, lists[0]))


def pcgrad_eager(lists: Sequence[Sequence[Tensor]], order: Tensor) -> None:
    """Gram trick in eager torch: gram, m x m weights on the host (one sync), foreach combine."""
    w = pcgrad_weights_host(gram_eager(lists), order)
    out = list(lists[0])
    if out[0].dtype == torch.float32:
        torch._foreach_mul_(out, w[0])
        for j in range(1, len(lists)):
            torch._foreach_add_(out, list(lists[j]), alpha=w[j])
        return
    # Half types: accumulate in fp32 and round once (m in-place bf16 updates would round
    # m times: 4-5x the error of the fused op at m = 4).
    for i, o in enumerate(out):
        acc = o.float() * w[0]
        for j in range(1, len(lists)):
            acc.add_(lists[j][i].float(), alpha=w[j])
        o.copy_(acc)


def pcgrad_flat(x: Tensor, out: Tensor, order: Tensor) -> None:
    w = pcgrad_weights_host(gram_flat(x), order)
    weights = torch.tensor(w, dtype=x.dtype, device=x.device)
    torch.mm(weights.view(1, -1), x, out=out.view(1, -1))


def torchjd_pcgrad() -> Callable[[Tensor], Tensor] | None:
    """torchjd's PCGrad aggregator (``[m, N]`` matrix -> ``[N]``), or None if not installed."""
    try:
        from torchjd.aggregation import PCGrad
    except Exception:
        return None
    return PCGrad()


def torchjd_version() -> str | None:
    try:
        import torchjd
    except Exception:
        return None
    return getattr(torchjd, "__version__", "?")


# --------------------------------------------------------------------------- candidate lists


def library():
    """The package under test, imported only when a backend is benchmarked."""
    import safegrad_kernels

    return safegrad_kernels


def assemble(
    op: str,
    args: tuple,
    kwargs: dict,
    baselines: dict[str, Candidate],
    backends: Sequence[str],
    providers: Sequence[str],
    reset: Callable[[], None] | None = None,
) -> list[Candidate]:
    """The library's ``op(*args, **kwargs, backend=b)`` once per backend, then the
    baselines named in ``providers`` that this op has, in the order asked."""
    out = []
    if backends:
        fn = getattr(library(), op)
        out = [
            Candidate(b, functools.partial(fn, *args, backend=b, **kwargs), reset) for b in backends
        ]
    out.extend(baselines[p] for p in providers if p in baselines)
    return out
