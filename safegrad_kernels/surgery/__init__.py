"""Gradient surgeons: stateful per-step algorithms on a model's parameters.

Each surgeon captures the extra gradients it needs through a context manager (no
copies: ``p.grad`` objects are swapped), and its ``step()`` rewrites ``p.grad`` in
place once per optimizer step without synchronising the host. Statistics come back
as device tensors (``.to_dict()`` is the explicit sync point).

- ``SafeGrad``: one-sided projection of the task gradient against the alignment
  gradient, alignment gradient added back with weight ``rho``.
- ``PCGrad``: projecting conflicting gradients among m objectives.
- ``SPF``: removal of the task gradient's component in a low-rank safety subspace.

``METHODS`` (``methods.py``) is the registry of fine-tuning methods built on them (sft,
safegrad, spf, mixed) that every training loop reads.
"""

from .base import Surgeon
from .methods import ALIGNMENT_LOSSES, HYPERPARAMETERS, METHODS, Hyperparameter, Method, get_method
from .pcgrad import PCGrad
from .safegrad import SafeGrad
from .spf import SPF
from .stats import PCGradStats, SafeGradStats, SPFStats, SurgeryStats

__all__ = [
    "ALIGNMENT_LOSSES",
    "HYPERPARAMETERS",
    "METHODS",
    "SPF",
    "Hyperparameter",
    "Method",
    "PCGrad",
    "PCGradStats",
    "SPFStats",
    "SafeGrad",
    "SafeGradStats",
    "Surgeon",
    "SurgeryStats",
    "get_method",
]
