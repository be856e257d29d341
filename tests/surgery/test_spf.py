"""SPF against a direct float64 SVD reference; schedule, batching, missing grads, no sync."""

from __future__ import annotations

import random

import pytest
import torch

from safegrad_kernels.surgery import SPF

# Tall, wide, square, LoRA-like factors (B: [out, r] tall, A: [r, in] wide), a conv-like
# 3-D weight, each shape twice (batched together), plus a bias that SPF skips.
SHAPES = [(30, 3), (5, 23), (9, 9), (40, 4), (4, 40), (6, 2, 3)]


def with_spectrum(shape, decay=0.6, rank=None, dtype=torch.float32):
    """A random matrix (viewed as [shape[0], rest]) with singular values decay**i."""
    out = shape[0]
    inn = 1
    for d in shape[1:]:
        inn *= d
    n = min(out, inn)
    u = torch.linalg.qr(torch.randn(out, n, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inn, n, dtype=torch.float64)).Q
    sig = decay ** torch.arange(n, dtype=torch.float64)
    if rank is not None:
        sig[rank:] = 0
    return (u * sig @ v.T).reshape(shape).to(dtype)


def tall(t):
    m = t.reshape(t.shape[0], -1).double()
    return m.T if m.shape[0] < m.shape[1] else m


def spf_reference(g, s, k, mode, s_for_basis=None):
    """Expected gradient after SPF, and the score <P, S>, from float64 SVD."""
    gt, st = tall(g), tall(s)
    basis_src = tall(s_for_basis) if s_for_basis is not None else st
    u, sig, _ = torch.linalg.svd(basis_src, full_matrices=False)
    keep = sig > sig[0] * max(basis_src.shape) * torch.finfo(torch.float64).eps * 1e6
    u = u[:, : min(k, u.shape[1])] * keep[: min(k, u.shape[1])]
    p = u @ (u.T @ gt)
    score = (p * st).sum()
    applied = mode == "always" or score < 0
    new = gt - p if applied else gt
    if g.reshape(g.shape[0], -1).shape[0] < g.reshape(g.shape[0], -1).shape[1]:
        new = new.T
    return new.reshape(g.shape), score, applied


def set_grad_by_backward(params, values):
    """Make autograd leave exactly `values` in the params' gradients (d/dp <p, v> = v)."""
    sum((p * v.to(p.dtype)).sum() for p, v in zip(params, values)).backward()


def make_problem(dtype=torch.float32, shapes=SHAPES):
    params, safety, task = [], [], []
    for shape in shapes:
        for _ in range(2):
            s = with_spectrum(shape, dtype=dtype)
            # Half the matrices oppose their safety gradient, half follow it.
            sign = random.choice([-1.0, 1.0])
            g = (sign * s * 3 + 0.3 * torch.randn(shape)).to(dtype)
            params.append(torch.randn(shape, dtype=dtype, requires_grad=True))
            safety.append(s)
            task.append(g)
    bias = torch.randn(7, dtype=dtype, requires_grad=True)
    return [*params, bias], [*safety, torch.randn(7).to(dtype)], [*task, torch.randn(7).to(dtype)]


