"""Gradient sets to benchmark on: the shapes of real LoRA adapters, and an overhead-bound set.

Each workload is a list of tensor shapes (one per trainable tensor, in model order). The
data are fresh random numbers, never zeros, arranged so that the gradients conflict (or do
not) by construction:

* a pair ``(g, r)`` for SafeGrad-style ops: ``g = x - 0.3 r`` (conflict, cos(g, r) ~ -0.29)
  or ``g = x + 0.3 r`` (no conflict), with ``x, r`` independent standard normal;
* ``m`` task gradients for Gram/PCGrad: ``g_j = x_j + s_j 0.5 d`` with a shared direction
  ``d`` and signs ``s_j`` alternating (conflict: every pair with opposite signs has
  cos ~ -0.2) or all ``+1`` (no conflict).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: tuple[Shape, ...]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def lora_shapes(layers: int, targets: Sequence[tuple[int, int]], rank: int) -> tuple[Shape, ...]:
    """Shapes of LoRA A ``[r, in]`` and B ``[out, r]`` for each ``(in, out)`` target per layer."""
    shapes: list[Shape] = []
    for _ in range(layers):
        for d_in, d_out in targets:
            shapes.append((rank, d_in))
            shapes.append((d_out, rank))
    return tuple(shapes)


def _llama_targets(hidden: int, inter: int, kv_out: int, which: str) -> list[tuple[int, int]]:
    all_linear = {
        "q": (hidden, hidden),
        "k": (hidden, kv_out),
        "v": (hidden, kv_out),
        "o": (hidden, hidden),
        "gate": (hidden, inter),
        "up": (hidden, inter),
        "down": (inter, hidden),
    }
    return [all_linear[k] for k in which.split(",")]


def tiny_shapes(
    count: int = 5000, lo: int = 1024, hi: int = 4096, seed: int = 0
) -> tuple[Shape, ...]:
    """``count`` 1-D tensors of ``lo..hi`` elements, sizes drawn once with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
    return tuple((n,) for n in sizes)


# Llama-2-7B: 32 layers, hidden 4096, intermediate 11008, no GQA.
# Llama-3-70B: 80 layers, hidden 8192, intermediate 28672, 8 KV heads of 128 -> k/v out 1024.
WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        "W1",
        "Llama-2-7B LoRA r=16 q,k,v,o,gate,up,down",
        lora_shapes(32, _llama_targets(4096, 11008, 4096, "q,k,v,o,gate,up,down"), 16),
    ),
    "W2": Workload(
        "W2",
        "Llama-2-7B LoRA r=8 q,v",
        lora_shapes(32, _llama_targets(4096, 11008, 4096, "q,v"), 8),
    ),
    "W3": Workload(
        "W3",
        "Llama-3-70B LoRA r=16 all linear",
        lora_shapes(80, _llama_targets(8192, 28672, 1024, "q,k,v,o,gate,up,down"), 16),
    ),
    "W4": Workload("W4", "5000 tiny tensors of 1-4k elements", tiny_shapes()),
}


def tiny_workload(n_tensors: int = 12, scale: int = 64) -> Workload:
    """A few-kilobyte workload for smoke tests."""
    shapes = tuple((scale + 7 * i, 3) for i in range(n_tensors))
    return Workload("tiny", f"{n_tensors} small tensors (smoke test)", shapes)


def _randn(shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device, gen) -> list[Tensor]:
    # Generated in fp32 per tensor and rounded once, so bf16 and fp32 runs see the same values.
    return [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]


def make_pair(
    work: Workload, dtype: torch.dtype, device: torch.device, *, conflict: bool, seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """``(grads, refs)`` with ``<g, r>`` clearly negative (conflict) or positive."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sign = -0.3 if conflict else 0.3
    grads, refs = [], []
    for s in work.shapes:
        r = torch.randn(s, generator=gen, device=device)
        g = torch.randn(s, generator=gen, device=device).add_(r, alpha=sign)
        grads.append(g.to(dtype))
        refs.append(r.to(dtype))
        del g, r
    return grads, refs


def make_tasks(
    work: Workload,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    conflict: bool,
    seed: int = 0,
) -> list[list[Tensor]]:
    """``m`` task-gradient lists over the workload's shapes (see the module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    signs = [(1.0 if j % 2 == 0 else -1.0) if conflict else 1.0 for j in range(m)]
    lists: list[list[Tensor]] = [[] for _ in range(m)]
    for s in work.shapes:
        d = torch.randn(s, generator=gen, device=device)
        for j in range(m):
            x = torch.randn(s, generator=gen, device=device).add_(d, alpha=0.5 * signs[j])
            lists[j].append(x.to(dtype))
        del d
    return lists


def flatten_into(tensors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One contiguous buffer holding ``tensors`` and the views of it, in order."""
    numel = sum(t.numel() for t in tensors)
    flat = torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
    views, off = [], 0
    for t in tensors:
        v = flat[off : off + t.numel()].view(t.shape)
        v.copy_(t)
        views.append(v)
        off += t.numel()
    return flat, views
