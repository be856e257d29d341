"""SafeGradTrainer's reference and loss modes: training memory, step time, store size.

    python -m benchmarks.trainer_reference                  # vocab 128,256 (~10 min, 1 thread)
    python -m benchmarks.trainer_reference --vocab 4000 --modes sft,safegrad-store

Each mode runs ``--steps`` optimizer steps of a real ``SafeGradTrainer`` in a fresh
subprocess. Model: a random ``LlamaForCausalLM`` (hidden 256, 2 layers, untied head), LoRA
r=8 on q,v with small random B (the model differs from its reference), or full fine-tuning
(``full-*`` modes). Data: random tokens, the first half of each row a prompt; task and
alignment batches of ``--batch`` x ``--seq``; an alignment set of ``--align`` examples.
AdamW, fp32, no clipping, ``TrainingArguments(use_cpu=True)``.

Training memory (the issue's measure): peak RSS (``VmHWM``, reset with
``/proc/self/clear_refs`` once the trainer is built) minus the RSS at that reset; it
includes the store, built inside the first step. Time: median of the steps after the first
(the first builds the store, and loads the surgery backend). Modes:

``sft``, ``sft-fused``                  plain fine-tuning, logits / fused cross-entropy
``safegrad-live``                       reference forward every step (cache_reference=False)
``safegrad-store``                      exact fp32 store (cache_reference=True)
``safegrad-store-fused``                the same with fused_loss=True
``safegrad-top64-fused``                top-64 store, fused
``safegrad-live-fused``                 adapter-disabled hidden states every step, fused
``full-sft-fused``, ``full-safegrad-top64-fused``   full fine-tuning (no PEFT)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import provenance
from benchmarks.memory import measure_peak_rss, run_workers

MODES = {
    "sft": dict(method="sft"),
    "sft-fused": dict(method="sft", fused_loss=True),
    "safegrad-live": dict(cache_reference=False),
    "safegrad-store": dict(cache_reference=True),
    "safegrad-store-fused": dict(cache_reference=True, fused_loss=True),
    "safegrad-top64-fused": dict(reference_top_k=64, fused_loss=True),
    "safegrad-live-fused": dict(cache_reference=False, fused_loss=True),
    "full-sft-fused": dict(method="sft", fused_loss=True, full=True),
    "full-safegrad-top64-fused": dict(reference_top_k=64, fused_loss=True, full=True),
}


def _examples(n: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen)
        labels = ids.clone()
        labels[: seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([x[k] for x in items]) for k in items[0]}


def _worker(mode: str, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

    from safegrad_kernels.integrations import SafeGradTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = dict(MODES[mode])
    full = settings.pop("full", False)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if not full:
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=1e-5,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            logging_steps=args.steps,
            max_grad_norm=0.0,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        method = settings.pop("method", "safegrad")
        trainer = SafeGradTrainer(
            model=model,
            args=training,
            train_dataset=_examples(args.batch * args.steps, args.seq, args.vocab, 1),
            alignment_dataset=(
                _examples(args.align, args.seq, args.vocab, 2) if method != "sft" else None
            ),
            data_collator=_collate,
            method=method,
            callbacks=[Clock()],
            **settings,
        )
        build = trainer._ensure_reference_store
        build_s = []

        def timed_build() -> None:
            if trainer.reference_choice.on and trainer.reference_store is None:
                start = time.perf_counter()
                build()
                build_s.append(time.perf_counter() - start)

        trainer._ensure_reference_store = timed_build
        _, peak = measure_peak_rss(trainer.train)  # set-up done
    store = trainer.reference_store
    return {
        "mode": mode,
        "train_mib": round(peak, 1),
        "store_mib": 0.0 if store is None else round(store.nbytes / 2**20, 2),
        "first_step_s": round(times[0], 3),
        "store_build_s": round(sum(build_s), 3),
        "step_s_median": round(statistics.median(times[1:]), 3),
        "fused": bool(getattr(trainer, "_fused_loss", False)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--align", type=int, default=8, help="alignment examples")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args)))
        return []
    rows = run_workers("benchmarks.trainer_reference", argv, args.modes.split(","))
    sft = next((r for r in rows if r["mode"] == "sft"), None)
    info = provenance(torch.device("cpu"))
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.batch} x {args.seq} tokens (half "
        f"prompt), {args.align} alignment examples, {args.steps} steps; {info['date']}, "
        f"{info['machine']}, {args.threads} thread(s), load average {info['loadavg']}"
    )
    print(
        "| mode | training MiB | x sft | store MiB | store build s | first step s "
        "| step s (median) | x sft |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['train_mib'] / sft['train_mib']:.2f}" if sft else ""
        step = f"{r['step_s_median'] / sft['step_s_median']:.2f}" if sft else ""
        print(
            f"| {r['mode']} | {r['train_mib']:.0f} | {mem} | {r['store_mib']:.1f} | "
            f"{r['store_build_s']:.2f} | {r['first_step_s']:.2f} | {r['step_s_median']:.2f} "
            f"| {step} |"
        )
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
