"""Pure-torch backend: the fallback of last resort and the test oracle.

Runs anywhere torch runs. It is written for clarity and fp32-accurate sums, not for
speed: half-precision inputs are upcast per tensor, so it moves more bytes than the
fused backends and issues several kernels per tensor. It also cannot skip the write
of a tensor whose coefficient is zero without reading that coefficient on the host,
so ``axpy_`` always writes (the value is unchanged: ``g + 0 * r == g`` for finite r;
a non-finite r is masked to keep that guarantee).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backend import Backend, register_backend


def _f32(t: Tensor) -> Tensor:
    return t.reshape(-1).to(torch.float32)


class TorchBackend(Backend):
    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return True

    def dot_norms(self, grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
        rows = []
        for g, r in zip(grads, refs):
            g32, r32 = _f32(g), _f32(r)
            rows.append(
                torch.stack([torch.dot(g32, r32), torch.dot(r32, r32), torch.dot(g32, g32)])
            )
        return torch.stack(rows)

    def axpy_(self, grads: Sequence[Tensor], refs: Sequence[Tensor], coef: Tensor) -> None:
        for i, (g, r) in enumerate(zip(grads, refs)):
            a = coef[i]
            g32 = _f32(g)
            # where() keeps the "zero coefficient leaves g bitwise untouched" contract
            # (-0.0 + 0.0 would flip a sign bit; 0 * inf is NaN) without a host branch.
            g.copy_(torch.where(a != 0, g32 + _f32(r) * a, g32).view(g.shape))

    def gram(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        m = len(lists)
        out = torch.zeros(m, m, dtype=torch.float32, device=lists[0][0].device)
        for tensors in zip(*lists):
            flat = torch.stack([_f32(t) for t in tensors])  # [m, numel]
            out += flat @ flat.T
        return out

    def combine_(
        self, out: Sequence[Tensor], lists: Sequence[Sequence[Tensor]], weights: Tensor
    ) -> None:
        w = weights.to(torch.float32)
        for i, o in enumerate(out):
            acc = _f32(lists[0][i]) * w[0]
            for j in range(1, len(lists)):
                acc = acc + _f32(lists[j][i]) * w[j]
            o.copy_(acc.view(o.shape))


register_backend(TorchBackend())
