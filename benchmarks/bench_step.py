"""Time and peak memory of one optimizer step: sft, mixed, safegrad, spf and the authors' style.

    python -m benchmarks.bench_step                 # demo + cpu-large configs (~5 min)
    python -m benchmarks.bench_step --configs demo --steps 5
    python -m benchmarks.bench_step --tiny --no-save   # seconds; what the smoke test runs
    python -m benchmarks.bench_step --configs cpu-large --cost-study --threads 1 \
        --warmup 4 --steps 16 --md benchmarks/results/step_cost.md   # issue 13's options

Timing: all methods of a config live in one process and are stepped round-robin, so
that a busy machine slows them alike (this 2-core VM is shared; single runs varied 3x).
Memory: each (config, method) runs a few steps again in a fresh subprocess, and its peak
resident set size (``VmHWM`` from ``/proc/self/status``) is that configuration's alone:
Python's ``tracemalloc`` does not see torch's allocations and torch keeps no CPU allocator
statistics. We report the peak, and the peak above the process's RSS right after the
model, optimizer and batches were built (``peak - base``), which is where the methods
differ.

Model: a randomly initialised ``LlamaForCausalLM`` with PEFT LoRA r=8 (alpha 16, dropout
0) on every linear layer; the LoRA B factors start at small random values (not zero), so
the model differs from its reference and the alignment gradient is not zero. Batches:
random tokens, the first half of each row a prompt (label -100), the rest the response.

Methods: every entry of the registry ``safegrad_kernels.surgery.METHODS`` (the library
path, as ``safegrad_kernels.demo.train`` drives it, with the reference recomputed every
step, i.e. ``cache_reference=False``; settings ``SETTINGS``), plus the benchmark-only
``authors`` baseline:

``sft``       task cross-entropy forward/backward, AdamW.
``mixed``     + alignment KL(P_ref || P_theta) with weight 1 (reference logits from the
              same PeftModel with its adapters disabled), both gradients summed.
``safegrad``  the alignment backward inside ``SafeGrad.reference()``, then ``step()``.
``spf``       SPF rank 4, basis refreshed every 10 steps from a safety cross-entropy
              (the reference passes run only on refresh steps; times are means per step).
``authors``   a reimplementation of the public SafeGrad trainer's step: a deep-copied
              second full model as P_ref, ``F.kl_div`` on fp32 log-softmax/softmax over
              all positions, ``g_u``/``g_a`` cloned per parameter, flattened with
              ``torch.cat``, a host ``if dot < 0``, and ``p.grad = g_u - s g_a + rho g_a``.

Variants (``--methods`` takes them beside the plain names): ``METHOD[+cache][+topk=K]
[+every=K][+ab=N][+fused]`` runs a registry method with SafeGradTrainer options, through the
mechanisms the trainer uses for them, in this benchmark's own loop (``StepRunner``, not the
HF Trainer, whose loop overhead is the same with or without a defense):

``+cache``    ``cache_reference=True``: the exact fp32 ``ReferenceStore`` of the whole
              alignment set, built by ``integrations.reference.build_reference_store``
              and read with ``kl_from_reference``, as ``SafeGradTrainer`` does (it builds
              the store before its first optimizer step; here once after set-up), so the
              timed steps are its steady state; its host memory counts in the training
              memory (it is built after the set-up RSS is read). Exact (dense fp32) is
              what the trainer's default picks while the store fits its 1 GiB budget:
              4 V + 4 bytes a loss row, 525 MB for vocab128k's 1,024 rows.
``+topk=K``   with ``+cache``: ``reference_top_k=K``, the top-k store (8 K + 4 bytes a
              row, error bound in ``reference_store``).
``+every=K``  ``alignment_every=K``: the registry's setting, so the surgeon's own
              ``wants_reference`` decides (``Method.alignment_due``), as in the trainer;
              alignment batches advance only on refresh steps.
``+ab=N``     ``alignment_batch_size=N``: the alignment pool (4 task batches' worth of
              examples) cut into batches of N.
``+fused``    ``fused_loss=True``: the task cross-entropy and the alignment loss from the
              LM head's input and weight, chunk by chunk (``fused_losses``), never the
              ``[tokens, vocab]`` logits; hidden states from ``integrations.fused_head``
              (the head's input, only one position let through the head), the KL's
              reference from the store with ``+cache``, else from the adapter-disabled
              hidden states; rows as the trainer picks them. Any registry method, ``sft``
              included (``SafeGradTrainer(method="sft", fused_loss=True)`` computes its
              task loss fused); a model ``fused_head`` refuses is an error here (the
              trainer would fall back to the logits path).

``--cost-study`` runs, per config, sft and SafeGrad live / cached / ``every=4`` / cached
``every=4``, then sft, SafeGrad live, cached and cached ``every=4`` with ``+fused``, then
SafeGrad with alignment batch = half and a quarter of the task batch. With ``K > 1``
among the variants, warm-up and timed steps are rounded up to whole periods (the lcm of
the K's), so means cover whole refresh cycles. Ratios "x sft" are medians over periods
of (variant time / sft time) in the same rounds, which run round-robin in a rotated
order, so a neighbour's load burst hits both sides of a ratio alike; memory ratios use
the training memory (peak - base), against sft on the logits path (also for ``+fused``:
issue 13 sets the fused targets against plain SFT). ``ISSUE13_TARGETS`` holds issue 13's
targets; each is printed with its ratio and a verdict when its variant and sft were both
measured.

Phases are timed with ``time.perf_counter`` (CPU: every op is synchronous).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    RESULTS_DIR,
    RUN_FIELDS,
    add_threads_argument,
    append_csv,
    markdown_table,
    provenance,
    run_header,
)
from benchmarks.memory import MALLOC_RSS_FOLLOWS_LIVE_BYTES, proc_status_mib, run_worker
from safegrad_kernels.demo.train import METHODS as LIBRARY_METHODS
from safegrad_kernels.losses import model_inputs, response_ce
from safegrad_kernels.surgery import get_method

if TYPE_CHECKING:
    from safegrad_kernels.fused_losses import ReferenceLogProbs

# The benchmark-only reimplementation of the authors' step, beside the registry's methods.
AUTHORS = "authors"
METHODS = (*LIBRARY_METHODS, AUTHORS)
# Hyperparameters of the registry's methods here (each method reads its own).
SETTINGS = {"rho": 1.0, "lam": 1.0, "spf_rank": 4, "spf_refresh_every": 10}
PHASES = ("task_fwd", "task_bwd", "ref_fwd", "align_fwd", "align_bwd", "surgery", "optimizer")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (LlamaConfig kwargs, batch size, sequence length)
CONFIGS: dict[str, tuple[dict, int, int]] = {
    # The demo's model (safegrad_kernels.demo), batch and length as the demo trains.
    "demo": (
        dict(
            vocab_size=200,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        16,
        32,
    ),
    # A larger model that still steps in about a second on 2 cores: 29M parameters,
    # 0.6M LoRA parameters.
    "cpu-large": (
        dict(
            vocab_size=4000,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=256,
        ),
        4,
        128,
    ),
    # Weights dominate, activations small (batch 1 x 64): the regime of a 7B model with
    # LoRA, where a second full model copy is what costs memory. 118M params, 470 MB fp32.
    "cpu-wide": (
        dict(
            vocab_size=8000,
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=128,
        ),
        1,
        64,
    ),
    # Issue 13's large-vocabulary shape (Llama-3's 128256 tokens), CPU-sized otherwise:
    # every pass materialises [tokens, vocab] logits, which is where memory goes.
    "vocab128k": (
        dict(
            vocab_size=128256,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        ),
        2,
        256,
    ),
    # For benchmarks.gpu_check on one GPU (bf16 autocast): 0.9B parameters, batch 4 x 512,
    # large enough that a step is kernel time, not launch overhead (not measured yet).
    "gpu-llama": (
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=1024,
        ),
        4,
        512,
    ),
    # For the smoke test only.
    "tiny": (
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        2,
        16,
    ),
}


# LoRA targets where a config does not use all linear layers (TARGETS).
CONFIG_LORA_TARGETS = {"vocab128k": ("q_proj", "v_proj")}

# Issue 13's targets: (config, variant, "time" | "memory", at most this many x sft, the
# logits path). A variant with "*" is a pattern (fnmatch) over the variants measured:
# "safegrad*" every SafeGrad variant, "safegrad*+fused" every one with fused_loss=True.
ISSUE13_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("cpu-large", "safegrad+cache+every=4", "time", 1.35),
    ("cpu-large", "safegrad+cache", "time", 2.0),
    ("vocab128k", "safegrad*", "memory", 1.1),
    ("vocab128k", "safegrad*+fused", "memory", 0.4),
)


@dataclass(frozen=True)
class Variant:
    """A registry method (or ``authors``) with the trainer options this benchmark measures."""

    method: str
    cache: bool = False
    alignment_every: int = 1
    alignment_batch: int | None = None  # None: the task batch size
    fused: bool = False
    top_k: int | None = None  # with cache: the store's reference_top_k (None: exact)

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.cache:
            parts.append("cache")
        if self.top_k is not None:
            parts.append(f"topk={self.top_k}")
        if self.alignment_every != 1:
            parts.append(f"every={self.alignment_every}")
        if self.alignment_batch is not None:
            parts.append(f"ab={self.alignment_batch}")
        if self.fused:
            parts.append("fused")
        return "+".join(parts)


def parse_variant(text: str) -> Variant:
    """``METHOD[+cache][+topk=K][+every=K][+ab=N][+fused]`` (see the module docstring)."""
    method, *options = text.split("+")
    if method not in METHODS:
        raise ValueError(f"{text!r}: method must be one of {METHODS}")
    kw: dict = {}
    for opt in options:
        if opt in ("cache", "fused"):
            kw[opt] = True
        elif m := re.fullmatch(r"(every|ab|topk)=([1-9][0-9]*)", opt):
            name = {"every": "alignment_every", "ab": "alignment_batch", "topk": "top_k"}[m[1]]
            kw[name] = int(m[2])
        else:
            raise ValueError(
                f"{text!r}: unknown option {opt!r} (cache, topk=K, every=K, ab=N, fused)"
            )
    variant = Variant(method, **kw)
    spec = None if method == AUTHORS else get_method(method)
    if variant.fused and spec is None:
        raise ValueError(f"{text!r}: fused_loss is a SafeGradTrainer option; {AUTHORS} is not")
    if set(options) - {"fused"} and (spec is None or not spec.needs_alignment):
        raise ValueError(f"{text!r}: {method} has no alignment pass to change")
    if variant.top_k is not None and not variant.cache:
        raise ValueError(f"{text!r}: topk=K sets the store of +cache")
    if variant.cache and spec.alignment_loss != "kl":
        raise ValueError(f"{text!r}: the reference store holds the KL's reference")
    # A method without the registry's hyperparameter (mixed, spf) has no refresh to set.
    if variant.alignment_every != 1 and "alignment_every" not in spec.defaults:
        raise ValueError(f"{text!r}: {method} has no alignment_every setting")
    return variant


def cost_study(config: str) -> list[str]:
    """Issue 13's comparison on ``config``: sft and SafeGrad with each cost option."""
    bsz = CONFIGS[config][1]
    smaller = sorted({max(bsz // 2, 1), max(bsz // 4, 1)} - {bsz}, reverse=True)
    return [
        "sft",
        "safegrad",
        "safegrad+cache",
        "safegrad+every=4",
        "safegrad+cache+every=4",
        "sft+fused",
        "safegrad+fused",
        "safegrad+cache+fused",
        "safegrad+cache+every=4+fused",
        "safegrad+cache+topk=64",
        "safegrad+cache+topk=64+fused",
        *[f"safegrad+ab={n}" for n in smaller],
    ]


# --------------------------------------------------------------------------- worker


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _batch(vocab: int, bsz: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class StepRunner:
    """One method's model, optimizer, batches and surgeon; ``step()`` times one step's phases."""

    def __init__(self, config: str, method: str, seed: int, device: str = "cpu") -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        from safegrad_kernels.integrations.peft import lora_parameters

        hf_logging.set_verbosity_error()
        torch.manual_seed(seed)
        variant = parse_variant(method)
        self.config, self.variant = config, variant
        self.method = variant.label
        method = variant.method
        cfg_kwargs, bsz, seq = CONFIGS[config]
        base = LlamaForCausalLM(LlamaConfig(**cfg_kwargs))
        self.model_params = sum(p.numel() for p in base.parameters())
        self.ref_model = None
        self.spec = None if method == AUTHORS else get_method(method)
        if self.spec is None:
            # The public trainer loads P_ref as a second full model; a deep copy of the
            # base weights is the same memory.
            self.ref_model = copy.deepcopy(base).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        targets = CONFIG_LORA_TARGETS.get(config, TARGETS)
        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets))
        self.model = get_peft_model(base, lcfg)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        if variant.fused:
            # Imported here, before the memory worker reads its base RSS: the trainer
            # module brings transformers.Trainer and accelerate, 87 MiB that the first step
            # counted as training memory (tiny: 97 MiB above set-up vs sft's 10).
            from safegrad_kernels.integrations.fused_head import fused_head_unsupported
            from safegrad_kernels.integrations.trainer import SafeGradTrainer  # noqa: F401

            # SafeGradTrainer would fall back to the logits path: not what +fused measures.
            why = fused_head_unsupported(self.model)
            if why is not None:
                raise ValueError(f"{self.method}: the fused losses cannot run: {why}")
        # On CUDA: the model on the GPU, forwards under bf16 autocast (as the trainer's
        # bf16=True), and a synchronisation at every phase boundary so phases are GPU time.
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.params = lora_parameters(self.model)
        self.lora_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        vocab = cfg_kwargs["vocab_size"]
        self.user = [_on(_batch(vocab, bsz, seq, gen), self.device) for _ in range(4)]
        # The alignment pool: 4 task batches' worth of examples, cut into alignment batches
        # (as the trainer's alignment loader does), each with its dataset indices.
        pool = _on(_batch(vocab, 4 * bsz, seq, gen), self.device)
        ab = variant.alignment_batch or bsz
        self.align = [
            ({k: v[i : i + ab] for k, v in pool.items()}, list(range(i, min(i + ab, 4 * bsz))))
            for i in range(0, 4 * bsz, ab)
        ]
        settings = dict(SETTINGS, alignment_every=variant.alignment_every)
        self.settings = self.spec.validate(**settings) if self.spec is not None else {}
        self.surgeon = self.spec.build_surgeon(self.params, self.settings) if self.spec else None
        # The alignment labels on the host: the trainer hands the store its batch's labels
        # from before the move to the device, so that reading the store needs no sync.
        self.align_host_labels = [batch["labels"].cpu() for batch, _ in self.align]
        self.store = None  # the reference store, built by prefill() for +cache
        self.model.train()
        self.n = 0
        self.alignment_passes = 0

    def prefill(self) -> None:
        """Build the reference store (for ``+cache``) of every alignment example, from the
        starting model, as ``SafeGradTrainer`` does before its first step; untimed set-up."""
        if not self.variant.cache or self.store is not None:
            return
        from safegrad_kernels.integrations.reference import build_reference_store

        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            self.store = build_reference_store(
                self.model,
                ((indices, batch) for batch, indices in self.align),
                positions="response",
                top_k=self.variant.top_k,
            )

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _head(self, batch: dict[str, torch.Tensor], reference: bool = False) -> tuple:
        """``(hidden, weight, bias)`` of the model on ``batch``, as SafeGradTrainer's fused
        losses get them; ``reference=True``: adapters disabled, eval mode, no autograd."""
        from safegrad_kernels.integrations.fused_head import (
            hidden_states_and_head,
            reference_hidden_states,
        )

        get = reference_hidden_states if reference else hidden_states_and_head
        head = get(self.model, batch)
        if head is None:  # the trainer would take the logits path (reason logged)
            raise RuntimeError(f"{self.method}: fused_head refused the model")
        return head

    def task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task cross-entropy, the micro-batch mean: from the logits, or for ``+fused``
        as ``SafeGradTrainer.compute_loss`` computes it with ``fused_loss=True``."""
        labels = batch["labels"]
        if not self.variant.fused:
            return response_ce(self.model(**model_inputs(batch)).logits, labels)
        from safegrad_kernels.fused_losses import fused_linear_cross_entropy, rows_without_sync

        hidden, weight, bias = self._head(batch)
        rows = rows_without_sync(labels, None, "response")
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, rows=rows)

    def alignment_reference(self, which: int) -> torch.Tensor | ReferenceLogProbs | None:
        """The KL's reference for alignment batch ``which``, as
        ``SafeGradTrainer._kl_alignment_loss`` gets it: the store's rows (``+cache``), else
        the adapter-disabled hidden states (``+fused``) or logits; None for a CE."""
        from safegrad_kernels.losses import reference_logits

        batch, indices = self.align[which]
        labels = batch["labels"]
        if self.spec.alignment_loss != "kl":
            return None
        if self.store is not None:
            host = self.align_host_labels[which]
            return self.store.get(
                indices, labels=host, seq_len=labels.shape[1], device=labels.device
            )
        if self.variant.fused:
            return self._head(batch, reference=True)[0]
        return reference_logits(self.model, batch)

    def alignment_loss(
        self, which: int, reference: torch.Tensor | ReferenceLogProbs | None
    ) -> torch.Tensor:
        """The alignment loss of batch ``which`` against ``alignment_reference(which)``,
        the batch mean, on the logits path or (``+fused``) the trainer's fused one."""
        from safegrad_kernels.fused_losses import (
            fused_linear_cross_entropy,
            fused_linear_kl,
            kl_from_reference,
            rows_without_sync,
        )
        from safegrad_kernels.losses import kl_alignment_loss

        batch, _ = self.align[which]
        labels = batch["labels"]
        kl = self.spec.alignment_loss == "kl"
        if not self.variant.fused:
            logits = self.model(**model_inputs(batch)).logits
            if not kl:
                return response_ce(logits, labels)
            if self.store is not None:
                return kl_from_reference(logits, reference, labels)
            return kl_alignment_loss(logits, reference, labels)

        hidden, weight, bias = self._head(batch)
        if kl and self.store is not None:  # the stored reference carries its rows
            return fused_linear_kl(hidden, weight, labels, reference, bias=bias)
        rows = rows_without_sync(labels, self.align_host_labels[which], "response")
        if not kl:
            return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, rows=rows)
        return fused_linear_kl(hidden, weight, labels, reference, bias=bias, rows=rows)

    def _task_pass(self, batch: dict[str, torch.Tensor], ph: dict[str, float]) -> None:
        """The task cross-entropy forward and backward, timed into ``ph``."""
        s0 = self._clock()
        loss = self.task_loss(batch)
        ph["task_fwd"] = self._clock() - s0
        s0 = self._clock()
        loss.backward()
        ph["task_bwd"] = self._clock() - s0

    def step(self) -> tuple[dict[str, float], float]:
        """One optimizer step; (seconds per phase, total seconds)."""
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return self._step()

    def _step(self) -> tuple[dict[str, float], float]:
        model, params, opt, surgeon = self.model, self.params, self.opt, self.surgeon
        ub = self.user[self.n % 4]
        # The next alignment batch in the cycle; it advances only on steps that use one.
        which = self.alignment_passes % len(self.align)
        ab, _ = self.align[which]
        self.n += 1
        ph = dict.fromkeys(PHASES, 0.0)
        t = self._clock
        t_step = t()
        spec = self.spec
        if spec is None:  # the authors' step
            self.alignment_passes += 1
            # -- task gradient, cloned
            self._task_pass(ub, ph)
            s0 = t()
            g_u = [p.grad.clone() for p in params]
            opt.zero_grad(set_to_none=True)
            ph["surgery"] += t() - s0
            # -- alignment gradient against the second model
            s0 = t()
            with torch.no_grad():
                ref = self.ref_model(**model_inputs(ab)).logits
            ph["ref_fwd"] = t() - s0
            s0 = t()
            logits = model(**model_inputs(ab)).logits
            n_resp = (ab["labels"] != -100).sum()
            kl = F.kl_div(
                F.log_softmax(logits.float(), -1), F.softmax(ref.float(), -1), reduction="sum"
            )
            loss_a = kl / n_resp
            ph["align_fwd"] = t() - s0
            s0 = t()
            loss_a.backward()
            ph["align_bwd"] = t() - s0
            del ref, logits, kl, loss_a  # see the other branch
            # -- surgery: clones, flatten, host branch, new gradients
            s0 = t()
            g_a = [p.grad.clone() for p in params]
            fu = torch.cat([g.reshape(-1).float() for g in g_u])
            fa = torch.cat([g.reshape(-1).float() for g in g_a])
            dot, nsq = torch.dot(fu, fa), torch.dot(fa, fa)
            s = (dot / nsq).item() if (dot < 0 and nsq > 1e-9) else 0.0
            for p, gu, ga in zip(params, g_u, g_a):
                p.grad = gu - s * ga + 1.0 * ga
            del g_u, g_a, fu, fa
            ph["surgery"] += t() - s0
        else:
            if spec.alignment_due(surgeon):
                self.alignment_passes += 1
                s0 = t()
                ref = self.alignment_reference(which)
                ph["ref_fwd"] = t() - s0
                ctx = surgeon.reference() if surgeon is not None else contextlib.nullcontext()
                with ctx:
                    s0 = t()
                    loss_a = self.alignment_loss(which, ref)
                    weight = spec.loss_weight(self.settings)
                    if weight != 1.0:
                        loss_a = loss_a * weight
                    ph["align_fwd"] = t() - s0
                    s0 = t()
                    loss_a.backward()
                    ph["align_bwd"] = t() - s0
                # A trainer's alignment loss function returns and drops these before the
                # task pass; held here, the reference and the logits (now local to
                # alignment_loss) added two [tokens, vocab] tensors to the peak: SafeGrad's
                # training memory on vocab128k was 1284 MiB, 846 without (SFT: 781),
                # 2026-12-01.
                del ref, loss_a
            self._task_pass(ub, ph)
            if surgeon is not None:
                s0 = t()
                surgeon.step()
                ph["surgery"] = t() - s0
        s0 = t()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ph["optimizer"] = t() - s0
        return ph, t() - t_step


def period(methods: Sequence[str]) -> int:
    """Steps in one refresh cycle of every variant (the lcm of their ``every=K``)."""
    return math.lcm(*(parse_variant(m).alignment_every for m in methods))


def time_methods(
    config: str, methods: Sequence[str], steps: int, warmup: int, seed: int, device: str = "cpu"
) -> list[dict]:
    """All methods in this process, stepped round-robin so that they share the machine's noise.

    Each round steps every method once, in an order rotated by one per round. ``steps``
    and ``warmup`` are rounded up to whole periods (``period``). SPF's basis refresh
    (every 10 steps) falls into the timed window when ``steps >= 10``.
    """
    k = period(methods)
    steps, warmup = -(-steps // k) * k, -(-warmup // k) * k
    runners = [StepRunner(config, m, seed, device) for m in methods]
    for r in runners:
        r.prefill()
    names = [r.method for r in runners]
    times = {m: {p: [] for p in PHASES} for m in names}
    totals: dict[str, list[float]] = {m: [] for m in names}
    for step in range(warmup + steps):
        shift = step % len(runners)
        for r in runners[shift:] + runners[:shift]:
            ph, total = r.step()
            if step >= warmup:
                for key in PHASES:
                    times[r.method][key].append(ph[key])
                totals[r.method].append(total)
    out = []
    for r in runners:
        m = r.method
        out.append(
            {
                "config": config,
                "method": m,
                "lora_params": r.lora_params,
                "model_params": r.model_params,
                "steps": steps,
                "warmup": warmup,
                "period": k,
                "phases_ms": {key: 1e3 * statistics.fmean(v) for key, v in times[m].items()},
                "step_ms_mean": 1e3 * statistics.fmean(totals[m]),
                "step_ms_median": 1e3 * statistics.median(totals[m]),
                "period_ratios": _period_ratios(totals[m], totals.get("sft"), k),
            }
        )
    return out


def _period_ratios(times: list[float], sft: list[float] | None, k: int) -> list[float] | None:
    """Per whole period: this method's time over sft's in the same rounds."""
    if sft is None:
        return None
    return [sum(times[i : i + k]) / sum(sft[i : i + k]) for i in range(0, len(times), k)]


def _untimed(config: str, method: str, seed: int) -> dict:
    """A result row with sizes but no timings (``--memory-only``)."""
    r = StepRunner(config, method, seed)
    nan = math.nan
    return {
        "config": config,
        "method": method,
        "lora_params": r.lora_params,
        "model_params": r.model_params,
        "steps": 0,
        "phases_ms": dict.fromkeys(PHASES, nan),
        "step_ms_mean": nan,
        "step_ms_median": nan,
        "period_ratios": None,
    }


def memory_worker(config: str, method: str, steps: int, seed: int) -> dict:
    """Peak RSS of ``steps`` steps of one method in this (fresh) process."""
    from safegrad_kernels import dot_norms

    # Load the op backend first (the C++ extension's libraries are resident once per
    # process, ~10 MiB, and are not training memory).
    dot_norms([torch.ones(8)], [torch.ones(8)])
    runner = StepRunner(config, method, seed)
    base = proc_status_mib("VmRSS")
    runner.prefill()  # the reference store is training memory: built after the base
    for _ in range(steps):
        runner.step()
    return {"base_rss_mib": base, "peak_rss_mib": proc_status_mib("VmHWM")}


# --------------------------------------------------------------------------- driver


def measure_memory(config: str, method: str, steps: int, seed: int) -> dict:
    """``memory_worker`` in a fresh subprocess (its VmHWM is this configuration's alone)."""
    argv = ["--memory-worker", "--configs", config, "--methods", method]
    argv += ["--steps", str(steps), "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    return run_worker("benchmarks.bench_step", argv, env=MALLOC_RSS_FOLLOWS_LIVE_BYTES)


def table(results: Sequence[dict]) -> list[str]:
    head = [
        "method",
        "step ms",
        *[p.replace("_", " ") for p in PHASES],
        "surgery %",
        "peak MiB",
        "peak-base MiB",
    ]
    rows = []
    for r in results:
        ph = r["phases_ms"]
        share = 100 * ph["surgery"] / r["step_ms_mean"]
        rows.append(
            [
                r["method"],
                f"{r['step_ms_mean']:.1f}",
                *[f"{ph[p]:.2f}" for p in PHASES],
                f"{share:.2f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f}",
            ]
        )
    return markdown_table(head, rows)


def _train_mib(r: dict) -> float:
    return r["peak_rss_mib"] - r["base_rss_mib"]


def _ratio_cells(r: dict, sft: dict | None) -> tuple[str, str, str]:
    """(x sft time, its range over periods, x sft training memory) as table cells."""
    if sft is None:
        return "-", "-", "-"
    ratios = r.get("period_ratios")
    time_x = f"{statistics.median(ratios):.2f}" if ratios else "-"
    spread = f"{min(ratios):.2f}-{max(ratios):.2f} ({len(ratios)})" if ratios else "-"
    mem = _train_mib(r) / _train_mib(sft) if _train_mib(sft) > 0 else math.nan
    return time_x, spread, "-" if math.isnan(mem) else f"{mem:.2f}"


def ratio_table(results: Sequence[dict]) -> list[str]:
    """Each method against sft, measured side by side: time per step and training memory."""
    sft = next((r for r in results if r["method"] == "sft"), None)
    head = [
        "method",
        "step ms (mean)",
        "x sft (median)",
        "x sft range (periods)",
        "train MiB",
        "train x sft",
    ]
    rows = []
    for r in results:
        time_x, spread, mem_x = _ratio_cells(r, sft)
        mean = f"{r['step_ms_mean']:.1f}"
        rows.append([r["method"], mean, time_x, spread, f"{_train_mib(r):.0f}", mem_x])
    return markdown_table(head, rows)


def target_verdicts(
    config: str,
    results: Sequence[dict],
    targets: Sequence[tuple[str, str, str, float]] = ISSUE13_TARGETS,
) -> list[str]:
    """Each target of ``config``: its ratio to sft, the target and MET / NOT MET."""
    by = {r["method"]: r for r in results}
    sft = by.get("sft")
    out = []
    for cfg, variant, metric, limit in targets:
        if cfg != config:
            continue
        names = [m for m in by if fnmatch.fnmatchcase(m, variant)] if "*" in variant else [variant]
        for name in names:
            r = by.get(name)
            what = f"{name} {'step time' if metric == 'time' else 'training memory'}"
            if r is None or sft is None:
                out.append(f"{what}: target <= {limit:g}x sft (issue 13): not measured in this run")
                continue
            if metric == "time":
                ratios = r.get("period_ratios") or [math.nan]
                value = statistics.median(ratios)
                detail = (
                    f"median of {len(ratios)} paired periods, {min(ratios):.2f}-{max(ratios):.2f}"
                )
            else:
                base = _train_mib(sft)
                value = _train_mib(r) / base if base > 0 else math.nan
                detail = f"{_train_mib(r):.0f} vs {base:.0f} MiB above set-up"
            if math.isnan(value):
                verdict = "not measured in this run"
            else:
                verdict = "MET" if value <= limit else "NOT MET"
            out.append(
                f"{what}: {value:.2f}x sft ({detail}); target <= {limit:g}x (issue 13): {verdict}"
            )
    return out


def verdicts(results: Sequence[dict]) -> list[str]:
    by = {r["method"]: r for r in results}
    out = []
    if "safegrad" in by and not math.isnan(by["safegrad"]["step_ms_mean"]):
        r = by["safegrad"]
        share = 100 * r["phases_ms"]["surgery"] / r["step_ms_mean"]
        out.append(
            f"surgery share of a SafeGrad step: {share:.2f}% (target < 2%: "
            f"{'MET' if share < 2 else 'NOT MET'})"
        )
    if "safegrad" in by and "authors" in by and not math.isnan(by["safegrad"]["peak_rss_mib"]):
        a, s = by["authors"], by["safegrad"]
        da = a["peak_rss_mib"] - a["base_rss_mib"]
        ds = s["peak_rss_mib"] - s["base_rss_mib"]
        out.append(
            f"peak RSS: safegrad {s['peak_rss_mib']:.0f} MiB vs authors' style "
            f"{a['peak_rss_mib']:.0f} MiB ({s['peak_rss_mib'] - a['peak_rss_mib']:+.0f} MiB; "
            f"above base {ds:.0f} vs {da:.0f} MiB; target: clearly below: "
            f"{'MET' if s['peak_rss_mib'] < a['peak_rss_mib'] - 0.05 * da else 'NOT MET'})"
        )
        if not math.isnan(s["step_ms_mean"]):
            out.append(
                f"step time: safegrad {s['step_ms_mean']:.1f} ms vs authors' style "
                f"{a['step_ms_mean']:.1f} ms ({a['step_ms_mean'] / s['step_ms_mean']:.2f}x)"
            )
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="demo,cpu-large")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda (bf16 autocast; memory is then not measured: RSS is host memory)",
    )
    add_threads_argument(p)
    p.add_argument(
        "--cost-study",
        action="store_true",
        help="issue 13's variants per config (sft, safegrad live/cache/every=4/cache+every=4, "
        "sft and safegrad live/cache/cache+every=4 with +fused, the top-64 store with and "
        "without +fused, alignment batch 1/2 and 1/4 "
        "of the task batch) instead of --methods",
    )
    p.add_argument("--tiny", action="store_true", help="tiny config, 2 steps (smoke test)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps run in each memory subprocess")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--memory-only", action="store_true", help="only the memory subprocesses (no timing)"
    )
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--csv", default=str(RESULTS_DIR / "step.csv"))
    p.add_argument("--md", default=str(RESULTS_DIR / "step.md"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.configs, args.steps, args.warmup, args.mem_steps = "tiny", 2, 1, 1
    configs = [c for c in args.configs.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        parse_variant(m)  # a typo fails before any model is built
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(configs[0], methods[0], args.steps, args.seed)))
        return []

    if args.device != "cpu":
        args.no_memory = True
    prov = provenance(torch.device(args.device))
    header = run_header(prov)
    print(f"# {header}")
    all_results, md = (
        [],
        [
            "# bench_step results",
            "",
            f"- {header}",
            f"- command: `python -m benchmarks.bench_step {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- {args.steps} timed steps after {args.warmup} warm-up steps (both rounded up to "
            "whole refresh periods, see each config), the methods stepped round-robin in a "
            "rotated order in one process (they share the machine's noise); phase times are means "
            f"per step in ms; peak = VmHWM of a fresh process running {args.mem_steps} steps of "
            "that method alone; base = its RSS after building model, optimizer and batches",
            "",
        ],
    )
    for config in configs:
        t0 = time.perf_counter()
        run_methods = cost_study(config) if args.cost_study else methods
        if args.memory_only:
            results = [_untimed(config, m, args.seed) for m in run_methods]
        else:
            results = time_methods(
                config, run_methods, args.steps, args.warmup, args.seed, args.device
            )
        print(f"# {config}: timed {len(run_methods)} methods in {time.perf_counter() - t0:.0f} s")
        for r in results:
            mem = {"base_rss_mib": math.nan, "peak_rss_mib": math.nan}
            if not args.no_memory:
                mem = measure_memory(config, r["method"], args.mem_steps, args.seed)
            r.update(mem)
            print(
                f"# {config}/{r['method']}: {r['step_ms_mean']:.1f} ms/step, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB"
            )
        r0 = results[0]
        cfg_kwargs, bsz, seq = CONFIGS[config]
        lora = (
            ",".join(CONFIG_LORA_TARGETS[config]) if config in CONFIG_LORA_TARGETS else "all linear"
        )
        title = (
            f"{config}: hidden {cfg_kwargs['hidden_size']}, {cfg_kwargs['num_hidden_layers']} "
            f"layers, {r0['model_params'] / 1e6:.1f}M params, LoRA r=8 {lora} "
            f"{r0['lora_params'] / 1e3:.0f}k params, batch {bsz} x {seq} tokens"
        )
        lines = table(results)
        ratios = ratio_table(results)
        said = [*verdicts(results), *target_verdicts(config, results)]
        load_now = " ".join(f"{x:.2f}" for x in os.getloadavg())
        note = f"load average at the end of this config {load_now}"
        if not args.memory_only:
            note = (
                f"{r0['steps']} timed steps after {r0['warmup']} warm-up steps (whole periods "
                f"of {r0['period']} steps); {note}"
            )
        print(f"\n## {title}\n")
        print("\n".join(lines))
        print()
        print("\n".join(ratios))
        for v in said:
            print(f"# {v}")
        print(f"# {note}")
        md += [f"## {title}", "", *lines, "", *ratios, "", *[f"- {v}" for v in said]]
        md += [f"- {note}", ""]
        all_results.extend(results)
    if not args.no_save:
        fields = [
            *RUN_FIELDS,
            "config",
            "method",
            "model_params",
            "lora_params",
            "steps",
            "step_ms_mean",
            "step_ms_median",
            *[f"{p}_ms" for p in PHASES],
            "base_rss_mib",
            "peak_rss_mib",
        ]
        rows = [
            {
                **prov,
                **{k: r[k] for k in ("config", "method", "model_params", "lora_params", "steps")},
                "step_ms_mean": f"{r['step_ms_mean']:.3f}",
                "step_ms_median": f"{r['step_ms_median']:.3f}",
                **{f"{p}_ms": f"{r['phases_ms'][p]:.4f}" for p in PHASES},
                "base_rss_mib": f"{r['base_rss_mib']:.1f}",
                "peak_rss_mib": f"{r['peak_rss_mib']:.1f}",
            }
            for r in all_results
        ]
        append_csv(Path(args.csv), fields, rows)
        Path(args.md).write_text("\n".join(md) + "\n")
        print(f"# appended {len(all_results)} rows to {args.csv}; tables in {args.md}")
    return all_results


if __name__ == "__main__":
    main()
