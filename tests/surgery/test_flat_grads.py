"""SafeGrad(flat_grads=True): gradients in surgeon-owned flat buffers, p.grad as views.

The flat surgeon must give the update of the default surgeon (to rounding: one flat sum
instead of per-tensor sums) on every path: the fast one (views intact), every way a
view gets replaced (set_to_none zeroing, create_graph, a direct assignment), missing
gradients, the kept g_a of alignment_every > 1 and a resume from its state.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device_backend_params

from safegrad_kernels.ops.dispatch import available_backends
from safegrad_kernels.surgery import SafeGrad

DEVICE_BACKENDS = device_backend_params(
    lambda device: [name for name, (ok, _) in available_backends(device).items() if ok]
)
DTYPES = (torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(7, 3), (13,), (0,), (5, 2, 3), (1,)]
# Rounding of the two summation orders, in the gradients' dtypes.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_params(dtypes=DTYPES, shapes=SHAPES, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(device, d))
        for s, d in zip(shapes, dtypes)
    ]


def backward_into(params, values, *, create_graph=False):
    """Autograd accumulates exactly ``values`` into the params' gradients (d/dp <p, v>)."""
    loss = sum((p * v.to(p)).sum() for p, v in zip(params, values))
    loss.backward(create_graph=create_graph)


def conflicting(params, seed):
    """(g_u, g_a) with <g_u, g_a> < 0 overall: the surgery must act."""
    gen = torch.Generator().manual_seed(seed)
    ga = [torch.randn(p.shape, generator=gen) for p in params]
    gu = [-0.8 * a + 0.3 * torch.randn(a.shape, generator=gen) for a in ga]
    return gu, ga


def assert_close(got, want, params):
    for p, a, b in zip(params, got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=TOL[p.dtype], atol=TOL[p.dtype])


def run(surgeon, params, steps, *, zero, micro=2, align_when=None):
    """Steps of ``micro`` micro-batches; the alignment pass when ``align_when(step)``."""
    grads, stats = [], []
    for step in range(steps):
        gu, ga = conflicting(params, seed=step)
        if align_when is None or align_when(step, surgeon):
            for _ in range(micro):
                with surgeon.reference():
                    backward_into(params, [a / micro for a in ga])
        for _ in range(micro):
            backward_into(params, [u / micro for u in gu])
        stats.append(surgeon.step().to_dict())
        grads.append([None if p.grad is None else p.grad.clone() for p in params])
        zero(surgeon, params)
    return grads, stats


def zero_none(surgeon, params):
    for p in params:
        p.grad = None


def zero_surgeon(surgeon, params):
    surgeon.zero_grad()


def zero_in_place(surgeon, params):
    torch.optim.SGD(params, lr=0.0).zero_grad(set_to_none=False)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("zero", [zero_surgeon, zero_in_place, zero_none])
