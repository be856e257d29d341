"""The op layer: public ops -> custom ops -> pipeline (validate, plan, kernels, finish) -> backends.

Modules, in call order: ``functional`` (public functions), ``library`` (every
``safegrad::`` schema and fake), ``pipeline`` (the stages every op runs), ``validate``
(its checks), ``dispatch`` (backend selection), ``backend`` (the interface and registry)
and the backends ``torch_backend``, ``cpp_backend``, ``triton_backend``. ``pcgrad``
composes ``gram`` and ``combine_``.
"""

from .backend import BACKEND_NAMES, BackendUnavailable
from .dispatch import available_backends
from .functional import combine_, dot_norms, gram, project_conflicting_
from .pcgrad import pcgrad_

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "available_backends",
    "combine_",
    "dot_norms",
    "gram",
    "pcgrad_",
    "project_conflicting_",
]
