"""The torchjd integration: our jac_to_grad against torchjd's, our weightings against theirs."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchjd")

from paths import ROOT
from torchjd.aggregation import (
    IMTLG,
    MGDA,
    GradDrop,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    UPGrad,
    Weighting,
)
from torchjd.aggregation import PCGrad as TorchjdPCGrad
from torchjd.aggregation import PCGradWeighting as TorchjdPCGradWeighting
from torchjd.autojac import backward as jd_backward
from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
from torchjd.linalg import PSDMatrix

from safegrad_kernels.integrations.torchjd import (
    PCGradWeighting,
    SafeGradWeighting,
    jac_to_grad,
)
from safegrad_kernels.ops.dispatch import available_backends
from safegrad_kernels.surgery import SafeGrad

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]
# Odd sizes, one tensor across the Triton chunk size (16384), a scalar-like one.
SHAPES = [(7, 3), (13,), (5, 2, 3), (1,), (16385,), (31,)]
RTOL = 1e-6  # relative to the largest |entry|: fp32 against fp32 with the same Gram math


def make_params(shapes=SHAPES, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def set_jacs(params, m, *, conflict=True):
    """Random ``p.jac`` rows sharing a direction, with opposing signs when ``conflict``."""
    signs = [(-1.0) ** j if conflict else 1.0 for j in range(m)]
    for p in params:
        common = torch.randn(p.shape)
        rows = [s * (1 + random.random()) * common + 0.5 * torch.randn(p.shape) for s in signs]
        p.jac = torch.stack(rows).to(p.dtype)


def snapshot(params):
    return [
        (
            p.grad.clone() if p.grad is not None else None,
            p.jac.clone() if hasattr(p, "jac") else None,
        )
        for p in params
    ]


def grads_of(params):
    return [p.grad.clone() for p in params]


def reset_grads(params):
    for p in params:
        p.grad = None


def rel_err(got, want) -> float:
    """Largest absolute error relative to the largest |entry| of ``want``."""
    scale = max(w.abs().max().item() for w in want)
    return max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want)) / scale


def assert_close_rel(got, want, rtol=RTOL):
    err = rel_err(got, want)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def torchjd_orders(seed: int, m: int) -> torch.Tensor:
    """The visiting orders torchjd's PCGradWeighting draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.stack([torch.randperm(m) for _ in range(m)])


def make_upgrad():
    try:
        return UPGrad()
    except ImportError as err:  # torchjd >= 0.12 keeps quadprog in an extra
        pytest.skip(f"torchjd's UPGrad needs its QP solver: {err}")


# --- against torchjd's own jac_to_grad -------------------------------------------------


def check_against_torchjd(params, torchjd_aggregator, ours, *, initial=None, floor=1e-6):
    """Ours and torchjd's fp32 path against torchjd's algorithm run in float64.

    The tolerance rule of the style guide: our error may be at most twice torchjd's own
    fp32 error, plus a ``floor`` relative to the largest entry. (Measured on these
    shapes: ours 4e-7..7e-7, torchjd's fp32 path 6e-7..3.5e-6 for PCGrad and UPGrad at
    m = 3, 5: its Gram and weights stay in fp32.) ``initial``: a ``.grad`` per tensor
    to accumulate into, or None.
    """
    initial = initial or [None] * len(params)
    wide = [torch.nn.Parameter(p.detach().double()) for p in params]
    for w, p, g in zip(wide, params, initial):
        w.jac = p.jac.double()
        w.grad = None if g is None else g.double()
    seed = random.randrange(2**31)  # torchjd's own random draws repeat in every run
    torch.manual_seed(seed)
    w64 = torchjd_jac_to_grad(wide, torchjd_aggregator())
    for p, g in zip(params, initial):
        p.grad = None if g is None else g.clone()
    torch.manual_seed(seed)
    w32 = torchjd_jac_to_grad(params, torchjd_aggregator(), retain_jac=True)
    theirs = grads_of(params)
    for p, g in zip(params, initial):
        p.grad = None if g is None else g.clone()
    torch.manual_seed(seed)
    got_w = jac_to_grad(params, ours(seed))
    ref = grads_of(wide)
    allowed = 2 * rel_err(theirs, ref) + floor
    assert rel_err(grads_of(params), ref) <= allowed
    assert rel_err([got_w], [w64]) <= 2 * rel_err([w32], [w64]) + floor
    return got_w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [2, 3, 5])
