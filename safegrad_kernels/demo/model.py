"""The demo's model: a small Llama built from a config, and the on-disk cache of the aligned model.

The cache holds the state dict of the model after the alignment stage, keyed by a hash
of everything that determines it (model and alignment settings, the world's
vocabulary, library versions), so a rerun with the same settings skips that stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Bump when the world or the alignment recipe changes in a way the settings do not show.
WORLD_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Size of the demo's Llama (385k parameters; the LoRA adapter adds 35k trainable).

    Two layers rather than the feasibility run's four: every step here is dominated by
    per-op overhead (batch 16 x ~25 tokens), so depth sets the cost, and the default
    sweep (72 fine-tuning runs) has to fit in 15 minutes on 2 cores.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64


def build_model(spec: ModelSpec, vocab_size: int, seed: int) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (transformers is imported lazily)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def cache_dir() -> Path:
    """``$SAFEGRAD_CACHE`` or ``~/.cache/safegrad_kernels/demo``."""
    root = os.environ.get("SAFEGRAD_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "safegrad_kernels" / "demo"


def cache_key(*specs: object, extra: dict | None = None) -> str:
    """A short stable hash of dataclass settings plus ``extra``."""
    import transformers

    payload = {
        "world_version": WORLD_VERSION,
        "specs": [asdict(s) for s in specs],  # type: ignore[call-overload]
        "extra": extra or {},
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_load(key: str) -> dict | None:
    """The cached entry for ``key`` (``{"state_dict", "info"}``), or None if absent or unreadable."""
    path = cache_dir() / f"aligned-{key}.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file is a cache miss, not an error
        return None


def cache_save(key: str, entry: dict) -> Path:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"aligned-{key}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aligned-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(entry, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
