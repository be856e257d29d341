"""Loading Hugging Face models, tokenizers and adapters from local folders, and their dtype.

The transformers loaders pass ``local_files_only=True``, so they never download; peft reads
an adapter directory that exists directly. transformers and peft are imported inside the
functions, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any

from .data import DataError

__all__ = [
    "bf16_supported",
    "load_adapter",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "weights_dtype",
]


def bf16_supported() -> bool:
    """True where CUDA is present and supports bfloat16 (what ``auto`` means for bf16)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def weights_dtype(name: str, *, bf16: bool) -> Any:
    """The torch dtype called ``name``; ``auto``: bfloat16 when running in bf16, else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model directory, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padding is masked out of every loss and attention, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: the tokenizer has neither a pad nor an EOS token")
    return tokenizer


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    import transformers

    # transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {} if dtype is None else {key: dtype}


def load_causal_lm(path: str, *, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory only (``local_files_only``: never a download)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
    )


def load_sequence_classifier(
    path: str, *, dtype: Any = None, trust_remote_code: bool = False
) -> Any:
    """A sequence-classification model (e.g. a moderation judge) from a local directory."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
    )


def load_adapter(model: Any, path: str) -> Any:
    """``model`` wrapped with the LoRA adapter saved in the local directory ``path``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path)