def test_pcgrad_weighting_matches_torchjd_pcgrad(m, backend):
    params = make_params()
    set_jacs(params, m)

    def ours(seed):  # the visiting orders torchjd draws after that seed, given explicitly
        return PCGradWeighting(order=torchjd_orders(seed, m))

    check_against_torchjd(params, TorchjdPCGrad, ours)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_torchjd_upgrad_through_our_gram_matches_torchjd(m):
    params = make_params()
    set_jacs(params, m)
    make_upgrad()  # skips without the QP solver
    check_against_torchjd(params, make_upgrad, lambda seed: make_upgrad())


# IMTL-G solves a linear system in the Gram matrix, which turns the fp32 rounding of any
# Gram (ours or torch's, both ~1e-7 relative) into weight errors near 1e-6, so one draw's
# error ratio to torchjd's own fp32 path is noisy: over 300 draws (2026-12-02) ours had a
# median 7.6e-7 and max 3.1e-6, torchjd's fp32 path 9.4e-7 and 4.0e-6, and the 1e-6 floor
# failed 4% of draws without any defect. Its floor is that path's worst case; a wrong
# weight or a missed tensor errs by 1e-2 or more.
FLOORS = {"IMTLG": 5e-6}


@pytest.mark.parametrize("make_aggregator", [MGDA, IMTLG, TorchjdPCGrad], ids=lambda f: f.__name__)
def test_other_torchjd_gramian_aggregators(make_aggregator):
    params = make_params()
    set_jacs(params, 3)
    floor = FLOORS.get(make_aggregator.__name__, 1e-6)
    check_against_torchjd(params, make_aggregator, lambda seed: make_aggregator(), floor=floor)


def test_bare_torchjd_gramian_weighting_is_accepted():
    params = make_params()
    set_jacs(params, 3)
    check_against_torchjd(params, TorchjdPCGrad, lambda seed: TorchjdPCGradWeighting())


def test_real_torchjd_backward_and_accumulation():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    params = list(model.parameters())
    y = model(torch.randn(4, 5))
    jd_backward([y.pow(2).mean(), -y.sum(), y[:, 0].sin().sum()])
    initial = [torch.randn_like(p) if i % 2 else None for i, p in enumerate(params)]
    check_against_torchjd(
        params,
        TorchjdPCGrad,
        lambda seed: PCGradWeighting(order=torchjd_orders(seed, 3)),
        initial=initial,
    )
    assert not any(hasattr(p, "jac") for p in params)  # freed, as torchjd does


def test_bf16_jacobians_against_fp32_torchjd():
    params = make_params(dtype=torch.bfloat16)
    set_jacs(params, 3)
    wide = make_params()
    for p, q in zip(wide, params):
        p.jac = q.jac.float()
    order = torchjd_orders(seed := random.randrange(2**31), 3)
    torch.manual_seed(seed)
    torchjd_jac_to_grad(wide, TorchjdPCGrad())
    jac_to_grad(params, PCGradWeighting(order=order))
    assert all(p.grad.dtype == torch.bfloat16 for p in params)
    assert_close_rel(grads_of(params), grads_of(wide), rtol=1e-2)  # bf16 output rounding


# --- our weightings -----------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 1.0, 0.37])
@pytest.mark.parametrize("conflict", [True, False])
def test_safegrad_weighting_equals_the_surgeon(rho, conflict):
    params = make_params()
    set_jacs(params, 2, conflict=conflict)
    twins = make_params()
    surgeon = SafeGrad(twins, rho=rho)
    for p, q in zip(twins, params):
        p.grad = q.jac[0].clone()
    with surgeon.reference():
        for p, q in zip(twins, params):
            p.grad = q.jac[1].clone()
    stats = surgeon.step()
    weights = jac_to_grad(params, SafeGradWeighting(rho=rho))
    assert_close_rel(grads_of(params), grads_of(twins))
    assert weights[0] == 1
    torch.testing.assert_close(weights[1], rho - stats.coef, rtol=1e-6, atol=0)
    assert bool(stats.conflict) == conflict


