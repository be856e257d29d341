"""PEFT helpers: the trainable LoRA parameters of a ``peft.PeftModel``.

Gradient surgery acts on exactly the parameters the optimizer updates. For LoRA those are
the adapter factors; picking them by name rather than by ``requires_grad`` alone makes a
mistake visible (e.g. a base weight left trainable, or adapters frozen by accident).
"""

from __future__ import annotations

from torch import nn

__all__ = ["lora_parameters", "named_lora_parameters"]

# Name fragments of LoRA adapter tensors in peft (linear, embedding and DoRA layers).
LORA_NAME_PARTS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)


def _is_lora_name(name: str) -> bool:
    # A whole dotted component, e.g. "...q_proj.lora_A.default.weight".
    return not set(name.split(".")).isdisjoint(LORA_NAME_PARTS)


def named_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every trainable LoRA tensor of ``model``, in module order.

    A tensor counts when its name contains a LoRA factor name (``lora_A``, ``lora_B``,
    ``lora_embedding_A/B``, DoRA's ``lora_magnitude_vector``) and it requires grad.
    Frozen adapters (inactive ones, or ``requires_grad=False``) and non-LoRA trainable
    tensors (``modules_to_save`` copies, biases) are not included.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no trainable LoRA parameter was found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module (a peft.PeftModel), got {type(model).__name__}"
        )
    found = [
        (name, p) for name, p in model.named_parameters() if p.requires_grad and _is_lora_name(name)
    ]
    if not found:
        n_trainable = sum(p.requires_grad for p in model.parameters())
        raise ValueError(
            f"no trainable LoRA parameter (lora_A/lora_B/lora_embedding_*) in "
            f"{type(model).__name__} ({n_trainable} trainable tensors in all); wrap the model "
            "with peft.get_peft_model(model, LoraConfig(...)) and keep the adapter active"
        )
    return found


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable LoRA tensor of ``model`` (see ``named_lora_parameters``)."""
    return [p for _, p in named_lora_parameters(model)]
