"""Every ``safegrad::`` torch op: its schema and its fake, defined here and nowhere else.

Two kinds of op live in the ``safegrad`` namespace:

* **The public ops** (:data:`PUBLIC_OPS`): ``torch.library.custom_op`` around the
  matching function of ``ops.pipeline`` (validate, resolve a backend, run its kernels).
  The backend is part of each schema as a string so that a compiled graph keeps the
  caller's choice.
* **The C++ kernel ops** (:data:`CPP_KERNEL_OPS`): one dtype group each, called by
  ``ops.cpp_backend``. ``csrc/safegrad_cpu.cpp`` only registers their CPU
  implementations (``TORCH_LIBRARY_IMPL``), when ``cpp_backend`` loads the extension.
  The dispatcher accepts an implementation before or after its schema, so loading the
  compiled library before importing this module works as well as after; until it is
  loaded the ops exist but have no CPU kernel.

Fakes do shape work only (``torch.compile`` and ``opcheck`` trace through them): the
output's shape and device. The checks are ``ops.validate``'s, run by the real
implementations through ``ops.pipeline``.

List-of-lists arguments do not exist in op schemas, so ``gram`` and ``combine_`` (and
their C++ kernel ops) take the m lists concatenated (list j at ``[j * n, (j + 1) * n)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import pipeline, validate
from .pipeline import PAIR_NAMES

__all__ = [
    "CPP_KERNEL_OPS",
    "PUBLIC_OPS",
    "axpy_",
    "combine_",
    "dot_norms",
    "gram",
    "project_conflicting_",
]

# name -> schema. Written out rather than inferred from signatures so that every schema
# in the namespace reads in one place (these are the ones inference gave before).
PUBLIC_OPS = {
    "dot_norms": "(Tensor[] grads, Tensor[] refs, bool per_tensor, str? backend) -> Tensor",
    "project_conflicting_": (
        "(Tensor(a0!)[] grads, Tensor[] refs, float rho, float eps, bool per_tensor, "
        "str? backend) -> Tensor"
    ),
    "axpy_": "(Tensor(a0!)[] grads, Tensor[] refs, Tensor coef, str? backend) -> ()",
    "gram": "(Tensor[] tensors, SymInt m, str? backend) -> Tensor",
    "combine_": (
        "(Tensor(a0!)[] out, Tensor[] tensors, Tensor weights, bool out_is_first, "
        "str? backend) -> ()"
    ),
}
# name -> schema; the implementations are csrc/safegrad_cpu.cpp's TORCH_LIBRARY_IMPL.
CPP_KERNEL_OPS = {
    "cpp_dot_norms": "(Tensor[] grads, Tensor[] refs) -> Tensor",
    "cpp_axpy_": "(Tensor(a!)[] grads, Tensor[] refs, Tensor coef) -> ()",
    "cpp_gram": "(Tensor[] tensors, int m) -> Tensor",
    "cpp_combine_": "(Tensor(a!)[] out, Tensor[] tensors, Tensor weights, bool out_is_first) -> ()",
}


def _public(name: str, impl, mutates: tuple[str, ...] = ()):
    return torch.library.custom_op(
        f"safegrad::{name}", impl, mutates_args=mutates, schema=PUBLIC_OPS[name]
    )


def _fake_out(shape: tuple[int, ...] | None, names: list[str], *lists: list[Tensor]):
    """A fake's float32 output (None for ``shape=None``) on the inputs' common device.

    The device is the one check a fake makes: the dispatcher sends any call holding a
    meta tensor here, even beside real tensors, and such a call has no output device
    (``validate.common_device``). Every other check runs in the real implementation.
    """
    device = validate.common_device(names, lists) or torch.device("cpu")
    return None if shape is None else torch.empty(shape, dtype=torch.float32, device=device)


def _split(tensors: list[Tensor], m: int, n: int) -> list[list[Tensor]]:
    """The concatenated ``tensors`` as m lists of n (n = 0: m empty lists)."""
    if len(tensors) != m * n:
        raise ValueError(f"{len(tensors)} tensors cannot be split into {m} lists of {n}")
    return [list(tensors[j * n : (j + 1) * n]) for j in range(m)]


def _gram(tensors: list[Tensor], m: int, backend: str | None) -> Tensor:
    if m < 1 or len(tensors) % m:
        raise ValueError(f"{len(tensors)} tensors cannot be split into {m} equal lists")
    return pipeline.gram(_split(tensors, m, len(tensors) // m), backend)


def _combine(
    out: list[Tensor],
    tensors: list[Tensor],
    weights: Tensor,
    out_is_first: bool,
    backend: str | None,
) -> None:
    """With ``out_is_first`` the caller's ``lists[0]`` is ``out`` itself and ``tensors``
    holds only ``lists[1:]`` (a schema cannot list a mutated argument among the inputs)."""
    n = len(out)
    # The number of lists given follows from the counts (as in the C++ kernel op); with
    # no tensors at all only the weights can say it.
    given = len(tensors) // n if n else max(weights.numel() - out_is_first, 0)
    pipeline.combine_(out, _split(tensors, given, n), weights, out_is_first, backend)


# ----------------------------------------------------------------------------- public ops

dot_norms = _public("dot_norms", pipeline.dot_norms)
project_conflicting_ = _public("project_conflicting_", pipeline.project_conflicting_, ("grads",))
axpy_ = _public("axpy_", pipeline.axpy_, ("grads",))
gram = _public("gram", _gram)
combine_ = _public("combine_", _combine, ("out",))


@dot_norms.register_fake
def _(grads, refs, per_tensor, backend):
    return _fake_out((len(grads), 3) if per_tensor else (3,), PAIR_NAMES, grads, refs)


@project_conflicting_.register_fake
def _(grads, refs, rho, eps, per_tensor, backend):
    return _fake_out((len(grads), 4) if per_tensor else (4,), PAIR_NAMES, grads, refs)


@axpy_.register_fake
def _(grads, refs, coef, backend):
    return _fake_out(None, [*PAIR_NAMES, "coef"], grads, refs, [coef])


@gram.register_fake
def _(tensors, m, backend):
    return _fake_out((m, m), ["tensors"], tensors)


@combine_.register_fake
def _(out, tensors, weights, out_is_first, backend):
    return _fake_out(None, ["out", "tensors", "weights"], out, tensors, [weights])


# ----------------------------------------------------------------------------- C++ kernel ops

_LIB = torch.library.Library("safegrad", "FRAGMENT")
for _name, _schema in CPP_KERNEL_OPS.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake("safegrad::cpp_dot_norms", lib=_LIB)
def _(grads, refs):
    return _fake_out((len(grads), 3), PAIR_NAMES, grads, refs)


@torch.library.register_fake("safegrad::cpp_axpy_", lib=_LIB)
def _(grads, refs, coef):
    return _fake_out(None, [*PAIR_NAMES, "coef"], grads, refs, [coef])


@torch.library.register_fake("safegrad::cpp_gram", lib=_LIB)
def _(tensors, m):
    return _fake_out((m, m), ["tensors"], tensors)


@torch.library.register_fake("safegrad::cpp_combine_", lib=_LIB)
def _(out, tensors, weights, out_is_first):
    return _fake_out(None, ["out", "tensors", "weights"], out, tensors, [weights])