def test_safegrad_weighting_eps_and_non_finite_rules():
    g = torch.tensor([[4.0, -3.0], [-3.0, 5.0]])  # conflict: c = -3 / 5
    torch.testing.assert_close(SafeGradWeighting(rho=0.5)(g), torch.tensor([1.0, 0.5 + 0.6]))
    assert torch.equal(SafeGradWeighting(rho=0.5, eps=5.0)(g), torch.tensor([1.0, 0.5]))
    bad = g.clone()
    bad[0, 0] = torch.inf
    assert torch.equal(SafeGradWeighting(rho=0.5)(bad), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="exactly 2 objectives"):
        SafeGradWeighting()(torch.eye(3))
    with pytest.raises(ValueError, match="rho"):
        SafeGradWeighting(rho=-1.0)


def test_pcgrad_weighting_generator_and_fixed_order():
    params = make_params()
    set_jacs(params, 4)
    gm = torch.stack([torch.cat([p.jac[i].reshape(-1) for p in params]) for i in range(4)])
    gm = gm @ gm.T
    a = PCGradWeighting(generator=torch.Generator().manual_seed(5))
    b = PCGradWeighting(generator=torch.Generator().manual_seed(5))
    assert torch.equal(a(gm), b(gm)) and torch.equal(a(gm), b(gm))  # same stream, call after call
    order = torch.tensor([random.sample(range(4), 4) for _ in range(4)])
    fixed = PCGradWeighting(order=order.tolist())
    assert torch.equal(fixed.order, order) and torch.equal(fixed(gm), fixed(gm))
    # The same weights torchjd's own weighting gives with that order.
    torch.manual_seed(seed := random.randrange(2**31))
    torchjd_w = TorchjdPCGradWeighting()(gm)
    torch.testing.assert_close(PCGradWeighting(order=torchjd_orders(seed, 4))(gm), torchjd_w)
    with pytest.raises(ValueError, match="for m=4"):
        fixed(gm[:3, :3])
    with pytest.raises(ValueError, match=r"order\[1\] must be a permutation"):
        PCGradWeighting(order=[[0, 1, 2], [1, 1, 2], [2, 0, 1]])
    with pytest.raises(ValueError, match="not both"):
        PCGradWeighting(order=order, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        PCGradWeighting(generator=5)


def test_our_weightings_plug_into_torchjd():
    # They are torchjd Weightings: torchjd's own jac_to_grad runs them too.
    params = make_params()
    set_jacs(params, 3)
    order = torchjd_orders(seed := random.randrange(2**31), 3)
    torch.manual_seed(seed)
    torchjd_jac_to_grad(params, TorchjdPCGrad(), retain_jac=True)
    want = grads_of(params)
    reset_grads(params)
    torchjd_jac_to_grad(params, GramianWeightedAggregator(PCGradWeighting(order=order)))
    assert_close_rel(grads_of(params), want, rtol=1e-5)  # torchjd's weights are fp32 math


# --- validation, no sync, lazy import -----------------------------------------------------


class WrongShape(Weighting[PSDMatrix]):
    def forward(self, gramian, /):
        return torch.ones(2)


def _case(name, params):
    """Break ``params`` in one way; returns (aggregator, tensors, exception, match)."""
    agg = PCGradWeighting()
    tensors = params
    if name == "no_jac":
        del params[2].jac
        return agg, tensors, ValueError, r"tensors\[2\] has no .jac"
    if name == "rows":
        params[3].jac = params[3].jac[:2]
        return agg, tensors, ValueError, r"tensors\[3\].jac has 2 rows"
    if name == "shape":
        params[1].jac = torch.randn(3, 5)
        return agg, tensors, ValueError, r"tensors\[1\].jac has shape"
    if name == "float64":
        params[0].jac = params[0].jac.double()
        return agg, tensors, TypeError, "float64"
    if name == "twice":
        return agg, [*params, params[0]], ValueError, "listed twice"
    if name == "empty":
        return agg, [], ValueError, "empty"
    if name == "matrix_weighting":
        return MeanWeighting(), tensors, TypeError, "Weighting\\[PSDMatrix\\]"
    if name == "jacobian_aggregator":
        return Mean(), tensors, TypeError, "GramianWeightedAggregator"
    if name == "graddrop":
        return GradDrop(), tensors, TypeError, "concatenated Jacobian"
    if name == "hook":
        hooked = TorchjdPCGrad()
        hooked.register_forward_hook(lambda *a: None)
        return hooked, tensors, ValueError, "forward hooks"
    if name == "weighting_raises":  # after the Gram pass, before any write
        return SafeGradWeighting(), tensors, ValueError, "exactly 2 objectives"
    if name == "not_an_aggregator":
        return (lambda g: torch.ones(3)), tensors, TypeError, "got function"
    if name == "bad_weights":
        return WrongShape(), tensors, ValueError, r"expected a tensor of shape \[3\]"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "no_jac",
        "rows",
        "shape",
        "float64",
        "twice",
        "empty",
        "matrix_weighting",
        "jacobian_aggregator",
        "graddrop",
        "hook",
        "weighting_raises",
        "not_an_aggregator",
        "bad_weights",
    ],
)
def test_bad_calls_raise_and_change_nothing(name):
    params = make_params()
    set_jacs(params, 3)
    params[4].grad = torch.randn(params[4].shape)
    agg, tensors, exc, match = _case(name, params)
    before = snapshot(params)
    with pytest.raises(exc, match=match):
        jac_to_grad(tensors, agg)
    for (g0, j0), p in zip(before, params):
        assert (p.grad is None) if g0 is None else torch.equal(p.grad, g0)
        assert (not hasattr(p, "jac")) if j0 is None else torch.equal(p.jac, j0)