@pytest.mark.parametrize("k", [1, 3])
def test_flat_equals_the_default_surgeon(device, backend, zero, k):
    plain, flat = make_params(device=device), make_params(device=device)
    due = None if k == 1 else (lambda step, s: s.wants_reference)
    want, want_stats = run(
        SafeGrad(plain, alignment_every=k, backend=backend), plain, 7, zero=zero_none,
        align_when=due,
    )  # fmt: skip
    surgeon = SafeGrad(flat, alignment_every=k, backend=backend, flat_grads=True)
    got, got_stats = run(surgeon, flat, 7, zero=zero, align_when=due)
    for a, b in zip(got, want):
        assert_close(a, b, flat)
    for step, (a, b) in enumerate(zip(got_stats, want_stats)):
        assert a["conflict"] == b["conflict"]
        if step in (0, 1, 3, 6):  # g_u against its own g_a: the surgery acted
            assert a["conflict"] == 1.0
        for key in ("dot", "ref_norm_sq", "grad_norm_sq", "coef", "cosine"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    if zero is not zero_none:  # the fast path held: every gradient is still its view
        assert all(p.grad is v for p, v in zip(flat, surgeon._task.views))


def test_gradients_are_views_of_one_buffer_per_dtype():
    params = make_params()
    surgeon = SafeGrad(params, flat_grads=True)
    assert [f.dtype for f in surgeon._task.flats] == [torch.float32, torch.bfloat16, torch.float16]
    for p in params:
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype and not p.grad.any()
        base = p.grad._base
        assert base is not None and any(base is f for f in surgeon._task.flats)
    backward_into(params, [torch.ones(p.shape) for p in params])
    assert all(bool((p.grad == 1).all()) for p in params)  # accumulated in place
    surgeon.zero_grad()
    assert all(not p.grad.any() for p in params)


def test_existing_gradients_are_kept_at_construction():
    params = make_params()
    before = [torch.randn(p.shape).to(p.dtype) for p in params]
    for p, g in zip(params, before):
        p.grad = g.clone()
    SafeGrad(params, flat_grads=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_and_assigned_gradients_are_repaired():
    plain, flat = make_params(), make_params()
    gu, ga = conflicting(plain, seed=3)
    results = []
    for params, kw in ((plain, {}), (flat, {"flat_grads": True})):
        surgeon = SafeGrad(params, **kw)
        with surgeon.reference():
            backward_into(params, ga, create_graph=True)  # out of place: replaces the view
        backward_into(params, gu)
        params[1].grad = params[1].grad * 1.0  # a new tensor, no longer the view
        surgeon.step()
        results.append([p.grad.detach().clone() for p in params])
    assert_close(results[1], results[0], flat)


def test_missing_gradients_count_as_zero():
    plain, flat = make_params(), make_params()
    gu, ga = conflicting(plain, seed=5)
    out = []
    for params, kw in ((plain, {}), (flat, {"flat_grads": True})):
        surgeon = SafeGrad(params, **kw)
        with surgeon.reference():
            backward_into(params[1:], ga[1:])  # params[0]: no g_a
        for p in params:
            p.grad = None
        backward_into(params[:-1], gu[:-1])  # params[-1]: g_a but no g_u
        stats = surgeon.step().to_dict()
        out.append(([p.grad.clone() for p in params], stats))
    (want, want_stats), (got, got_stats) = out
    assert_close(got, want, flat)
    assert got_stats["coef"] == pytest.approx(want_stats["coef"], rel=1e-4)


def test_a_step_without_gradients_raises_and_changes_nothing():
    params = make_params()
    surgeon = SafeGrad(params, flat_grads=True)
    backward_into(params, conflicting(params, 0)[0])
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="no captured reference"):
        surgeon.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    with surgeon.reference():
        backward_into(params, conflicting(params, 1)[1])
    for p in params:
        p.grad = None  # e.g. an engine moved every gradient out of p.grad
    with pytest.raises(RuntimeError, match=r"no task \(p.grad\)"):
        surgeon.step()
    assert all(p.grad is None for p in params) and surgeon.has_reference
    stats = surgeon.step(allow_missing=True)
    assert float(stats.grad_norm_sq) == 0 and all(p.grad is None for p in params)


@pytest.mark.parametrize("cut", [2, 3])
def test_flat_state_dict_resumes_exactly(cut, tmp_path):
    k, n = 3, 7
    due = lambda step, s: s.wants_reference  # noqa: E731
    whole_params = make_params()
    whole, _ = run(
        SafeGrad(whole_params, alignment_every=k, flat_grads=True), whole_params, n,
        zero=zero_surgeon, align_when=due,
    )  # fmt: skip
    first_params = make_params()
    first = SafeGrad(first_params, alignment_every=k, flat_grads=True)
    run(first, first_params, cut, zero=zero_surgeon, align_when=due)
    torch.save(first.state_dict(), tmp_path / "surgeon.pt")
    state = torch.load(tmp_path / "surgeon.pt", weights_only=True)
    for kw in ({"flat_grads": True}, {}):  # into a flat surgeon and into a default one
        params = make_params()
        resumed = SafeGrad(params, alignment_every=k, **kw)
        resumed.load_state_dict(state)

        rest = []
        for step in range(cut, n):
            gu, ga = conflicting(params, seed=step)
            if due(step, resumed):
                for _ in range(2):
                    with resumed.reference():
                        backward_into(params, [a / 2 for a in ga])
            for _ in range(2):
                backward_into(params, [u / 2 for u in gu])
            resumed.step()
            rest.append([p.grad.clone() for p in params])
            resumed.zero_grad()
        for a, b in zip(rest, whole[cut:]):
            if kw:
                assert all(torch.equal(x, y) for x, y in zip(a, b))  # flat to flat: bitwise
            else:
                assert_close(a, b, params)


def test_refusals_leave_the_gradients_alone():
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2).double())]
    with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.float64"):
        SafeGrad(params, flat_grads=True)
    assert all(p.grad is None for p in params)
    ok = make_params()
    with pytest.raises(ValueError, match="flat_grads=True needs granularity='global'"):
        SafeGrad(ok, flat_grads=True, granularity="per_tensor")
    with pytest.raises(TypeError, match="flat_grads must be a bool"):
        SafeGrad(ok, flat_grads=1)
    assert all(p.grad is None for p in ok)


def test_the_fast_path_never_syncs(forbid_host_sync):
    params = make_params()
    surgeon = SafeGrad(params, alignment_every=2, flat_grads=True)
    gu, ga = conflicting(params, 0)
    with forbid_host_sync():
        for _ in range(4):
            if surgeon.wants_reference:
                with surgeon.reference():
                    backward_into(params, ga)
            backward_into(params, gu)
            surgeon.step()
            surgeon.zero_grad()


