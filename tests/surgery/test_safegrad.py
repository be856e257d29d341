"""SafeGrad: the step equals the formula by hand; capture, accumulation, missing grads, no sync."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from safegrad_kernels.ops import project_conflicting_
from safegrad_kernels.ops.dispatch import available_backends
from safegrad_kernels.surgery import SafeGrad
from safegrad_kernels.surgery.safegrad import refresh_due, refreshes_before

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]
# The Triton interpreter costs about 0.5 s per step here; the op tests cover it in
# depth, so the full grid runs on the compiled/eager backends and Triton gets a sample.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
SHAPES = [(7, 3), (13,), (5, 2, 3), (1,), (31, 2)]
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def flat(tensors, dtype=torch.float64):
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def formula(gu, ga, rho, eps=1e-12):
    """SafeGrad on flat vectors (any dtype): update, coefficient and the three sums."""
    dot, nsq, gsq = gu @ ga, ga @ ga, gu @ gu
    c = dot / nsq if (dot < 0 and nsq > eps) else torch.zeros((), dtype=gu.dtype)
    return gu - c * ga + rho * ga, c, (dot, nsq, gsq)


def formula_per_tensor(gus, gas, rho, dtype=torch.float64):
    outs, rows = [], []
    for gu, ga in zip(gus, gas):
        out, c, sums = formula(gu.reshape(-1).to(dtype), ga.reshape(-1).to(dtype), rho)
        outs.append(out)
        rows.append(torch.stack([*sums, c]))
    return torch.cat(outs), torch.stack(rows)


def set_grad_by_backward(params, values):
    """Make autograd leave exactly `values` in the params' gradients (d/dp <p, v> = v)."""
    sum((p * v.to(p.dtype)).sum() for p, v in zip(params, values)).backward()


def make_pair(conflict: bool):
    """(g_u, g_a) lists whose inner product has the sign asked for, overall and per tensor."""
    ga = [torch.randn(s) for s in SHAPES]
    sign = -1.0 if conflict else 1.0
    gu = [sign * (0.5 + random.random()) * a + 0.3 * torch.randn_like(a) for a in ga]
    return gu, ga


def assert_close_rule(got, ref, plain, dtype):
    err = (got - ref).abs().max()
    allowed = 2 * (plain - ref).abs().max() + FLOOR[dtype] * ref.abs().max()
    assert err <= allowed, f"error {err:.3g} > allowed {allowed:.3g}"


def _grid():
    for backend in BACKENDS:
        for granularity in ("global", "per_tensor"):
            for conflict in (True, False):
                for rho in (0.0, 1.0):
                    for dtype in (torch.float32, torch.bfloat16):
                        sample = conflict and rho == 1.0 and dtype == torch.float32
                        if backend in FAST_BACKENDS or sample:
                            yield backend, granularity, conflict, rho, dtype