@pytest.mark.parametrize(
    "make_weighting",
    [
        lambda m: PCGradWeighting(),
        lambda m: PCGradWeighting(generator=torch.Generator().manual_seed(1)),
        lambda m: PCGradWeighting(order=torch.arange(m).expand(m, m)),
        lambda m: SafeGradWeighting(rho=0.5),
    ],
    ids=["pcgrad_global_rng", "pcgrad_generator", "pcgrad_fixed_order", "safegrad"],
)
def test_our_weightings_never_sync(make_weighting, forbid_host_sync):
    m = 2 if "SafeGrad" in repr(make_weighting(2)) else 4
    params = make_params()
    set_jacs(params, m)
    params[0].grad = torch.randn(params[0].shape)  # the accumulating path too
    weighting = make_weighting(m)
    with forbid_host_sync():
        jac_to_grad(params, weighting)
    assert all(p.grad is not None for p in params)


def test_the_guard_catches_torchjds_host_side_pcgrad(forbid_host_sync):
    params = make_params()
    set_jacs(params, 3)
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        jac_to_grad(params, TorchjdPCGrad())


def test_importing_the_package_does_not_import_torchjd():
    code = (
        "import sys, safegrad_kernels, safegrad_kernels.integrations; "
        "assert 'torchjd' not in sys.modules, 'torchjd imported'; "
        "import safegrad_kernels.integrations.torchjd; assert 'torchjd' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_benchmark_runs_and_every_provider_is_accurate():
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_torchjd

    results = bench_torchjd.main(["--tiny", "--no-save", "--backends", "torch", "--threads", "1"])
    assert len(results) == 2  # m = 2 and m = 4
    for timings, errors in results.values():
        assert set(timings) == {"torchjd", "torchjd-gram", "ours-torch", "ours-torch+jd"}
        assert max(errors.values()) <= 1e-5, errors  # against torchjd's path in float64
