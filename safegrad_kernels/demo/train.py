"""The demo's two training stages.

1. Alignment (full fine-tune of the random model, cached): benign instructions plus
   harmful prompts answered with refusals, giving the "aligned foundation model".
2. User stage (fresh LoRA adapter per run): the user's sentiment set with a fraction p
   of harmful prompt -> harmful answer pairs, trained with one of the registry's methods
   (``safegrad_kernels.surgery.METHODS``):

   ``sft``       task loss only;
   ``mixed``     task + lambda * KL(P_ref || P_theta) on the defender's safety batch;
   ``safegrad``  SafeGrad: g_u projected off g_a where they conflict, plus rho * g_a;
   ``spf``       SPF: g_u loses its conflicting part in the low-rank safety subspace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..losses import response_ce
from ..surgery import methods as registry
from ..surgery.stats import SPFStats
from . import world
from .model import ModelSpec, build_model, cache_key, cache_load, cache_save

# The registry's methods in report order: the baselines (no surgeon) first.
METHODS = tuple(sorted(registry.METHODS, key=lambda m: registry.METHODS[m].surgeon is not None))
# The hyperparameters the demo sweeps (``--rho``, ``--lam``); a method reads at most one.
SWEPT = ("rho", "lam")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AlignSpec:
    """Alignment-stage recipe (the feasibility run's, see BACKGROUND.md)."""

    samples: int = 6000
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    # Without smoothing the feasibility model was so confident that a LoRA adapter could
    # not move it cleanly; 0.1 kept the logits finite-margin.
    label_smoothing: float = 0.1
    harmful_share: float = 0.35
    seed: int = 0
    max_len: int = 48


@dataclass(frozen=True)
class UserSpec:
    """User-stage recipe: LoRA r=8/alpha=16 as the paper's scripts; lr and steps scaled down."""

    samples: int = 800
    epochs: int = 3  # 150 steps; at 100 (2 epochs) sft p=0.3 reached only FA 52%
    batch_size: int = 16
    # At 1e-3 (the feasibility run's) 124 steps left both the task and the poison
    # unlearned here (sft p=0.3: FA 44%, HS 15%); 3e-3 learns both (FA 94%, HS 78%).
    lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    safety_samples: int = 100  # the paper's 100 alignment samples
    # Template groups of the defender's safety set; adding "poison" is the easy world in
    # which the defender has seen the attacker's templates (an ablation, not the default).
    safety_groups: tuple[str, ...] = world.ALIGNMENT_GROUPS
    spf_rank: int = 4
    spf_refresh_every: int = 10
    max_len: int = 48


@dataclass
class RunLog:
    """What one user-stage run measured besides the final model."""

    steps: int = 0
    seconds: float = 0.0
    surgery_seconds: float = 0.0  # time inside the surgery call itself (step/dot_norms)
    stats: list[dict] = field(default_factory=list)
    alignment_passes: int = 0  # steps that computed the safety gradient
    # A top-k reference store's reference mass outside the top k (largest, mean over its
    # rows): what its KL error bound is made of (``reference_store``); None otherwise.
    tail_mass: tuple[float, float] | None = None

    def summary(self) -> dict:
        """Timings and conflict statistics over the steps that had an alignment signal.

        ``conflict_share``: share of those steps with ``<g_u, g_a> < 0`` (for SPF: mean
        share of weight matrices whose task gradient conflicts with the safety subspace).
        """
        live = [s for s in self.stats if s["live"]]
        cosines = [s["cosine"] for s in live if s["cosine"] is not None]
        return {
            "steps": self.steps,
            "ms_per_step": 1e3 * self.seconds / max(self.steps, 1),
            "surgery_ms_per_step": 1e3 * self.surgery_seconds / max(self.steps, 1),
            "conflict_share": _mean([s["conflict"] for s in live]),
            "mean_cosine": _mean(cosines),
            # SafeGrad's update is g_u + (rho - coef) * g_a: -coef is the weight its
            # projection adds to the alignment gradient on top of rho.
            "projection_coef": _mean([s["coef"] for s in live if "coef" in s]),
            "stat_steps": len(live),
            "alignment_passes": self.alignment_passes,
            "reference_tail_mass": None if self.tail_mass is None else list(self.tail_mass),
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def swept(method: str) -> str | None:
    """The hyperparameter of ``method`` that the demo sweeps (``rho``, ``lam``) or ``None``."""
    names = [h.name for h in registry.get_method(method).hyperparameters]
    return next((n for n in SWEPT if n in names), None)


def _batches(data: dict[str, torch.Tensor], batch_size: int, gen: torch.Generator):
    """Endless shuffled mini-batches (epoch after epoch), trimmed to their longest row."""
    n = data["input_ids"].shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield _take(data, idx)


def _take(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    width = int(data["attention_mask"][idx].sum(1).max())
    return {k: v[idx, :width] if v.dim() > 1 else v[idx] for k, v in data.items()}


def _cosine_lr(opt: torch.optim.Optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- stage 1: alignment ------------------------------------------------------------


def align(
    tok: world.WordTokenizer,
    mspec: ModelSpec,
    aspec: AlignSpec,
    progress: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """Full fine-tune of a fresh model on benign instructions and refusals."""
    model = build_model(mspec, len(tok), aspec.seed)
    data = world.encode_batch(
        tok,
        world.alignment_stage_data(aspec.samples, aspec.seed, aspec.harmful_share),
        aspec.max_len,
    )
    gen = torch.Generator().manual_seed(aspec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=aspec.lr, weight_decay=0.01)
    sched = _cosine_lr(opt, aspec.steps, max(aspec.steps // 20, 1))
    model.train()
    batches = _batches(data, aspec.batch_size, gen)
    for _ in range(aspec.steps):
        batch = next(batches)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = response_ce(logits, batch["labels"], label_smoothing=aspec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    model.eval()
    return model


def aligned_state(
    tok: world.WordTokenizer,
    mspec: ModelSpec,
    aspec: AlignSpec,
    *,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The aligned model's state dict, from the cache when possible; plus how it was obtained."""
    key = cache_key(mspec, aspec, extra={"vocab": tok.words})
    if use_cache:
        entry = cache_load(key)
        if entry is not None:
            return entry["state_dict"], {**entry["info"], "cache": "hit", "key": key}
    start = time.perf_counter()
    model = align(tok, mspec, aspec, progress)
    info = {"seconds": time.perf_counter() - start, "steps": aspec.steps}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if use_cache:
        path = cache_save(key, {"state_dict": state, "info": info})
        return state, {**info, "cache": "miss", "key": key, "path": str(path)}
    return state, {**info, "cache": "off", "key": key}


# --- stage 2: user fine-tuning -----------------------------------------------------


def warm_up_ops() -> None:
    """Load (and on first use build) the op backend before any run is timed.

    The C++ backend compiles on its first call in a fresh environment; uncharged, that
    one-off showed up as 225 ms/step of "surgery" in the first SafeGrad run measured.
    """
    from safegrad_kernels import dot_norms, project_conflicting_

    g, r = [torch.randn(33)], [torch.randn(33)]
    dot_norms(g, r)
    project_conflicting_(g, r, rho=1.0)


def lora_model(state: dict[str, torch.Tensor], tok, mspec: ModelSpec, uspec: UserSpec, seed: int):
    """The aligned model with a fresh LoRA adapter (B = 0, so it starts equal to P_ref)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(mspec, len(tok), seed)
    base.load_state_dict(state)
    config = LoraConfig(
        r=uspec.lora_r,
        lora_alpha=uspec.lora_alpha,
        target_modules=list(uspec.lora_targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(base, config)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**_inputs(batch)).logits


def _head_inputs(model, batch: dict[str, torch.Tensor]):
    """The LM head's input and weights for ``fused_loss`` (``fused_head``); never the logits
    path in its place: a demo run that asked for the fused losses must have run them."""
    from safegrad_kernels.integrations.fused_head import hidden_states_and_head

    head = hidden_states_and_head(model, _inputs(batch))
    if head is None:
        raise RuntimeError("fused_loss: the demo model's LM head is not reachable (logged why)")
    return head


def _check_options(alignment_batch_size, reference_top_k, fused_loss) -> None:
    for name, value in (("alignment_batch_size", alignment_batch_size),
                        ("reference_top_k", reference_top_k)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not isinstance(fused_loss, bool):
        raise TypeError(f"fused_loss must be a bool, got {type(fused_loss).__name__}")


def user_stage(
    state: dict[str, torch.Tensor],
    tok: world.WordTokenizer,
    mspec: ModelSpec,
    uspec: UserSpec,
    *,
    method: str,
    weight: float,
    harmful_ratio: float,
    seed: int,
    alignment_every: int = 1,
    alignment_batch_size: int | None = None,
    reference_top_k: int | None = None,
    fused_loss: bool = False,
    progress: Callable[[int], None] | None = None,
    paired_batches: bool = False,
) -> tuple[torch.nn.Module, RunLog]:
    """Fine-tune a fresh adapter with ``method``; ``weight`` is its swept hyperparameter.

    (``swept(method)``: lambda for mixed, rho for safegrad; ignored by the others.)
    ``paired_batches``: draw the user batches and the safety batches from two generators,
    so that a seed fixes the user batch order whatever the method (``safegrad study``).
    ``alignment_every``: SafeGrad's refresh period k (the registry's setting; the other
    methods ignore it): the safety batch is drawn and its gradient computed on steps
    0, 1, k, 2k, ... only (``SafeGrad.refresh_due``).

    The other step-cost options of ``SafeGradTrainer``, so that the study can measure what
    they cost in safety: ``alignment_batch_size`` safety examples a step (default the
    task batch size, at most the pool); ``reference_top_k``: the reference kept as a
    top-k ``ReferenceStore`` (the top k log-probabilities of each response position and
    the tail mass) instead of the exact logits; ``fused_loss``: the task cross-entropy
    and the KL computed from the LM head's input (``fused_losses``), the reference from
    an exact (fp32) store unless ``reference_top_k``.
    """
    _check_options(alignment_batch_size, reference_top_k, fused_loss)
    spec = registry.get_method(method)
    settings = {
        "spf_rank": uspec.spf_rank,
        "spf_refresh_every": uspec.spf_refresh_every,
        "alignment_every": alignment_every,
    }
    name = swept(method)
    if name is not None:
        settings[name] = weight
    settings = spec.validate(**settings)
    from safegrad_kernels import dot_norms
    from safegrad_kernels.fused_losses import (
        fused_linear_cross_entropy,
        fused_linear_kl,
        kl_from_reference,
    )
    from safegrad_kernels.integrations.peft import lora_parameters
    from safegrad_kernels.losses import kl_alignment_loss
    from safegrad_kernels.reference_store import ReferenceStore

    model = lora_model(state, tok, mspec, uspec, seed)
    params = list(lora_parameters(model))
    user = world.encode_batch(
        tok, world.user_data(uspec.samples, harmful_ratio, seed), uspec.max_len
    )
    safety = world.encode_batch(
        tok,
        world.safety_data(uspec.safety_samples, seed + 10_000, uspec.safety_groups),
        uspec.max_len,
    )
    # P_ref never changes, so its logits on the (fixed) safety pool are computed once,
    # through the same PeftModel with the adapter disabled: no second model copy, and
    # one forward per step saved against recomputing them every step as the paper does.
    store = None
    if reference_top_k is None and not fused_loss:
        with model.disable_adapter(), torch.no_grad():
            safety["ref_logits"] = _forward(model, safety)
    else:  # the trainer's cache_reference: a store built once, before the first step
        safety["index"] = torch.arange(safety["input_ids"].shape[0])
        with model.disable_adapter():
            store = ReferenceStore.build(
                lambda batch: _forward(model, batch),
                [(safety["index"].tolist(), safety)],
                top_k=reference_top_k,
            )

    gen = torch.Generator().manual_seed(seed)
    user_batches = _batches(user, uspec.batch_size, gen)
    # --- paired design (issue 15): with one generator, every safety epoch's permutation
    # shifts the user order from the second epoch on, so sft and spf (which draw fewer
    # safety batches) saw other user batches than mixed and safegrad for the same seed.
    # The default keeps the demo's published numbers reproducible.
    safety_gen = torch.Generator().manual_seed(seed + 20_000) if paired_batches else gen
    # ---
    safety_batch = min(alignment_batch_size or uspec.batch_size, uspec.safety_samples)
    safety_batches = _batches(safety, safety_batch, safety_gen)
    steps = uspec.epochs * (uspec.samples // uspec.batch_size)
    opt = torch.optim.AdamW(params, lr=uspec.lr, weight_decay=0.0)

    def task_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if fused_loss:
            hidden, weight, bias = _head_inputs(model, batch)
            return fused_linear_cross_entropy(hidden, weight, batch["labels"], bias=bias)
        return response_ce(_forward(model, batch), batch["labels"])

    def kl_loss() -> torch.Tensor:
        sb = next(safety_batches)
        if store is None:
            return kl_alignment_loss(_forward(model, sb), sb["ref_logits"], sb["labels"])
        ref = store.get(sb["index"].tolist(), labels=sb["labels"])
        if fused_loss:
            hidden, weight, bias = _head_inputs(model, sb)
            return fused_linear_kl(hidden, weight, sb["labels"], ref, bias=bias)
        return kl_from_reference(_forward(model, sb), ref, sb["labels"])

    def safety_ce() -> torch.Tensor:
        return task_loss(next(safety_batches))

    # SPF's safety loss is cross-entropy on the refusals (the registry's default for it):
    # its subspace is taken from the safety gradient itself, and the KL gradient is zero
    # at step 0 (fresh adapter), which would leave SPF an empty subspace.
    safety_loss = {"kl": kl_loss, "ce": safety_ce}.get(spec.alignment_loss)
    safety_weight = spec.loss_weight(settings)

    def weighted_safety_loss() -> torch.Tensor:
        loss = safety_loss()
        return loss if safety_weight == 1.0 else safety_weight * loss

    surgeon = spec.build_surgeon(params, settings)

    log = RunLog()
    if store is not None and store.top_k is not None:
        log.tail_mass = (store.tail_mass_max, store.tail_mass_mean)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        ub = next(user_batches)
        opt.zero_grad(set_to_none=True)
        if not spec.needs_alignment:
            task_loss(ub).backward()
        elif surgeon is None:  # the safety loss is added to the task loss (mixed)
            # g_u and lambda*g_a are formed separately only to record their conflict;
            # the update is their sum, exactly the gradient of task + lambda * KL.
            task_loss(ub).backward()
            g_u = [p.grad.clone() for p in params]
            opt.zero_grad(set_to_none=True)
            weighted_safety_loss().backward()
            log.alignment_passes += 1
            t0 = time.perf_counter()
            sums = dot_norms(g_u, [p.grad for p in params]).tolist()
            for p, g in zip(params, g_u):
                p.grad.add_(g)
            log.surgery_seconds += time.perf_counter() - t0
            log.stats.append(_conflict_record(*sums))
        else:
            if spec.alignment_due(surgeon):
                with surgeon.reference():
                    weighted_safety_loss().backward()
                log.alignment_passes += 1
            task_loss(ub).backward()
            t0 = time.perf_counter()
            stats = surgeon.step()
            log.surgery_seconds += time.perf_counter() - t0
            log.stats.append(_surgery_record(stats))
        opt.step()
        log.steps += 1
        if progress is not None:
            progress(1)
    log.seconds = time.perf_counter() - start
    model.eval()
    return model, log


def _surgery_record(stats) -> dict:
    # Reading the stats syncs the host; on CPU that costs nothing and the demo wants the
    # per-step conflict record.
    d = stats.to_dict()
    if isinstance(stats, SPFStats):  # a basis from step 0 on: its safety loss is not zero
        return {"live": True, "conflict": d["conflict_fraction"], "cosine": None}
    record = _conflict_record(d["dot"], d["ref_norm_sq"], d["grad_norm_sq"])
    return {**record, "coef": d["coef"]}


def _conflict_record(dot: float, rr: float, gg: float) -> dict:
    denom = math.sqrt(rr * gg)
    return {
        "live": rr > 1e-12,  # g_a = 0 at step 0: the fresh adapter equals P_ref
        "conflict": float(dot < 0),
        "cosine": dot / denom if denom > 0 else 0.0,
    }
