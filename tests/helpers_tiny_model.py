"""A tiny Llama built from a config (no downloads), its LoRA wrapper and toy data.

Shared by the integration tests; keep the signatures stable.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

# ``tiny_tokenizer``'s special tokens in id order: pad 0, bos 1, eos 2 (``tiny_llama``'s
# config uses these ids), unk 3.
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


def tiny_llama(
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 64,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (float32, eval mode as from_pretrained would give)."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,  # as in SPECIAL_TOKENS
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_peft_model(
    vocab: int = 64,
    *,
    r: int = 4,
    alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    random_b: bool = True,
    dropout: float = 0.0,
    seed: int = 0,
    **llama_kwargs,
):
    """``tiny_llama`` wrapped with LoRA. ``random_b=True`` gives B != 0 (init_lora_weights
    False), so the adapted model differs from the base and the KL gradient is nonzero."""
    base = tiny_llama(vocab, seed=seed, **llama_kwargs)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights=not random_b,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, config)
    if random_b:
        # peft's non-identity init draws B like A; shrink it so the adapted model stays
        # close to the reference, as in real training.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
    return model


def toy_examples(
    n: int, *, seq: int = 12, prompt: int = 5, vocab: int = 64, pad_tail: bool = True, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM examples of length ``seq``: labels -100 on the prompt, and with
    ``pad_tail`` a right-padded tail of varying length (pad id 0, labels -100, mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        labels = ids.clone()
        labels[:prompt] = -100
        if pad_tail:
            n_pad = i % 3
            if n_pad:
                ids[-n_pad:] = 0
                mask[-n_pad:] = 0
                labels[-n_pad:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length examples (they are pre-padded)."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def toy_trainer_data(n_train: int, n_align: int) -> dict:
    """A ``SafeGradTrainer``'s data: ``toy_examples`` seeds 0 (task) and 1 (alignment), with
    ``collate``. ``n_align=0``: no alignment set (None)."""
    return {
        "train_dataset": toy_examples(n_train, seed=0),
        "alignment_dataset": toy_examples(n_align, seed=1) if n_align else None,
        "data_collator": collate,
    }


def tiny_training_args(output_dir, **overrides) -> dict:
    """Keyword arguments of ``TrainingArguments`` (or a subclass) for the tiny runs.

    On the CPU, one step of plain SGD at a constant 1e-2, logged, without clipping, nothing
    saved or reported, no progress bar or loader workers, seed 0; ``overrides`` win.
    """
    return {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "learning_rate": 1e-2,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "max_grad_norm": 0.0,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }


# A chat template with TRL's {% generation %} markers (assistant_only_loss), the turn's
# end-of-sequence token inside them, and a generation prompt that is a prefix of the
# rendered conversation (TRL's prompt/completion split needs that).
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|> {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{%- else -%}"
    "<|{{ m['role'] }}|> {{ m['content'] }} "
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|> {%- endif -%}"
)


def tiny_tokenizer(words: Iterable[str], *, bos: bool = False):
    """A word-level fast tokenizer over ``words`` with a chat template (no downloads).

    Ids 0, 1, 2 are pad, bos, eos as in ``tiny_llama``'s config; role markers are special
    tokens, so ``text + "</s>"`` splits as TRL expects. ``bos``: every encoding starts with
    ``<s>``, as Llama's own tokenizer does. Needs ``len(...) <= vocab``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=list(ROLE_TOKENS), **SPECIAL_TOKENS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