@pytest.mark.parametrize("backend, granularity, conflict, rho, dtype", list(_grid()))
def test_step_equals_the_formula_by_hand(backend, granularity, conflict, rho, dtype):
    per_tensor = granularity == "per_tensor"
    gu, ga = make_pair(conflict)
    gu = [t.to(dtype) for t in gu]
    ga = [t.to(dtype) for t in ga]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    surgeon = SafeGrad(params, rho=rho, granularity=granularity, backend=backend)
    with surgeon.reference():
        set_grad_by_backward(params, ga)
    set_grad_by_backward(params, gu)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, gu))  # reference kept apart
    stats = surgeon.step()
    got = flat([p.grad for p in params])

    if per_tensor:
        ref, rows = formula_per_tensor(gu, ga, rho)
        plain, _ = formula_per_tensor(gu, ga, rho, dtype=torch.float32)
        torch.testing.assert_close(stats.rows.double(), rows, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.conflict, rows[:, 3] != 0)
        sums = rows[:, :3].sum(0)
        c_ref = rows[:, 3]
    else:
        ref, c_ref, sums = formula(flat(gu), flat(ga), rho)
        plain, _, _ = formula(flat(gu, torch.float32), flat(ga, torch.float32), rho)
        sums = torch.stack(sums)
        assert bool(stats.conflict) == conflict
    assert_close_rule(got, ref, plain.double(), dtype)
    torch.testing.assert_close(stats.coef.double(), c_ref, rtol=1e-5, atol=1e-7)
    got_sums = torch.stack([stats.dot, stats.ref_norm_sq, stats.grad_norm_sq]).double()
    torch.testing.assert_close(got_sums, sums, rtol=1e-5, atol=1e-6)
    cos = sums[0] / (sums[1] * sums[2]).sqrt()
    assert math.isclose(float(stats.cosine), float(cos), rel_tol=1e-5, abs_tol=1e-6)
    d = stats.to_dict()
    assert set(d) == {"dot", "ref_norm_sq", "grad_norm_sq", "cosine", "coef", "conflict"}
    assert all(isinstance(v, float) for v in d.values())


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )

    def task_loss(self, x, y):
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def align_loss(self, x):
        return self.net(x).pow(2).mean()


