"""Integrations with the Hugging Face stack: PEFT parameter selection and a Trainer.

``lora_parameters`` needs only torch. ``SafeGradTrainer`` imports transformers, so it is
loaded on first access (``from safegrad_kernels.integrations import SafeGradTrainer``).
TRL's ``SFTTrainer`` with the same methods: ``safegrad_kernels.integrations.trl``.
"""

from __future__ import annotations

from typing import Any

from .peft import lora_parameters, named_lora_parameters

__all__ = ["METHODS", "SafeGradTrainer", "lora_parameters", "named_lora_parameters"]


def __getattr__(name: str) -> Any:
    if name in ("SafeGradTrainer", "METHODS"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