def test_a_parameter_of_another_shape_is_refused_not_broadcast():
    """A param whose data was swapped for another shape (stale surgeon) must not pass.

    Its new gradient (shape (1,)) would broadcast into the old (3,)-shaped view; torch's
    own check on assigning ``p.grad`` refuses it before the op runs.
    """
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))]
    surgeon = SafeGrad(params, flat_grads=True)
    with surgeon.reference():
        backward_into(params, [torch.ones(3), torch.ones(4)])
    params[0].data = torch.randn(1)
    params[0].grad = None
    backward_into(params, [torch.ones(1), -torch.ones(4)])
    with pytest.raises(RuntimeError, match="same size"):
        surgeon.step()


# --- PCGrad(flat_grads=True) ---------------------------------------------------------


def pcgrad_run(flat, params, steps, *, m, zero, backend, missing=()):
    """``steps`` PCGrad steps over ``m`` objectives with fixed orders; objectives in
    ``missing`` get no backward at all. Returns the task gradients and Gram matrices."""
    from safegrad_kernels.surgery import PCGrad

    surgeon = PCGrad(params, num_objectives=m, flat_grads=flat, backend=backend)
    grads, grams = [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        base = [torch.randn(p.shape, generator=gen) for p in params]
        for j in range(m):
            if j in missing:
                continue
            # odd objectives lean against the even ones: every step has a conflict
            sign = 0.8 if j % 2 == 0 else -0.8
            values = [sign * b + 0.5 * torch.randn(b.shape, generator=gen) for b in base]
            if j == 0:
                backward_into(params, values)
            else:
                with surgeon.objective(j):
                    backward_into(params, values)
        order = torch.stack([torch.randperm(m, generator=gen) for _ in range(m)])
        stats = surgeon.step(order=order)
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])
        grams.append(stats.gram.clone())
        if flat:
            zero(surgeon, params)
        else:
            zero_none(surgeon, params)
    return surgeon, grads, grams


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("zero", [zero_surgeon, zero_in_place, zero_none])
@pytest.mark.parametrize("m", [2, 3])
def test_flat_pcgrad_equals_the_default_surgeon(device, backend, zero, m):
    ref = make_params(device=device)
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    _, want, want_gram = pcgrad_run(False, ref, 3, m=m, zero=zero, backend=backend)
    surgeon, got, got_gram = pcgrad_run(True, mine, 3, m=m, zero=zero, backend=backend)
    for a, b in zip(got, want):
        assert_close(a, b, mine)
    for a, b in zip(got_gram, want_gram):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        assert (a < 0).any()  # the objectives conflict: the surgery acted
    if zero is not zero_none:  # the views stayed in place
        assert all(p.grad is v for p, v in zip(mine, surgeon._task.views))


@pytest.mark.parametrize("missing", [(1,), (0,), (0, 2)])
def test_flat_pcgrad_counts_a_missing_objective_as_zero(missing):
    ref = make_params()
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    _, want, _ = pcgrad_run(False, ref, 2, m=3, zero=zero_none, backend="torch", missing=missing)
    _, got, _ = pcgrad_run(True, mine, 2, m=3, zero=zero_none, backend="torch", missing=missing)
    for a, b in zip(got, want):
        assert_close([x if x is not None else torch.zeros(p.shape, dtype=p.dtype) for x, p in zip(a, mine)],
                     [x if x is not None else torch.zeros(p.shape, dtype=p.dtype) for x, p in zip(b, ref)],
                     mine)  # fmt: skip


def test_flat_pcgrad_without_any_gradient_touches_nothing():
    from safegrad_kernels.surgery import PCGrad

    params = make_params()
    surgeon = PCGrad(params, num_objectives=3, flat_grads=True)
    for p in params:
        p.grad = None
    stats = surgeon.step()
    assert all(p.grad is None for p in params)
    assert stats.weights.tolist() == [1.0, 1.0, 1.0] and not stats.gram.any()


def test_flat_pcgrad_bad_order_keeps_the_captures():
    from safegrad_kernels.surgery import PCGrad

    params = make_params()
    surgeon = PCGrad(params, num_objectives=2, flat_grads=True)
    backward_into(params, conflicting(params, 0)[0])
    with surgeon.objective(1):
        backward_into(params, conflicting(params, 0)[1])
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError):
        surgeon.step(order=torch.tensor([[0, 0], [1, 1]]))
    assert surgeon.has_captured(0)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_flat_pcgrad_step_never_syncs(forbid_host_sync):
    from safegrad_kernels.surgery import PCGrad

    params = make_params()
    surgeon = PCGrad(params, num_objectives=3, flat_grads=True, generator=torch.Generator())
    for j in range(3):
        values = conflicting(params, j)[j % 2]
        if j == 0:
            backward_into(params, values)
        else:
            with surgeon.objective(j):
                backward_into(params, values)
    with forbid_host_sync():
        surgeon.step()
