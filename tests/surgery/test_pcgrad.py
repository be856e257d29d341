"""pcgrad_ (the op) and PCGrad (the surgeon) against the textbook algorithm in float64."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from safegrad_kernels.ops.dispatch import available_backends
from safegrad_kernels.ops.pcgrad import pcgrad_
from safegrad_kernels.surgery import PCGrad

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]
SHAPES = [(7, 3), (13,), (5, 2, 3), (1,), (31,)]
# Relative floors per dtype, on top of 2x the textbook's own error in that dtype.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def textbook(flats: list[torch.Tensor], order: list[list[int]]) -> torch.Tensor:
    """Yu et al.'s algorithm on flat vectors, Python branches and all."""
    total = torch.zeros_like(flats[0])
    for i, gi in enumerate(flats):
        pc = gi.clone()
        for j in order[i]:
            if j == i:
                continue
            dot = pc @ flats[j]
            if dot < 0:
                pc = pc - dot / (flats[j] @ flats[j]) * flats[j]
        total = total + pc
    return total


def flat(tensors, dtype=torch.float64):
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def make_objectives(m: int, dtype: torch.dtype, conflict: bool) -> list[list[torch.Tensor]]:
    """m gradient lists sharing a strong common direction u (sign per objective)."""
    signs = [1.0] + [random.choice([-1.0, 1.0]) for _ in range(m - 1)]
    if conflict:
        signs[1] = -1.0  # at least one opposing pair
    common = [torch.randn(s) for s in SHAPES]
    return [
        [
            (sign * (1 + random.random()) * c + 0.5 * torch.randn(s)).to(dtype)
            for c, s in zip(common, SHAPES)
        ]
        for sign in signs
    ]


def random_order(m: int) -> list[list[int]]:
    return [random.sample(range(m), m) for _ in range(m)]


def check_against_textbook(lists, out, order):
    dtype = lists[0][0].dtype
    ref = textbook([flat(lst) for lst in lists], order)
    plain = textbook(
        [flat(lst, dtype).float() if dtype != torch.float32 else flat(lst, dtype) for lst in lists],
        order,
    )
    err = (flat(out) - ref).abs().max()
    allowed = 2 * (plain.double() - ref).abs().max() + FLOOR[dtype] * ref.abs().max()
    assert err <= allowed, f"error {err:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("m", [2, 3, 4, 5])
@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pcgrad_matches_textbook(m, conflict, dtype):
    lists = make_objectives(m, dtype, conflict)
    before = [[t.clone() for t in lst] for lst in lists]
    order = random_order(m)
    weights = pcgrad_(lists, order=torch.tensor(order))
    assert weights.dtype == torch.float32 and weights.shape == (m,)
    check_against_textbook(before, lists[0], order)
    for lst, old in zip(lists[1:], before[1:]):  # only lists[0] is written
        assert all(torch.equal(a, b) for a, b in zip(lst, old))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pcgrad_every_backend(backend):
    lists = make_objectives(4, torch.float32, conflict=True)
    before = [[t.clone() for t in lst] for lst in lists]
    order = random_order(4)
    pcgrad_(lists, order=torch.tensor(order), backend=backend)
    check_against_textbook(before, lists[0], order)


def test_no_conflict_gives_the_plain_sum():
    common = torch.randn(50)
    lists = [[common + 0.01 * torch.randn(50)] for _ in range(4)]
    expected = sum(lst[0] for lst in lists)
    weights = pcgrad_(lists)
    assert torch.equal(weights, torch.ones(4))
    torch.testing.assert_close(lists[0][0], expected)


def test_given_order_is_deterministic():
    lists = make_objectives(5, torch.float32, conflict=True)
    copy = [[t.clone() for t in lst] for lst in lists]
    order = torch.tensor(random_order(5))
    w1 = pcgrad_(lists, order=order)
    w2 = pcgrad_(copy, order=order)
    assert torch.equal(w1, w2)
    assert all(torch.equal(a, b) for a, b in zip(lists[0], copy[0]))


def test_generator_makes_the_random_order_reproducible():
    lists = make_objectives(4, torch.float32, conflict=True)
    copy = [[t.clone() for t in lst] for lst in lists]
    w1 = pcgrad_(lists, generator=torch.Generator().manual_seed(7))
    w2 = pcgrad_(copy, generator=torch.Generator().manual_seed(7))
    assert torch.equal(w1, w2)


def test_default_order_is_one_of_the_textbook_orders():
    # m = 3: each row has 2 possible visiting orders, 8 in all; the random default
    # must reproduce one of them.
    m = 3
    lists = make_objectives(m, torch.float32, conflict=True)
    before = [[t.clone() for t in lst] for lst in lists]
    pcgrad_(lists)
    got = flat(lists[0])
    rows = [[list(p) for p in itertools.permutations(range(m))] for _ in range(m)]
    candidates = [
        textbook([flat(lst) for lst in before], list(o)) for o in itertools.product(*rows)
    ]
    best = min((got - c).abs().max() for c in candidates)
    assert best <= 1e-5 * got.abs().max()


