"""safegrad_kernels: fused multi-tensor kernels and a thin training API for gradient surgery.

Low-level ops (every one takes ``backend=None | "triton" | "cpp" | "torch"``)::

    dot_norms(grads, refs)                 -> [<g,r>, ||r||^2, ||g||^2]
    project_conflicting_(grads, refs, rho) -> SafeGrad update in place
    gram(lists)                            -> [m, m] Gram matrix
    combine_(out, lists, weights)          -> weighted sum in place
    pcgrad_(lists)                         -> PCGrad aggregate into lists[0]

Importing needs only torch: Triton and the compiled C++ extension are optional
accelerators, loaded on first use (``safegrad info`` reports what is available).
"""

from .integrations import lora_parameters, named_lora_parameters
from .losses import ReferenceCache, kl_alignment_loss, reference_logits, response_token_count
from .ops import (
    BackendUnavailable,
    available_backends,
    combine_,
    dot_norms,
    gram,
    pcgrad_,
    project_conflicting_,
)
from .surgery import (
    SPF,
    PCGrad,
    PCGradStats,
    SafeGrad,
    SafeGradStats,
    SPFStats,
    Surgeon,
    SurgeryStats,
)

__version__ = "0.1.0"

__all__ = [
    "SPF",
    "BackendUnavailable",
    "PCGrad",
    "PCGradStats",
    "ReferenceCache",
    "SPFStats",
    "SafeGrad",
    "SafeGradStats",
    "Surgeon",
    "SurgeryStats",
    "__version__",
    "available_backends",
    "combine_",
    "dot_norms",
    "gram",
    "kl_alignment_loss",
    "lora_parameters",
    "named_lora_parameters",
    "pcgrad_",
    "project_conflicting_",
    "reference_logits",
    "response_token_count",
]
