"""The fine-tuning methods: one registry entry each, read by every training loop.

An entry says what a method asks of a training loop, never how the loop is written: its
hyperparameters (each with its default and its one check), whether an optimizer step
needs an alignment gradient and from which loss, how that loss is weighted, on which
steps it is computed, and how the method's surgeon is built. ``SafeGradTrainer``, the
``safegrad train`` command, the demo and ``benchmarks/bench_step.py`` dispatch on these
fields, not on the method's name, so a new method or option is one entry here (plus its
tests).

Per optimizer step a loop does, for a method ``m`` with validated ``settings``::

    surgeon = m.build_surgeon(params, settings, seed=seed)      # once; None: no surgery
    if m.alignment_due(surgeon):
        loss = alignment loss of kind m.alignment_loss (a default; a loop may let the
               user choose another from ALIGNMENT_LOSSES), times m.loss_weight(settings)
        backward inside surgeon.reference(), or straight into p.grad without a surgeon
    task loss backward
    if surgeon is not None: surgeon.step()

This module imports nothing above the surgery layer (no transformers, no losses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..ops.validate import check_scalar
from .base import Surgeon, check_backend, check_choice, check_int
from .safegrad import GRANULARITIES, SafeGrad, refreshes_before
from .spf import MODES as SPF_MODES
from .spf import SPF

__all__ = [
    "ALIGNMENT_LOSSES",
    "HYPERPARAMETERS",
    "METHODS",
    "Hyperparameter",
    "Method",
    "get_method",
]

# "kl": KL(P_ref || P_theta) against the adapter-free model; "ce": cross-entropy on the
# alignment set's answers (safe responses).
ALIGNMENT_LOSSES = ("kl", "ce")

Settings = Mapping[str, Any]
SurgeonFactory = Callable[[Iterable[Tensor], Settings, int, str | None], Surgeon]


@dataclass(frozen=True)
class Hyperparameter:
    """One option of a method: its name, type, default and its one check.

    ``check(name, value)`` returns the normalised value or raises a ``TypeError`` /
    ``ValueError`` naming the argument. ``type`` and ``choices`` are what a command line
    needs to parse it (``None`` in ``default`` means "unset", e.g. SPF's one-off basis).
    """

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[str, Any], Any]
    choices: tuple[str, ...] | None = None

    def validate(self, value: Any) -> Any:
        return self.check(self.name, value)


def _non_negative(name: str, default: float, help: str) -> Hyperparameter:
    return Hyperparameter(name, float, default, help, check_scalar)


def _at_least_one(
    name: str, default: int | None, help: str, *, optional: bool = False
) -> Hyperparameter:
    def check(arg: str, value: Any) -> int | None:
        return check_int(arg, value, minimum=1, allow_none=optional)

    return Hyperparameter(name, int, default, help, check)


def _choice(name: str, choices: tuple[str, ...], default: str, help: str) -> Hyperparameter:
    def check(arg: str, value: Any) -> str:
        return check_choice(arg, value, choices)

    return Hyperparameter(name, str, default, help, check, choices)


RHO = _non_negative("rho", 1.0, "weight of the alignment gradient added back (safegrad; paper: 1)")
SURGERY_GRANULARITY = _choice(
    "surgery_granularity",
    GRANULARITIES,
    "global",
    "one projection over all trainable tensors (the paper) or one per tensor (safegrad)",
)
SPF_RANK = _at_least_one("spf_rank", 8, "safety subspace rank per weight matrix (spf)")
SPF_REFRESH_EVERY = _at_least_one(
    "spf_refresh_every",
    None,
    "recompute the safety subspace every this many optimizer steps (spf; None: once)",
    optional=True,
)
SPF_MODE = _choice(
    "spf_mode",
    SPF_MODES,
    "conflicting",
    "remove the subspace component only where it conflicts, or always (spf)",
)
LAM = _non_negative("lam", 1.0, "weight of the alignment loss added to the task loss (mixed)")
# Only SafeGrad takes it: its surgeon keeps g_a between refreshes. Mixed has no surgeon,
# and reusing a stale g_a there would change what the baseline is (the gradient of
# task + lam * KL at the current weights); SPF has its own spf_refresh_every.
ALIGNMENT_EVERY = _at_least_one(
    "alignment_every",
    1,
    "compute the alignment gradient every this many optimizer steps and reuse it in "
    "between (safegrad; 1: every step)",
)


def _safegrad(params: Iterable[Tensor], s: Settings, seed: int, backend: str | None) -> Surgeon:
    return SafeGrad(
        params,
        rho=s["rho"],
        granularity=s["surgery_granularity"],
        alignment_every=s["alignment_every"],
        backend=backend,
    )


def _spf(params: Iterable[Tensor], s: Settings, seed: int, backend: str | None) -> Surgeon:
    # No backend: SPF's work is batched torch matmuls, not the fused ops.
    return SPF(
        params,
        rank=s["spf_rank"],
        refresh_every=s["spf_refresh_every"],
        mode=s["spf_mode"],
        seed=seed,
    )


def _refreshes_before(period: str) -> Callable[[int, Settings], int]:
    """Steps before ``step`` among 0, k, 2k, ... (step 0 alone for k = None), k = s[period]."""

    def count(step: int, s: Settings) -> int:
        # The surgeon wants a reference on exactly those steps, and a loop supplies one
        # whenever it wants it (Method.alignment_due).
        k = s[period]
        return min(step, 1) if k is None else -(-step // k)

    return count


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, as a training loop needs to know it.

    Fields:
        name, description: what ``--method`` takes and a one-line summary.
        hyperparameters: the options this method reads.
        alignment_loss: the alignment loss it uses by default (one of
            ``ALIGNMENT_LOSSES``), or ``None`` when it needs no alignment gradient.
        loss_weight_from: the hyperparameter that scales the alignment loss (``"lam"``
            for the mixed objective); ``None``: weight 1.
        surgeon: builds the surgeon from ``(params, settings, seed, backend)``; ``None``
            when the gradients are used as autograd leaves them.
        alignment_steps: how many of the first ``step`` optimizer steps run the
            alignment pass, given the settings (exact resume); ``None``: all of them.
    """

    name: str
    description: str
    hyperparameters: tuple[Hyperparameter, ...] = ()
    alignment_loss: str | None = None
    loss_weight_from: str | None = None
    surgeon: SurgeonFactory | None = field(default=None, repr=False)
    alignment_steps: Callable[[int, Settings], int] | None = field(default=None, repr=False)
    # How the update acts on a flat slice of the gradient (DeepSpeed ZeRO's per-rank
    # partitions, which cut tensors apart): "project" (one global projection over the
    # slices as shards), "add" (g += weight * g_a, elementwise), or None (the method needs
    # whole tensors, e.g. SPF's per-matrix subspaces).
    partition_update: str | None = None

    def __post_init__(self) -> None:
        if self.alignment_loss is not None:
            check_choice("alignment_loss", self.alignment_loss, ALIGNMENT_LOSSES)
        names = [h.name for h in self.hyperparameters]
        if self.loss_weight_from is not None and self.loss_weight_from not in names:
            raise ValueError(f"{self.name}: loss_weight_from names no hyperparameter of it")

    @property
    def needs_alignment(self) -> bool:
        """Whether the method uses an alignment gradient (on some steps at least)."""
        return self.alignment_loss is not None

    @property
    def defaults(self) -> dict[str, Any]:
        """Each hyperparameter's default (what ``validate()`` returns without settings)."""
        return {h.name: h.default for h in self.hyperparameters}

    def validate(self, **settings: Any) -> dict[str, Any]:
        """This method's hyperparameters, checked, defaults filled in.

        Every setting given is checked, including those of other methods (a command line
        passes all of its options, and a bad value is an error whatever the method);
        only this method's own come back. A name that is no method's hyperparameter
        raises ``TypeError``.
        """
        known = {**HYPERPARAMETERS, **{h.name: h for h in self.hyperparameters}}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(
                f"unknown method setting(s) {unknown}; the hyperparameters are {list(known)}"
            )
        checked = {k: known[k].validate(v) for k, v in settings.items()}
        return {h.name: checked.get(h.name, h.default) for h in self.hyperparameters}

    def loss_weight(self, settings: Settings) -> float:
        """The factor on the alignment loss (``lam`` for mixed; 1 otherwise)."""
        if self.loss_weight_from is None:
            return 1.0
        return self.validate(**settings)[self.loss_weight_from]

    def build_surgeon(
        self,
        params: Iterable[Tensor],
        settings: Settings | None = None,
        *,
        seed: int = 0,
        backend: str | None = None,
    ) -> Surgeon | None:
        """The method's surgeon on ``params`` (``None`` for methods without one).

        ``settings`` are validated here (defaults for those missing); ``seed`` seeds a
        surgeon's own randomness (SPF's randomized SVD); ``backend`` picks the op backend.
        """
        backend = check_backend(backend)
        if self.surgeon is None:
            return None
        return self.surgeon(params, self.validate(**(settings or {})), seed, backend)

    def alignment_due(self, surgeon: Surgeon | None) -> bool:
        """Whether this optimizer step needs the alignment pass (host-side, no sync).

        Always for a method with an alignment loss and no surgeon (its loss is simply
        added); with a surgeon, when it wants a reference this step (SPF: refresh steps).
        """
        if not self.needs_alignment:
            return False
        return surgeon is None or surgeon.wants_reference

    def alignment_steps_before(self, step: int, settings: Settings) -> int:
        """Optimizer steps before ``step`` that ran the alignment pass (for exact resume)."""
        if not self.needs_alignment:
            return 0
        if self.alignment_steps is None:
            return step
        return self.alignment_steps(step, self.validate(**settings))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sft", "plain fine-tuning on the task loss: the baseline"),
        Method(
            "safegrad",
            "SafeGrad (arXiv 2508.07172): the task gradient projected off the KL alignment "
            "gradient where they conflict, rho times the alignment gradient added back",
            (RHO, SURGERY_GRANULARITY, ALIGNMENT_EVERY),
            alignment_loss="kl",
            surgeon=_safegrad,
            alignment_steps=lambda step, s: refreshes_before(step, s["alignment_every"]),
            partition_update="project",
        ),
        Method(
            "spf",
            "SPF (arXiv 2601.10141): the task gradient's conflicting component in a low-rank "
            "safety subspace removed",
            (SPF_RANK, SPF_REFRESH_EVERY, SPF_MODE),
            # Cross-entropy on the safe answers: the KL gradient of a fresh LoRA is zero at
            # step 0 (model == reference), which would leave a once-computed basis empty.
            alignment_loss="ce",
            surgeon=_spf,
            alignment_steps=_refreshes_before("spf_refresh_every"),
        ),
        Method(
            "mixed",
            "multi-objective baseline: task loss + lam * KL alignment loss",
            (LAM,),
            alignment_loss="kl",
            loss_weight_from="lam",
            partition_update="add",
        ),
    )
}


def _all_hyperparameters() -> dict[str, Hyperparameter]:
    out: dict[str, Hyperparameter] = {}
    for m in METHODS.values():
        for h in m.hyperparameters:
            if out.setdefault(h.name, h) is not h:
                raise ValueError(f"two different hyperparameters are called {h.name!r}")
    return out


# Every method's options, each defined once: two methods that share one share the object.
HYPERPARAMETERS: dict[str, Hyperparameter] = _all_hyperparameters()


def get_method(name: object) -> Method:
    """The registry entry called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return METHODS[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}") from None
