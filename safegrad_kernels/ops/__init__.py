"""The op layer: validation, backend dispatch and the public multi-tensor ops."""

from .dispatch import BACKEND_NAMES, BackendUnavailable, available_backends
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