def check(params, safety, task, stats, k, mode, tol, s_for_basis=None):
    scores, applied = [], []
    for j, (p, s, g) in enumerate(zip(params[:-1], safety, task)):
        basis_s = s_for_basis[j] if s_for_basis is not None else None
        new, score, app = spf_reference(g, s, k, mode, basis_s)
        err = (p.grad.double() - new).abs().max()
        assert err <= tol * g.double().abs().max(), f"matrix {j} {tuple(p.shape)}: error {err:.3g}"
        scores.append(score)
        applied.append(app)
    assert torch.equal(params[-1].grad, task[-1])  # the bias is skipped
    torch.testing.assert_close(stats.score.double(), torch.stack(scores), rtol=1e-3, atol=1e-4)
    assert stats.applied.tolist() == applied


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["conflicting", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_svd_reference(k, mode, dtype):
    params, safety, task = make_problem(dtype)
    spf = SPF(params, rank=k, mode=mode)
    assert spf.wants_reference
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    stats = spf.step()
    assert stats.refreshed and not spf.wants_reference
    check(params, safety, task, stats, k, mode, tol=1e-5 if dtype == torch.float32 else 2e-2)
    d = stats.to_dict()
    assert set(d) == {"applied_fraction", "conflict_fraction", "removed_energy", "refreshed"}


def test_randomized_svd_matches_exact_and_keeps_global_rng():
    shapes = [(40, 24), (20, 36)]
    params, safety, task = make_problem(shapes=shapes)
    # Fast decay: k + oversample directions capture S to float32 precision.
    safety[:-1] = [with_spectrum(p.shape, decay=0.05) for p in params[:-1]]
    rng = torch.get_rng_state()
    spf = SPF(params, rank=3, mode="always", svd="randomized", oversample=6, seed=3)
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    stats = spf.step()
    assert torch.equal(torch.get_rng_state(), rng)
    check(params, safety, task, stats, 3, "always", tol=1e-4)


def test_refresh_schedule_and_reuse_of_the_basis():
    params, safety, task = make_problem(shapes=[(12, 5)])
    spf = SPF(params, rank=2, refresh_every=2)
    wants = []
    s0 = safety
    for step in range(5):
        wants.append(spf.wants_reference)
        s = [with_spectrum(p.shape) for p in params[:-1]] + [safety[-1]] if step else s0
        g = [-3 * si + 0.3 * torch.randn_like(si) for si in s[:-1]] + [task[-1]]
        if step in (0, 3):  # step 2 skips its reference: the refresh waits for one
            with spf.reference():
                set_grad_by_backward(params, s)
            basis_s = s
        set_grad_by_backward(params, g)
        stats = spf.step()
        assert stats.refreshed == (step in (0, 3))
        # Between refreshes the stored basis and safety coordinates are used.
        check(params, basis_s, g, stats, 2, "conflicting", tol=1e-5)
        for p in params:
            p.grad = None
    assert wants == [True, False, True, True, False]

    once = SPF(params, rank=2)  # refresh_every=None: once, at the first reference
    assert once.wants_reference
    with once.reference():
        set_grad_by_backward(params, safety)
    once.step()
    assert not once.wants_reference


def test_zero_and_rank_deficient_safety_gradients():
    params, _, task = make_problem(shapes=[(10, 6)])
    safety = [torch.zeros(10, 6), with_spectrum((10, 6), rank=1), torch.zeros(7)]
    spf = SPF(params, rank=3, mode="always")
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    stats = spf.step()
    assert torch.equal(params[0].grad, task[0])  # S = 0: no subspace, nothing removed
    new, _, _ = spf_reference(task[1], safety[1], 1, "always")  # only S's one direction
    torch.testing.assert_close(params[1].grad.double(), new, rtol=1e-5, atol=1e-5)
    assert stats.applied.tolist() == [False, True]  # an empty basis is never "applied"


def test_missing_gradients_and_accumulated_reference():
    params, safety, task = make_problem(shapes=[(8, 5)])
    spf = SPF(params, rank=2, mode="always")
    with spf.reference():  # S arrives in two halves: contexts accumulate
        set_grad_by_backward(params[1:2], [safety[1] / 2])
    with spf.reference():
        set_grad_by_backward(params[1:2], [safety[1] / 2])
    set_grad_by_backward(params[:1], task[:1])  # params[1] gets no task gradient
    stats = spf.step()
    assert params[1].grad is None
    assert torch.equal(params[0].grad, task[0])  # no safety gradient: no basis
    assert stats.applied.tolist() == [False, False]
    set_grad_by_backward(params[1:2], task[1:2])  # next step: the basis of params[1] exists
    spf.step()
    new, _, _ = spf_reference(task[1], safety[1], 2, "always")
    torch.testing.assert_close(params[1].grad.double(), new, rtol=1e-5, atol=1e-5)


def test_partial_reference_between_refreshes_updates_only_those_coordinates():
    params, safety, task = make_problem(shapes=[(12, 5)])
    spf = SPF(params, rank=2)
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    spf.step()
    for p in params:
        p.grad = None
    fresh = with_spectrum((12, 5))
    with spf.reference():  # no refresh due: only matrix 0's coordinates change
        set_grad_by_backward(params[:1], [fresh])
    task = [-3 * s + 0.3 * torch.randn_like(s) for s in safety[:-1]] + [task[-1]]
    set_grad_by_backward(params, task)
    stats = spf.step()
    assert not stats.refreshed
    check(params, [fresh, safety[1]], task, stats, 2, "conflicting", 1e-5, s_for_basis=safety)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_step_never_syncs(svd, forbid_host_sync):
    params, safety, task = make_problem(shapes=[(12, 5), (3, 20)])
    spf = SPF(params, rank=2, refresh_every=2, svd=svd)
    for _ in range(3):  # refresh step, plain step, refresh step
        if spf.wants_reference:
            with spf.reference():
                set_grad_by_backward(params, safety)
        set_grad_by_backward(params, task)
        # On the CPU the SVD runs on the host anyway; what must not appear is a
        # Python-level read of a tensor value anywhere in the step.
        with forbid_host_sync():
            stats = spf.step()
        for p in params:
            p.grad = None
    assert stats.refreshed


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"rank": 2, "refresh_every": 0}, ValueError, "refresh_every"),
        ({"rank": 2, "mode": "sometimes"}, ValueError, "mode"),
        ({"rank": 2, "svd": "qr"}, ValueError, "svd"),
        ({"rank": 2, "oversample": -1}, ValueError, "oversample"),
        ({"rank": 2, "backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SPF([torch.randn(4, 3, requires_grad=True)], **kwargs)


def _one_step(spf, params, safety, task):
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    return spf.step()


def test_backend_is_the_one_asked_for(monkeypatch):
    """SPF runs its fused reduction (||G||^2 of every matrix) on the backend it was given."""
    from safegrad_kernels.ops.dispatch import get_backend

    params, safety, task = make_problem(shapes=[(12, 5), (3, 20)])
    kind = type(get_backend("torch"))
    original, calls = kind.dot_norms, []

    def counted(self, grads, refs):
        calls.append(len(grads))
        return original(self, grads, refs)

    monkeypatch.setattr(kind, "dot_norms", counted)
    stats = _one_step(SPF(params, rank=2, backend="torch"), params, safety, task)
    assert calls == [4]  # one read of the four matrices' gradients; the bias is skipped
    want = torch.stack([g.double().square().sum() for g in task[:-1]])
    torch.testing.assert_close(stats.grad_norm_sq.double(), want, rtol=1e-5, atol=0)


def test_unavailable_backend_raises_before_anything_changes(monkeypatch):
    from safegrad_kernels import BackendUnavailable
    from safegrad_kernels.ops import cpp_backend

    monkeypatch.setenv(cpp_backend.DISABLE_ENV, "1")
    params, safety, task = make_problem(shapes=[(12, 5), (3, 20)])
    spf = SPF(params, rank=2, backend="cpp")
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params, task)
    before = [p.grad.clone() for p in params]
    with pytest.raises(BackendUnavailable, match="backend='cpp' is not available"):
        spf.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    # Nothing consumed and no refresh recorded: the same step can run once the backend can.
    assert spf.has_captured() and spf.wants_reference
    monkeypatch.delenv(cpp_backend.DISABLE_ENV)
    if cpp_backend.BACKEND.available()[0]:  # a machine without a compiler stops here
        assert spf.step().refreshed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grad_norm_sq_per_matrix(dtype):
    """float64 gradients (outside the fused ops' dtypes) and missing ones are covered too."""
    params, safety, task = make_problem(dtype, shapes=[(12, 5), (3, 20)])
    spf = SPF(params, rank=2)
    with spf.reference():
        set_grad_by_backward(params, safety)
    set_grad_by_backward(params[1:], task[1:])  # matrix 0 gets no task gradient
    stats = spf.step()
    assert params[0].grad is None and stats.grad_norm_sq.dtype == torch.float32
    want = torch.stack(
        [torch.zeros((), dtype=torch.float64)] + [g.double().square().sum() for g in task[1:-1]]
    )
    torch.testing.assert_close(stats.grad_norm_sq.double(), want, rtol=1e-5, atol=0)


def test_bad_params():
    with pytest.raises(ValueError, match="no weight matrix"):
        SPF([torch.randn(4, requires_grad=True)], rank=1)
    with pytest.raises(ValueError, match="params is empty"):
        SPF([], rank=1)
    w = torch.randn(4, 3, requires_grad=True)
    assert SPF([w, w], rank=1).matrices == (w,)


def test_state_dict_resumes_exactly():
    """A surgeon rebuilt from state_dict() continues as the original one would."""
    params, safety, task = make_problem(shapes=[(40, 24), (20, 36)])
    kw = dict(rank=3, refresh_every=3, svd="randomized", oversample=2, seed=5)
    first = SPF(params, **kw)

    def run_step(spf, s, g):
        if spf.wants_reference:
            with spf.reference():
                set_grad_by_backward(params, s)
        set_grad_by_backward(params, g)
        stats = spf.step()
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return stats, out

    draws = []
    for _ in range(5):
        s = [with_spectrum(p.shape) for p in params[:-1]] + [safety[-1]]
        g = [-3 * si + 0.3 * torch.randn_like(si) for si in s[:-1]] + [task[-1]]
        draws.append((s, g))
    for step in range(2):
        run_step(first, *draws[step])
    state = first.state_dict()
    second = SPF(params, **kw)
    second.load_state_dict(state)
    assert second.wants_reference == first.wants_reference
    for step in range(2, 5):
        sa, ga = run_step(first, *draws[step])
        sb, gb = run_step(second, *draws[step])
        assert sa.refreshed == sb.refreshed == (step == 3)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb)), step

    with pytest.raises(ValueError, match="saved for other parameters"):
        SPF([torch.randn(8, 8, requires_grad=True)], rank=3).load_state_dict(state)
    with pytest.raises(ValueError, match="not an SPF state"):
        SPF(params, **kw).load_state_dict({"step": 1})


def test_step_without_any_gradient_of_a_kind_raises():
    """Never silently off: no task gradient at all, or no basis and no safety gradient."""
    params, safety, task = make_problem(shapes=[(7, 5)])
    spf = SPF(params, rank=2, refresh_every=2)
    set_grad_by_backward(params, task)
    assert spf.wants_reference
    with pytest.raises(RuntimeError, match="no captured reference"):
        spf.step()  # no basis yet and nothing captured
    assert all(torch.equal(p.grad, t) for p, t in zip(params, task))  # nothing touched
    with spf.reference():
        set_grad_by_backward(params, safety)
    spf.step()
    assert not spf.wants_reference
    spf.step()  # between refreshes no reference is needed
    for p in params:
        p.grad = None
    with pytest.raises(RuntimeError, match="no task"):
        spf.step()  # nothing at all: the engine lost every gradient
    spf.step(allow_missing=True)  # accepted when asked: gradients stay None
    assert all(p.grad is None for p in params)