def test_m_equal_one_is_a_no_op():
    lists = [[torch.randn(5), torch.randn(3, 2)]]
    before = [t.clone() for t in lists[0]]
    assert torch.equal(pcgrad_(lists), torch.ones(1))
    assert all(torch.equal(a, b) for a, b in zip(lists[0], before))


def test_zero_gradient_objective_is_ignored():
    g = [torch.randn(9)]
    lists = [[g[0].clone()], [torch.zeros(9)], [-g[0] * 0.5 + 0.1 * torch.randn(9)]]
    before = [[t.clone() for t in lst] for lst in lists]
    order = random_order(3)
    weights = pcgrad_(lists, order=torch.tensor(order))
    assert torch.isfinite(weights).all()
    check_against_textbook(before, lists[0], order)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("empty", ValueError, "at least one"),
        ("not_lists", TypeError, "sequence"),
        ("order_shape", ValueError, r"shape \[3, 3\]"),
        ("order_float", TypeError, "integer"),
        ("order_not_perm", ValueError, r"order\[1\] must be a permutation"),
        ("length_mismatch", ValueError, "pair up"),
        ("shape_mismatch", ValueError, "shape mismatch"),
    ],
)
def test_bad_input_raises_and_mutates_nothing(case, exc, match):
    lists = make_objectives(3, torch.float32, conflict=True)
    kwargs = {}
    if case == "empty":
        lists = []
    elif case == "not_lists":
        lists = torch.randn(3, 4)
    elif case == "order_shape":
        kwargs["order"] = torch.zeros(3, 2, dtype=torch.int64)
    elif case == "order_float":
        kwargs["order"] = torch.zeros(3, 3)
    elif case == "order_not_perm":
        kwargs["order"] = torch.tensor([[0, 1, 2], [1, 1, 2], [2, 0, 1]])
    elif case == "length_mismatch":
        lists[2] = lists[2][:-1]
    elif case == "shape_mismatch":
        lists[1][0] = torch.randn(3, 7)
    before = [[t.clone() for t in lst] for lst in lists] if isinstance(lists, list) else None
    with pytest.raises(exc, match=match):
        pcgrad_(lists, **kwargs)
    if before:
        assert all(torch.equal(a, b) for lst, old in zip(lists, before) for a, b in zip(lst, old))


# -- the surgeon ------------------------------------------------------------------


