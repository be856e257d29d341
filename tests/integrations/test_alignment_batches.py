"""AlignmentSchedule without a Trainer: passes, reshuffles, planning, exact resume, ranks."""

from __future__ import annotations

import random

import pytest
import torch

from safegrad_kernels.integrations.alignment_batches import AlignmentSchedule, alignment_loader
from safegrad_kernels.losses import response_token_count


def examples(n, seed):
    """Rows of different lengths with a prompt part (-100) and 1..5 response tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 9, (), generator=gen))
        ids = torch.randint(3, 50, (length,), generator=gen)
        labels = ids.clone()
        labels[: length - 1 - i % 5] = -100
        out.append({"input_ids": ids, "labels": labels, "row": i})
    return out


def collate(items):
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    for b, x in enumerate(items):
        ids[b, : len(x["input_ids"])] = x["input_ids"]
        labels[b, : len(x["labels"])] = x["labels"]
    return {"input_ids": ids, "labels": labels, "rows": [x["row"] for x in items]}


def schedule(data, batch_size, seed, consumed=0, **kw):
    def make(epoch):
        return alignment_loader(data, collate, batch_size=batch_size, seed=seed, epoch=epoch, **kw)

    return AlignmentSchedule(make, consumed_before=lambda: consumed)


def draw(s, n):
    return [s.next_batch()[0] for _ in range(n)]


@pytest.mark.parametrize(("n", "batch_size"), [(7, 3), (5, 5), (11, 2), (3, 4)])
def test_each_pass_is_a_fresh_permutation(n, batch_size):
    seed = random.randrange(1000)
    per_pass = -(-n // batch_size)
    s = schedule(examples(n, seed), batch_size, seed)
    passes = []
    for _ in range(3):
        batches = draw(s, per_pass)
        assert all(len(b) == batch_size for b in batches[:-1])
        passes.append([i for b in batches for i in b])
        assert sorted(passes[-1]) == list(range(n))
    assert s.epoch == 2  # three passes: epochs 0, 1, 2 (the third not yet exhausted)
    if n > 3:
        assert passes[0] != passes[1] or passes[1] != passes[2]  # reshuffled per pass


def test_batches_carry_their_dataset_indices():
    data = examples(9, 0)
    s = schedule(data, 4, seed=random.randrange(1000))
    for _ in range(5):
        indices, batch = s.next_batch()
        assert batch["rows"] == indices


@pytest.mark.parametrize("consumed", [0, 1, 4, 5, 9, 13])
def test_resume_continues_exactly_where_the_run_stopped(consumed):
    """A schedule told that `consumed` batches were drawn goes on as the uninterrupted one."""
    seed = random.randrange(1000)
    data = examples(9, seed)  # 3 batches of 3 per pass
    whole = draw(schedule(data, 3, seed), consumed + 7)
    resumed = schedule(data, 3, seed, consumed=consumed)
    assert draw(resumed, 7) == whole[consumed:]
    assert resumed.epoch == (consumed + 6) // 3


def test_same_seed_same_order_other_seed_other_order():
    data = examples(13, 1)
    a, b, c = (draw(schedule(data, 2, seed), 14) for seed in (3, 3, 4))
    assert a == b and a != c


def test_plan_counts_the_response_tokens_of_the_steps_batches():
    seed = random.randrange(1000)
    data = examples(10, seed)
    s, twin = schedule(data, 3, seed), schedule(data, 3, seed)
    for micro_batches in (2, 0, 3, 1):
        s.plan(micro_batches, "cpu")
        assert s.planned
        expected = [twin.next_batch() for _ in range(micro_batches)]
        if micro_batches:
            count = sum(int(response_token_count(b["labels"])) for _, b in expected)
            assert s.num_items.item() == count and s.num_items.device.type == "cpu"
        for indices, _ in expected:
            assert s.pop()[0] == indices
        assert s.pop() is None  # the step's batches are used up
        s.end_step()
        assert not s.planned


def test_pop_before_plan_raises():
    s = schedule(examples(4, 0), 2, seed=0)
    with pytest.raises(RuntimeError, match="plan"):
        s.pop()


def test_consumed_before_is_asked_once_at_the_first_draw():
    calls = []
    data = examples(6, 0)

    def consumed():
        calls.append(1)
        return 4

    s = AlignmentSchedule(
        lambda e: alignment_loader(data, collate, batch_size=2, seed=0, epoch=e),
        consumed_before=consumed,
    )
    assert calls == []  # not at construction: a checkpoint may still restore the step
    s.plan(2, "cpu")
    s.next_batch()
    assert calls == [1] and s.epoch == 2  # 4 + 3 draws of 3 per pass


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_pass(world_size):
    seed = random.randrange(1000)
    data = examples(12, seed)
    per_rank = 12 // world_size
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            loader = alignment_loader(
                data, collate, batch_size=2, seed=seed, epoch=epoch, world_size=world_size,
                rank=rank,
            )  # fmt: skip
            rows = [i for indices, _ in loader for i in indices]
            assert len(rows) == per_rank
            seen += rows
        assert sorted(seen) == list(range(12))