def run_step(model, surgeon, task_batches, align_batches):
    """k micro-batches, both contexts, in alternating order; losses scaled by 1/k."""
    k = len(task_batches)
    for step, ((x, y), xa) in enumerate(zip(task_batches, align_batches)):
        if step % 2:
            (model.task_loss(x, y) / k).backward()
        for _ in range(2):  # the reference context may be entered several times
            with surgeon.reference():
                (model.align_loss(xa) / (2 * k)).backward()
        if not step % 2:
            (model.task_loss(x, y) / k).backward()
    return surgeon.step()


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_accumulation_equals_one_large_batch(granularity):
    k, b = 3, 4
    task = [(torch.randn(b, 5), torch.randint(0, 3, (b,))) for _ in range(k)]
    align = [torch.randn(b, 5) for _ in range(k)]
    model = MLP()
    big = MLP()
    big.load_state_dict(model.state_dict())
    run_step(model, SafeGrad(model.parameters(), granularity=granularity), task, align)
    x_all = torch.cat([x for x, _ in task])
    y_all = torch.cat([y for _, y in task])
    run_step(
        big,
        SafeGrad(big.parameters(), granularity=granularity),
        [(x_all, y_all)],
        [torch.cat(align)],
    )
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)

    # ... and both equal the formula on float64 gradients.
    m64 = MLP().double()
    m64.load_state_dict(model.state_dict())
    params = list(m64.parameters())
    gu = torch.autograd.grad(m64.task_loss(x_all.double(), y_all), params)
    ga = torch.autograd.grad(m64.align_loss(torch.cat(align).double()), params)
    if granularity == "global":
        ref, _, _ = formula(flat(gu), flat(ga), 1.0)
    else:
        ref, _ = formula_per_tensor(gu, ga, 1.0)
    got = flat([p.grad for p in model.parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_step_consumes_the_reference():
    model = MLP()
    surgeon = SafeGrad(model.parameters())
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with surgeon.reference():
        model.align_loss(x).backward()
    assert surgeon.has_reference
    model.task_loss(x, y).backward()
    surgeon.step()
    assert not surgeon.has_reference
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no captured reference gradient"):
        surgeon.step()  # no reference: never silently a no-op ...
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    stats = surgeon.step(allow_missing=True)  # ... unless asked: nothing to do
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert float(stats.ref_norm_sq) == 0 and not bool(stats.conflict)
    assert float(stats.grad_norm_sq) == pytest.approx(float(flat(before) @ flat(before)), rel=1e-5)


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("missing", ["task", "reference", "both"])
def test_step_without_any_gradient_of_a_kind_raises(granularity, missing):
    """What an engine that moves p.grad away (DeepSpeed ZeRO) looks like to a surgeon."""
    model = MLP()
    surgeon = SafeGrad(model.parameters(), granularity=granularity)
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    if missing not in ("reference", "both"):
        with surgeon.reference():
            model.align_loss(x).backward()
    if missing not in ("task", "both"):
        model.task_loss(x, y).backward()
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    word = {"task": "no task", "reference": "no captured reference", "both": "no task"}[missing]
    with pytest.raises(RuntimeError, match=word):
        surgeon.step()
    after = [p.grad for p in model.parameters()]
    assert all((a is None) == (b is None) for a, b in zip(after, before))
    assert all(a is None or torch.equal(a, b) for a, b in zip(after, before))
    assert surgeon.has_reference == (missing == "task")  # a failed step keeps g_a


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_missing_gradients(granularity):
    shared = torch.randn(6, requires_grad=True)
    task_only = torch.randn(4, requires_grad=True)
    ref_only = torch.randn(5, requires_grad=True)
    untouched = torch.randn(3, requires_grad=True)
    params = [shared, task_only, ref_only, untouched]
    surgeon = SafeGrad(params, rho=0.5, granularity=granularity)
    gu = {"shared": torch.randn(6), "task_only": torch.randn(4)}
    ga = {"shared": -gu["shared"] + 0.1 * torch.randn(6), "ref_only": torch.randn(5)}
    with surgeon.reference():
        set_grad_by_backward([shared, ref_only], [ga["shared"], ga["ref_only"]])
    set_grad_by_backward([shared, task_only], [gu["shared"], gu["task_only"]])
    stats = surgeon.step()
    assert untouched.grad is None
    assert ref_only.grad is not None  # allocated
    # Reference: missing gradients are zeros.
    z = torch.zeros
    gus = [gu["shared"], gu["task_only"], z(5), z(3)]
    gas = [ga["shared"], z(4), ga["ref_only"], z(3)]
    if granularity == "global":
        ref, _, sums = formula(flat(gus), flat(gas), 0.5)
    else:
        ref, rows = formula_per_tensor(gus, gas, 0.5)
        torch.testing.assert_close(stats.rows.double(), rows, rtol=1e-5, atol=1e-6)
        sums = rows[:, :3].sum(0)
    got = flat([shared.grad, task_only.grad, ref_only.grad, z(3)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert float(stats.grad_norm_sq) == pytest.approx(float(sums[2]), rel=1e-5)
    assert float(stats.ref_norm_sq) == pytest.approx(float(sums[1]), rel=1e-5)


def test_reference_context_restores_task_grads_on_error():
    model = MLP()
    surgeon = SafeGrad(model.parameters())
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    model.task_loss(x, y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(KeyError), surgeon.reference():
        model.align_loss(x).backward()
        raise KeyError("boom")
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="do not nest"), surgeon.reference(), surgeon.reference():
        pass
    with pytest.raises(RuntimeError, match="inside a capture context"), surgeon.reference():
        surgeon.step()


def test_failed_step_mutates_nothing_and_keeps_the_reference():
    w = torch.randn(3, 4, requires_grad=True)
    surgeon = SafeGrad([w])
    with surgeon.reference():
        set_grad_by_backward([w], [torch.randn(3, 4)])
    w.grad = torch.randn(4, 3).T  # a non-contiguous gradient: the ops refuse it
    before = w.grad.clone()
    with pytest.raises(ValueError, match="contiguous"):
        surgeon.step()
    assert torch.equal(w.grad, before) and surgeon.has_reference


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"rho": -1.0}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"rho": torch.tensor(1.0)}, TypeError, "rho"),
        ({"eps": -1e-3}, ValueError, "eps"),
        ({"granularity": "layer"}, ValueError, "granularity"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SafeGrad(MLP().parameters(), **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="params is empty"):
        SafeGrad([])
    with pytest.raises(ValueError, match="params is empty"):
        SafeGrad([torch.randn(3)])  # requires_grad=False: nothing trainable
    with pytest.raises(TypeError, match=r"params\[1\].*floating"):
        SafeGrad([torch.randn(3, requires_grad=True), torch.zeros(2, dtype=torch.int32)])
    with pytest.raises(TypeError, match="float64"):
        SafeGrad([torch.randn(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(TypeError, match="iterable of tensors"):
        SafeGrad(torch.randn(3, requires_grad=True))
    model = MLP()
    params = list(model.parameters())
    assert SafeGrad(params + params).params == tuple(params)  # duplicates kept once


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("missing", [False, True])
def test_step_never_syncs(granularity, missing, forbid_host_sync):
    model = MLP()
    extra = torch.randn(4, requires_grad=True)
    surgeon = SafeGrad([*model.parameters(), extra], granularity=granularity)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with surgeon.reference():
        model.align_loss(x).backward()
    loss = model.task_loss(x, y)
    if missing:  # `extra` gets a task gradient but no reference one
        loss = loss + extra.sum()
    loss.backward()
    with forbid_host_sync():
        stats = surgeon.step()
        with surgeon.reference():
            pass
    assert set(stats.to_dict()) >= {"cosine", "conflict"}
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        stats.to_dict()  # the one explicit sync point


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_tiny_llama_lora_accumulation_and_formula(granularity):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import copy

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    twin = copy.deepcopy(model)
    k = 2
    task = [torch.randint(0, 64, (2, 9)) for _ in range(k)]
    align = [torch.randint(0, 64, (2, 9)) for _ in range(k)]

    def loss(m, ids):
        return m(input_ids=ids, labels=ids).loss

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    surgeon = SafeGrad(trainable(model), granularity=granularity)
    for x, xa in zip(task, align):
        (loss(model, x) / k).backward()
        with surgeon.reference():
            (loss(model, xa) / k).backward()
    surgeon.step()
    big = SafeGrad(trainable(twin), granularity=granularity)
    with big.reference():
        loss(twin, torch.cat(align)).backward()
    loss(twin, torch.cat(task)).backward()
    big.step()
    for p, q in zip(trainable(model), trainable(twin)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)

    m64 = copy.deepcopy(twin).double()
    gu = torch.autograd.grad(loss(m64, torch.cat(task)), trainable(m64))
    ga = torch.autograd.grad(loss(m64, torch.cat(align)), trainable(m64))
    if granularity == "global":
        ref, _, _ = formula(flat(gu), flat(ga), 1.0)
    else:
        ref, _ = formula_per_tensor(gu, ga, 1.0)
    got = flat([p.grad for p in trainable(model)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


# -- alignment refresh: alignment_every = k --------------------------------------------------


def refresh_run(surgeon, params, gus, gas):
    """Steps with task gradients ``gus``; a g_a from ``gas`` captured only when wanted."""
    out, wanted = [], []
    for gu, ga in zip(gus, gas):
        wanted.append(surgeon.wants_reference)
        refresh_step(surgeon, params, gu, ga if wanted[-1] else None)
        out.append([p.grad.clone() for p in params])
    return out, wanted


def refresh_step(surgeon, params, gu, ga=None) -> None:
    """One step on task gradient ``gu``, after capturing ``ga`` as the reference if given."""
    if ga is not None:
        with surgeon.reference():
            set_grad_by_backward(params, ga)
    for p in params:
        p.grad = None
    set_grad_by_backward(params, gu)
    surgeon.step()


def random_steps(n, shapes=SHAPES):
    gas = [[torch.randn(s) for s in shapes] for _ in range(n)]
    # Conflicting on most steps, so the projection (and the choice of g_a) matters.
    gus = [[-(0.5 + random.random()) * a + 0.3 * torch.randn_like(a) for a in ga] for ga in gas]
    return gus, gas


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_alignment_every_projects_each_g_u_against_the_last_refresh(granularity, k):
    """k = 1 is the fresh-g_a update of every step; k > 1 reuses the g_a of steps 0, k, 2k."""
    backend = FAST_BACKENDS[0]
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    gus, gas = random_steps(7)
    surgeon = SafeGrad(params, granularity=granularity, alignment_every=k, backend=backend)
    got, wanted = refresh_run(surgeon, params, gus, gas)
    refreshes = [step for step in range(7) if step % k == 0 or step == 1]
    assert wanted == [step in refreshes for step in range(7)]
    for step, (gu, grads) in enumerate(zip(gus, got)):
        ga = gas[max(r for r in refreshes if r <= step)]
        expected = [g.clone() for g in gu]
        project_conflicting_(
            expected, ga, rho=1.0, per_tensor=granularity == "per_tensor", backend=backend
        )
        assert all(torch.equal(a, b) for a, b in zip(grads, expected)), step
    if k > 2:  # the choice of g_a matters on these steps: a fresh one gives another update
        fresh = [g.clone() for g in gus[2]]
        project_conflicting_(fresh, gas[2], rho=1.0, backend=backend)
        assert not all(torch.equal(a, b) for a, b in zip(got[2], fresh))


def test_alignment_every_1_equals_the_surgeon_without_the_option():
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    gus, gas = random_steps(4)
    runs = [
        refresh_run(SafeGrad(params, **kw), params, gus, gas) for kw in ({}, {"alignment_every": 1})
    ]
    assert runs[0][1] == runs[1][1] == [True] * 4
    for a, b in zip(runs[0][0], runs[1][0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert SafeGrad(params, alignment_every=1).state_dict() == {}


def test_kept_reference_counts_as_found_only_between_refreshes():
    model = MLP()
    surgeon = SafeGrad(model.parameters(), alignment_every=3)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    model.task_loss(x, y).backward()
    with pytest.raises(RuntimeError, match="no captured reference"):
        surgeon.step()  # step 0: a refresh step, nothing kept yet
    for _ in range(2):  # steps 0 and 1 refresh
        assert surgeon.wants_reference
        with surgeon.reference():
            model.align_loss(x).backward()
        surgeon.step()
        model.zero_grad(set_to_none=True)
        model.task_loss(x, y).backward()
    assert not surgeon.wants_reference and not surgeon.has_reference
    stats = surgeon.step()  # step 2: the kept g_a, found
    assert float(stats.ref_norm_sq) > 0
    assert surgeon.wants_reference
    model.zero_grad(set_to_none=True)
    model.task_loss(x, y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no captured reference"):
        surgeon.step()  # step 3: a missed refresh is not covered by the kept g_a
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_capture_off_schedule_is_used_and_kept():
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    surgeon = SafeGrad(params, alignment_every=4, backend=FAST_BACKENDS[0])
    (gu0, gu1, gu2, gu3), (ga0, ga1, ga2, _) = random_steps(4)
    # step 2 captures although not due (steps 0, 1, 4, ... are)
    for gu, ga in ((gu0, ga0), (gu1, ga1), (gu2, ga2), (gu3, None)):
        refresh_step(surgeon, params, gu, ga)
    expected = [g.clone() for g in gu3]
    project_conflicting_(expected, ga2, rho=1.0, backend=FAST_BACKENDS[0])
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    assert surgeon.wants_reference  # step 4: the schedule did not move


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_state_dict_resumes_the_refresh_exactly(granularity, tmp_path):
    k, n, cut = 2, 5, 3  # 2k + 1 steps; the restart lands between refreshes
    gus, gas = random_steps(n)
    ps = [torch.randn(s, requires_grad=True) for s in SHAPES]
    whole, _ = refresh_run(SafeGrad(ps, alignment_every=k, granularity=granularity), ps, gus, gas)

    first = SafeGrad(ps, alignment_every=k, granularity=granularity)
    refresh_run(first, ps, gus[:cut], gas[:cut])
    torch.save(first.state_dict(), tmp_path / "surgeon.pt")
    qs = [torch.randn(s, requires_grad=True) for s in SHAPES]  # a fresh process's params
    resumed = SafeGrad(qs, alignment_every=k, granularity=granularity)
    resumed.load_state_dict(torch.load(tmp_path / "surgeon.pt", weights_only=True))
    assert not resumed.wants_reference
    rest, wanted = refresh_run(resumed, qs, gus[cut:], gas[cut:])
    assert wanted == [False, True]
    for a, b in zip(whole[cut:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_load_state_dict_checks_before_setting():
    ps = [torch.randn(s, requires_grad=True) for s in SHAPES]
    surgeon = SafeGrad(ps, alignment_every=3)
    refresh_run(surgeon, ps, *random_steps(2))
    good = surgeon.state_dict()
    kept = [t.clone() for t in good["kept"]]
    bad_shape = {**good, "kept": [*kept[:-1], torch.randn(3, 7)]}
    for state, match in [
        ({**good, "alignment_every": 2}, "alignment_every=2"),
        (bad_shape, r"kept\[4\]"),
        ({**good, "kept": kept[:2]}, "keeps 2 tensors"),
        ({**good, "step": -1}, "step"),
        ({"step": 1}, "not a SafeGrad state"),
    ]:
        with pytest.raises(ValueError, match=match):
            surgeon.load_state_dict(state)
        assert surgeon.state_dict()["step"] == 2
        assert all(torch.equal(a, b) for a, b in zip(surgeon.state_dict()["kept"], kept))
    with pytest.raises(ValueError, match="saved with alignment_every=3"):
        SafeGrad(ps).load_state_dict(good)  # k = 1 keeps nothing
    with pytest.raises(ValueError, match="expected no keys"):
        SafeGrad(ps).load_state_dict({"step": 1})


def test_step_on_the_kept_reference_never_syncs(forbid_host_sync):
    model = MLP()
    surgeon = SafeGrad(model.parameters(), alignment_every=3)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    for _ in range(2):  # the refresh steps 0 and 1
        with surgeon.reference():
            model.align_loss(x).backward()
        model.task_loss(x, y).backward()
        surgeon.step()
        model.zero_grad(set_to_none=True)
    model.task_loss(x, y).backward()
    with forbid_host_sync():
        assert not surgeon.wants_reference
        surgeon.step()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_refreshes_before_counts_refresh_due(k):
    """The closed form (exact resume) equals counting the rule step by step."""
    due = [refresh_due(step, k) for step in range(40)]
    assert due[0] and due[1]  # step 1 too: step 0's g_a is zero from the reference model
    assert [refreshes_before(step, k) for step in range(41)] == [
        sum(due[:step]) for step in range(41)
    ]


def test_step_one_refresh_defends_a_fresh_adapter():
    """From the reference model step 0's KL gradient vanishes; k > 1 must not keep that zero.

    The trainable model starts equal to its frozen reference (a fresh adapter, or full
    fine-tuning from the aligned checkpoint); step 1, after one update, refreshes g_a.
    """
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model).requires_grad_(False)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def kl() -> torch.Tensor:
        return torch.nn.functional.kl_div(
            model.net(x).log_softmax(-1),
            reference.net(x).log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )

    surgeon = SafeGrad(model.parameters(), alignment_every=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_norms, wanted = [], []
    for _ in range(3):
        wanted.append(surgeon.wants_reference)
        if wanted[-1]:
            with surgeon.reference():
                kl().backward()
        model.task_loss(x, y).backward()
        ref_norms.append(float(surgeon.step().ref_norm_sq))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert wanted == [True, True, False]
    assert ref_norms[0] < 1e-12  # zero up to rounding: nothing to defend with at step 0
    assert ref_norms[1] > 1e-6  # refreshed after one update: a real alignment signal ...
    assert ref_norms[2] == ref_norms[1]  # ... kept for step 2
