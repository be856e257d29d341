"""Loading Hugging Face models, tokenizers and adapters from local folders, and their dtype.

Offline by construction, in three layers: ``enable_offline_mode`` sets the hub's offline
switches before transformers is imported (the CLI calls it first); the ``check_*``
functions refuse anything that is not a local folder of the right kind, in one line
naming the flag and the path, before anything loads; and every loader passes
``local_files_only=True``. transformers and peft are imported inside the functions, so
importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data import DataError

__all__ = [
    "OFFLINE_ENV",
    "TOKENIZER_FILES",
    "add_lora",
    "bf16_supported",
    "check_adapter_dir",
    "check_chat_template",
    "check_model_dir",
    "enable_offline_mode",
    "load_adapter",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "weights_dtype",
]


# The switches huggingface_hub, transformers and datasets read (at import) to never connect.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A vocabulary in one of these is what AutoTokenizer needs besides tokenizer_config.json
# (fast tokenizers: tokenizer.json; SentencePiece: *.model; BPE: vocab.json + merges.txt;
# WordPiece: vocab.txt; tiktoken-based models: tiktoken.model).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "vocab.json",
    "vocab.txt",
)
# "org/name" that is not a path on disk: what a user types for a hub model.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def enable_offline_mode() -> None:
    """Tell huggingface_hub, transformers and datasets never to connect (before they load).

    They read these variables when imported, so this must run first: the CLI calls it
    before parsing. Loaders here pass ``local_files_only=True`` as well, which holds even
    where a library was imported earlier.
    """
    os.environ.update(OFFLINE_ENV)


def _folder(flag: str, path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DataError(f"{flag} {path}: is a file; expected a {what} folder")
    if _HUB_ID.fullmatch(str(path)) and not folder.parent.exists():
        raise DataError(
            f"{flag} {path}: no such folder (if it is a hub id: nothing is downloaded; fetch "
            f"it first, e.g. `hf download {path} --local-dir ./{folder.name}`, and pass the folder)"
        )
    raise DataError(f"{flag} {path}: no such folder")


def check_model_dir(
    flag: str, path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> Path:
    """``path`` as a local Hugging Face model folder, else ``DataError`` naming ``flag``.

    A model folder has ``config.json`` and a tokenizer vocabulary (``TOKENIZER_FILES``;
    with ``trust_remote_code`` a ``tokenizer_config.json`` is enough, its code may bring
    its own). Nothing is loaded.
    """
    folder = _folder(flag, path, "Hugging Face model")
    if not (folder / "config.json").is_file():
        raise DataError(f"{flag} {path}: no config.json (not a Hugging Face model folder)")
    vocab = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if not vocab and not (trust_remote_code and (folder / "tokenizer_config.json").is_file()):
        raise DataError(
            f"{flag} {path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the model folder"
        )
    return folder


def check_adapter_dir(flag: str, path: str | os.PathLike[str]) -> Path:
    """``path`` as a local PEFT adapter folder (``adapter_config.json``), else ``DataError``."""
    folder = _folder(flag, path, "LoRA adapter")
    if not (folder / "adapter_config.json").is_file():
        raise DataError(
            f"{flag} {path}: no adapter_config.json (not a LoRA adapter folder, "
            "e.g. the --output-dir of `safegrad train`)"
        )
    return folder


def check_chat_template(flag: str, path: str | os.PathLike[str]) -> None:
    """``DataError`` unless the tokenizer saved in ``path`` carries a chat template."""
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return
    config = folder / "tokenizer_config.json"
    try:
        if config.is_file() and json.loads(config.read_text()).get("chat_template"):
            return
    except (OSError, ValueError, AttributeError):
        pass  # unreadable: the tokenizer load will say what is wrong
    raise DataError(
        f"{flag}: the tokenizer in {path} has no chat template (no chat_template.jinja, none "
        "in tokenizer_config.json); use --prompt-style alpaca or plain"
    )


@contextlib.contextmanager
def _quiet_upstream_deprecations() -> Iterator[None]:
    # peft's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
    # deprecates with a FutureWarning on every get_peft_model / PeftModel.from_pretrained: a
    # warning about library internals the user can do nothing about. Only that message from
    # that module is silenced, and only inside our own call.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module="transformers.modeling_utils",
        )
        yield


def add_lora(model: Any, config: Any) -> Any:
    """``peft.get_peft_model(model, config)``, without the upstream deprecation noise."""
    from peft import get_peft_model

    with _quiet_upstream_deprecations():
        return get_peft_model(model, config)


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

    with _quiet_upstream_deprecations():
        return PeftModel.from_pretrained(model, path, local_files_only=True)