class TwoHeads(torch.nn.Module):
    """A trunk shared by every objective and a head only objective 2 uses."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)
        )
        self.aux = torch.nn.Linear(4, 3)

    def losses(self, x):
        h = self.trunk(x)
        return [h.pow(2).mean(), -h.sum(1).mean() * 0.3, self.aux(h).sin().sum() * 0.2]


def objective_grads64(model, batches):
    """Per objective, the flat float64 gradient over the whole step's batches."""
    m64 = TwoHeads().double()
    m64.load_state_dict(model.state_dict())
    params = list(m64.parameters())
    out = []
    for j in range(3):
        loss = sum(m64.losses(x.double())[j] for x in batches) / len(batches)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gs, params)
                ]
            )
        )
    return out


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_surgeon_equals_textbook_with_accumulation(micro_batches):
    model = TwoHeads()
    surgeon = PCGrad(model.parameters(), num_objectives=3)
    batches = [torch.randn(5, 6) for _ in range(micro_batches)]
    for x in batches:  # objectives interleaved in a different order per micro-batch
        losses = model.losses(x)
        with surgeon.objective(2):
            (losses[2] / micro_batches).backward(retain_graph=True)
        (losses[0] / micro_batches).backward(retain_graph=True)
        with surgeon.objective(1):
            (losses[1] / micro_batches).backward()
    order = random_order(3)
    stats = surgeon.step(order=torch.tensor(order))
    expected = textbook(objective_grads64(model, batches), order)
    got = flat([p.grad for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert stats.gram.shape == (3, 3) and stats.weights.shape == (3,)
    assert not surgeon.has_captured(0) and not surgeon.has_captured(1)
    d = stats.to_dict()
    assert set(d) >= {"weight_0", "weight_1", "weight_2", "conflict_rate", "min_cosine"}


def test_surgeon_allocates_missing_task_grad():
    model = TwoHeads()
    surgeon = PCGrad(model.aux.parameters(), num_objectives=3)
    x = torch.randn(4, 6)
    with surgeon.objective(2):
        model.losses(x)[2].backward()
    surgeon.step(order=torch.tensor(random_order(3)))
    # Only objective 2 touches the head: nothing to project against, so g = g_2.
    ref = TwoHeads()
    ref.load_state_dict(model.state_dict())
    ref.losses(x)[2].backward()
    for p, q in zip(model.aux.parameters(), ref.aux.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("given_order", [True, False])
@pytest.mark.parametrize("with_generator", [True, False])
def test_surgeon_step_never_syncs(given_order, with_generator, forbid_host_sync):
    model = TwoHeads()
    generator = torch.Generator().manual_seed(3) if with_generator else None
    surgeon = PCGrad(model.parameters(), num_objectives=3, generator=generator)
    losses = model.losses(torch.randn(5, 6))
    losses[0].backward(retain_graph=True)
    for j in (1, 2):
        with surgeon.objective(j):
            losses[j].backward(retain_graph=True)
    # A CPU order is checked on the host before use (free: no device involved).
    order = torch.tensor(random_order(3)) if given_order else None
    with forbid_host_sync():
        stats = surgeon.step(order=order)
    assert stats.to_dict()  # the explicit sync point works outside the guard


def test_surgeon_validation():
    params = list(TwoHeads().parameters())
    with pytest.raises(ValueError, match="num_objectives"):
        PCGrad(params, num_objectives=0)
    with pytest.raises(TypeError, match="num_objectives"):
        PCGrad(params, num_objectives=2.0)
    with pytest.raises(ValueError, match="params is empty"):
        PCGrad([], num_objectives=2)
    with pytest.raises(TypeError, match="floating"):
        PCGrad([torch.zeros(3, dtype=torch.int64)], num_objectives=2)
    surgeon = PCGrad(params + params[:2], num_objectives=2)
    assert len(surgeon.params) == len(params)  # duplicates kept once
    with pytest.raises(ValueError, match="objective index"):
        surgeon.objective(2)


# --- torch.compile(fullgraph=True) -------------------------------------------------------


def conflicting_surgeon(m: int, generator=None):
    """A PCGrad surgeon over odd-sized parameters, every objective captured, conflicts by sign."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 3), (13,), (5, 2, 3))]
    surgeon = PCGrad(params, num_objectives=m, generator=generator, backend="torch")
    return surgeon, params


def fill_objectives(surgeon, params, grads):
    """Put ``grads[j]`` (one tensor per param) into objective j's gradient."""
    for j, gs in enumerate(grads):
        with surgeon.objective(j):
            for p, g in zip(params, gs):
                p.grad = g.clone()


def objective_data(m: int, params):
    common = [torch.randn_like(p) for p in params]
    signs = [(-1.0) ** j * (1 + random.random()) for j in range(m)]
    return [[s * c + 0.5 * torch.randn_like(c) for c in common] for s in signs]


def test_eager_generator_draws_argsorted_uniforms():
    # The documented stream: row i of the order is argsort of the generator's uniforms,
    # the same numbers eager and compiled code draw.
    m, seed = 4, random.randrange(2**31)
    lists = make_objectives(m, torch.float32, conflict=True)
    before = [[t.clone() for t in lst] for lst in lists]
    pcgrad_(lists, generator=torch.Generator().manual_seed(seed))
    order = torch.rand(m, m, generator=torch.Generator().manual_seed(seed)).argsort(1)
    check_against_textbook(before, lists[0], order.tolist())


@pytest.mark.parametrize("m", [3, 4])
def test_compiled_step_with_generator_equals_eager(m):
    seed = random.randrange(2**31)
    eager_gen, compiled_gen = (torch.Generator().manual_seed(seed) for _ in range(2))
    eager, eager_params = conflicting_surgeon(m, eager_gen)
    comp, comp_params = conflicting_surgeon(m, compiled_gen)
    with torch.no_grad():
        for p, q in zip(comp_params, eager_params):
            p.copy_(q)
    step = torch.compile(comp.step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call must draw the next orders, as eager does
        data = objective_data(m, eager_params)
        fill_objectives(eager, eager_params, data)
        fill_objectives(comp, comp_params, data)
        want = eager.step()
        got = step()
        assert torch.equal(got.weights, want.weights)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(comp_params, eager_params))
        assert torch.equal(compiled_gen.get_state(), eager_gen.get_state())


def test_compiled_step_with_order_tensor_equals_eager():
    m = 4
    eager, eager_params = conflicting_surgeon(m)
    comp, comp_params = conflicting_surgeon(m)
    step = torch.compile(comp.step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # a new order is a new input to the same graph, not a constant
        order = random_order(m)
        data = objective_data(m, eager_params)
        fill_objectives(eager, eager_params, data)
        fill_objectives(comp, comp_params, data)
        want = eager.step(order=torch.tensor(order))
        got = step(order=torch.tensor(order))
        assert torch.equal(got.weights, want.weights)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(comp_params, eager_params))
        check_against_textbook(data, [p.grad for p in comp_params], order)


def test_compiled_op_with_unregistered_generator_says_how_to_fix():
    lists = make_objectives(3, torch.float32, conflict=True)
    fresh = torch.Generator().manual_seed(1)  # never seen by eager code
    compiled = torch.compile(
        lambda ls: pcgrad_(ls, generator=fresh, backend="torch"),
        fullgraph=True,
        backend="aot_eager",
    )
    with pytest.raises(RuntimeError, match="never registered"):
        compiled(lists)
