"""Which alignment micro-batches each optimizer step uses, and where a resumed run goes on.

The alignment set is small (the papers use 100 examples) and cycled: pass ``e`` over it
is a fresh shuffle seeded with ``seed + e`` (a ``DistributedSampler`` with epoch ``e``
across processes). An optimizer step that needs the alignment gradient draws one
alignment micro-batch per task micro-batch, in order, and all of them are drawn up front
(``AlignmentSchedule.plan``) so that their response tokens can be counted before the
first backward: each micro-batch's loss is normalised by that step-wide count, as the
Trainer normalises the task loss.

Exact resume: a run restarted at optimizer step ``s`` must draw what the uninterrupted
run would have drawn from step ``s`` on. The number of batches drawn before ``s`` is a
closed form of the method (``Method.alignment_steps_before`` times the micro-batches per
step), so nothing extra goes into a checkpoint: the first draw skips that many batches,
``divmod`` by the batches per pass giving the pass and the position in it.

Every loader gets its own seeded ``torch.Generator``: without one, a new iterator draws
its base seed from the global RNG, which a checkpoint saved, and a resumed run's dropout
would shift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..losses import response_token_count

__all__ = ["AlignmentSchedule", "alignment_loader"]

# (dataset indices of the rows, the collated batch)
Batch = tuple[list[int], dict[str, Any]]


class _Indexed(Dataset):
    """Yields ``(index, example)`` so that cached reference logits can be keyed by index."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class _IndexedCollator:
    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> Batch:
        return [i for i, _ in items], self.collate([x for _, x in items])


def alignment_loader(
    dataset: Any,
    collate: Callable[[list[Any]], dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Pass ``epoch`` over ``dataset`` as ``(indices, batch)`` micro-batches, shuffled by ``seed``."""
    indexed = _Indexed(dataset)
    if world_size > 1:
        sampler = DistributedSampler(
            indexed, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(indexed, generator=torch.Generator().manual_seed(seed + epoch))
    return DataLoader(
        indexed,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=_IndexedCollator(collate),
        num_workers=0,
        generator=torch.Generator().manual_seed(seed + epoch),
    )


class AlignmentSchedule:
    """Draws alignment micro-batches pass after pass and hands them out step by step.

    Args:
        make_loader: ``epoch -> loader`` of ``(indices, batch)`` for that pass (e.g.
            ``alignment_loader`` with the run's dataset, collator and seed). Every pass
            must have the same number of batches.
        consumed_before: how many batches an earlier, interrupted run already drew;
            called once, at the first draw (after a checkpoint has restored the step).

    Per optimizer step: ``plan(n, device)`` draws the step's ``n`` micro-batches (``0``
    when the step needs no alignment pass) and their response-token count ``num_items``
    (on ``device``, counted on the host-side labels: no sync); ``pop()`` hands out the
    next one; ``end_step()`` drops what is left.
    """

    def __init__(
        self, make_loader: Callable[[int], DataLoader], *, consumed_before: Callable[[], int]
    ) -> None:
        self.make_loader = make_loader
        self.consumed_before = consumed_before
        self.epoch = 0
        self._iter: Iterator[Batch] | None = None
        self._positioned = False
        self._plan: list[Batch] | None = None
        self.num_items: Tensor | None = None

    def next_batch(self) -> Batch:
        """The next alignment micro-batch, starting a new pass when one runs out."""
        skip = 0
        if not self._positioned:
            # First draw of this process: continue where a resumed run left off.
            self._positioned = True
            self.epoch, skip = divmod(self.consumed_before(), len(self.make_loader(0)))
        while True:
            if self._iter is None:
                self._iter = iter(self.make_loader(self.epoch))
                for _ in range(skip):
                    next(self._iter)
                skip = 0
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1

    def plan(self, num_micro_batches: int, device: torch.device | str | None = None) -> None:
        """Draw this optimizer step's micro-batches and count their response tokens."""
        plan = [self.next_batch() for _ in range(num_micro_batches)]
        if plan:
            count = sum(response_token_count(batch["labels"]) for _, batch in plan)
            self.num_items = torch.as_tensor(count).to(device)
        self._plan = plan

    @property
    def planned(self) -> bool:
        """Whether ``plan`` ran for the current step (even with 0 micro-batches)."""
        return self._plan is not None

    def pop(self) -> Batch | None:
        """The step's next planned micro-batch; ``None`` when none is left."""
        if self._plan is None:
            raise RuntimeError("AlignmentSchedule.pop() before plan() for this step")
        return self._plan.pop(0) if self._plan else None

    def end_step(self) -> None:
        self._plan = None
