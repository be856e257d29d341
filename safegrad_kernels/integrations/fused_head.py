"""Final hidden states and LM head of a Hugging Face causal LM, without the full logits.

The fused losses (``fused_losses``) need the input of the model's LM head, ``[B, T, H]``,
and the head itself. How to get them from any causal LM, in transformers 5.x:

* ``model.get_decoder()(...)`` (``model.model``) gives ``last_hidden_state`` after the final
  norm for Llama-like models, but skips whatever the ``*ForCausalLM.forward`` does between
  the decoder and the head, and needs per-architecture knowledge of the kwargs.
* ``output_hidden_states=True`` with ``logits_to_keep=1``: in 5.24 Llama's last recorded
  hidden state is the normed one, but that is an architecture detail, and the tuple keeps
  every layer's output referenced.
* What is used here: a forward pre-hook on ``model.get_output_embeddings()`` records the
  head's input (the exact tensor the head would multiply, graph attached, so LoRA layers
  and the final norm have applied) and lets only the first position through. The model's
  own forward runs unchanged (PEFT wrappers included: ``PeftModel`` forwards
  ``get_output_embeddings`` to the base model's head) and returns ``[B, 1, V]`` logits,
  which are compared once per model with ``F.linear(hidden[:, :1], W, b)``. A model that
  transforms the head's output (logit soft-capping, ``logit_scale``, ``logits_scaling``:
  Gemma 2/3, Cohere, Granite, ...) fails that check and falls back.

Refused, with the reason logged (the caller then takes the logits path): no output
embeddings, a head that is not a plain ``nn.Linear`` (LoRA or ``modules_to_save`` on the
head, quantised heads), an empty head weight (DeepSpeed ZeRO-3 partitions), a known logit
transform in the config, a head input whose ``[B, T]`` differs from the tokens'
(prompt-learning adapters add virtual tokens), and a failed output check.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import _NON_MODEL_KEYS, _eval_mode, _require_peft

__all__ = ["fused_head_unsupported", "hidden_states_and_head", "reference_hidden_states"]

logger = logging.getLogger(__name__)

Head = tuple[Tensor, Tensor, Tensor | None]

# Config fields through which transformers' causal LMs rescale or cap the head's output
# (grep of transformers 5.24 models/*/modeling_*.py: "logits = logits * / ...").
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)

# Outcome of the one-time output check per model object: None (fused is exact) or why not.
_checked: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _config_transform(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in _LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1 and not isinstance(value, bool):
                return f"config.{name} = {value} transforms the logits after the head"
    return None


def _head_of(model: nn.Module) -> tuple[nn.Linear | None, str | None]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, f"{type(model).__name__} exposes no output embeddings"
    if not isinstance(head, nn.Linear):
        return None, (
            f"the output embeddings are a {type(head).__name__}, not a plain nn.Linear "
            "(an adapter or modules_to_save on the head?)"
        )
    weight = head.weight
    if not weight.is_floating_point() or weight.dim() != 2 or weight.numel() == 0:
        return None, (
            f"the head weight is {weight.dtype} of shape {tuple(weight.shape)}: quantised "
            "or partitioned (DeepSpeed ZeRO-3), not a [vocab, hidden] float matrix"
        )
    return head, None


def fused_head_unsupported(model: nn.Module) -> str | None:
    """Why the fused losses cannot run on ``model``, or None if nothing is known against it.

    Static checks only (no forward); the output check of ``hidden_states_and_head`` runs
    on its first call for each model.
    """
    _, why = _head_of(model)
    return why or _config_transform(model) or _checked.get(model)


def hidden_states_and_head(
    model: nn.Module, inputs: Mapping[str, Any], *, run: nn.Module | None = None
) -> Head | None:
    """``(hidden [B, T, H], weight [V, H], bias [V] | None)`` of ``model`` on ``inputs``.

    One forward of ``model`` (autograd as the caller's context has it) in which only the
    first position reaches the head. ``inputs`` are the model's keyword inputs; ``labels``
    and ``num_items_in_batch`` are dropped. ``run``: the module whose forward is called, a
    wrapper of ``model`` such as DDP (whose forward prepares the gradient all-reduce);
    default ``model`` itself. Returns None and logs the reason when the model
    is one it cannot handle (module docstring); the first call for a model also reads one
    comparison on the host.
    """
    why = fused_head_unsupported(model)
    if why is not None:
        logger.warning("fused loss unavailable, using the logits path: %s", why)
        return None
    head, _ = _head_of(model)
    assert head is not None
    captured: list[Tensor] = []

    def keep_first_position(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            x, args = args[0], (args[0][..., :1, :], *args[1:])
        else:
            x = kwargs["input"]
            kwargs = {**kwargs, "input": x[..., :1, :]}
        captured.append(x)
        return args, kwargs

    model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    handle = head.register_forward_pre_hook(keep_first_position, with_kwargs=True)
    try:
        out = (model if run is None else run)(**model_inputs)
    finally:
        handle.remove()

    tokens = model_inputs.get("input_ids", model_inputs.get("inputs_embeds"))
    why = None
    if len(captured) != 1:
        why = f"the head ran {len(captured)} times in one forward"
    elif tokens is not None and captured[0].shape[:2] != tokens.shape[:2]:
        why = (
            f"the head's input {tuple(captured[0].shape)} does not line up with the tokens "
            f"{tuple(tokens.shape[:2])} (virtual tokens of a prompt-learning adapter?)"
        )
    elif model not in _checked:
        why = _output_check(out, captured[0], head)
        _checked[model] = why
    if why is not None:
        logger.warning("fused loss unavailable, using the logits path: %s", why)
        return None
    return captured[0], head.weight, head.bias


def _output_check(out: Any, hidden: Tensor, head: nn.Linear) -> str | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, Tensor):
        return "the model's output has no logits to check the head against"
    with torch.no_grad():
        expected = F.linear(hidden[..., :1, :], head.weight, head.bias)
    if logits.shape != expected.shape:
        return (
            f"the model's logits {tuple(logits.shape)} are not its head's {tuple(expected.shape)}"
        )
    # The same F.linear on the same input: equal unless the model transforms the logits.
    tolerance = 1e-5 if logits.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(logits.float(), expected.float(), rtol=tolerance, atol=tolerance):
        return "the model's logits differ from its head's output (a transform after the head)"
    return None


def reference_hidden_states(model: nn.Module, batch: Mapping[str, Any]) -> Head | None:
    """``hidden_states_and_head`` of the PEFT ``model`` with its adapters disabled, in eval
    mode, without autograd: the reference side of the fused KL (no second model copy)."""
    peft_model = _require_peft(model)
    with torch.no_grad(), peft_model.disable_adapter(), _eval_mode(peft_model):
        return hidden_states_and_head(peft_model, batch)
