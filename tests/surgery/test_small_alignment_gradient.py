"""Near the reference model: the alarming-looking statistics are harmless (issue 12).

A LoRA model a few steps from its reference has a tiny alignment gradient g_a (||g_a||^2
scales with lr^2) and a KL near 0. These tests pin down why the numbers are fine:
SafeGrad's projection stays exact and bounded for tiny g_a (its default eps is only an
underflow guard), and the reported KL is clamped at 0 while its gradient stays exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from safegrad_kernels.losses import kl_alignment_loss
from safegrad_kernels.surgery import SafeGrad

SHAPES = [(1031,), (257, 3), (17,)]


def _set_grad(params, values):
    sum((p * v).sum() for p, v in zip(params, values)).backward()


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e-9, 1e-12])
@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_projection_is_exact_and_bounded_for_a_tiny_alignment_gradient(scale, rho):
    gu = [torch.randn(s) * 1e-2 for s in SHAPES]
    # A real conflict (cos about -0.5) whatever the scale of g_a.
    ga = [(-0.6 * g + 1e-2 * torch.randn(s)) * scale for g, s in zip(gu, SHAPES)]
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    surgeon = SafeGrad(params, rho=rho)  # default eps
    with surgeon.reference():
        _set_grad(params, ga)
    _set_grad(params, gu)
    stats = surgeon.step()

    u, a = _flat(gu), _flat(ga)
    nsq = float(a @ a)
    assert nsq < 1e-5 * float(u @ u)  # g_a is tiny next to g_u
    c = float(u @ a) / nsq
    expected = u - c * a + rho * a
    got = _flat([p.grad for p in params])
    assert bool(stats.conflict), f"no projection at ||g_a||^2 = {nsq:.1e}"
    # fp32 against float64: a few ulps of ||g_u||, at every scale of g_a.
    assert float((got - expected).norm()) <= 1e-6 * float(u.norm())
    # The removed component is at most g_u itself, however large |c| is (here up to ~1e12).
    removed = abs(float(stats.coef)) * math.sqrt(float(stats.ref_norm_sq))
    assert removed <= float(u.norm()) * (1 + 1e-6)
    # After the projection (rho = 0) nothing of g_u points against g_a any more.
    if rho == 0.0:
        assert abs(float(got @ a)) <= 1e-6 * float(got.norm()) * math.sqrt(nsq)


def test_an_exactly_zero_alignment_gradient_leaves_the_task_gradient_alone():
    # Step 0 of LoRA training: the model equals the reference, so g_a is exactly 0.
    gu = [torch.randn(s) for s in SHAPES]
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    surgeon = SafeGrad(params, rho=1.0)
    with surgeon.reference():
        _set_grad(params, [torch.zeros(s) for s in SHAPES])
    _set_grad(params, gu)
    stats = surgeon.step()
    assert not bool(stats.conflict) and float(stats.ref_norm_sq) == 0.0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, gu))


def _fp32_kl_sum(logits, ref):
    """The unclamped fp32 sum the loss computes (positions="all")."""
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    return float(((log_q - log_p) * log_q.exp()).sum())


def test_reported_kl_is_clamped_at_zero_and_its_gradient_is_exact():
    negative = 0
    for _ in range(12):
        ref = torch.randn(3, 7, 1031) * 3
        logits = (ref + 1e-6 * torch.randn(ref.shape)).requires_grad_(True)
        labels = torch.randint(0, 1031, (3, 7))
        loss = kl_alignment_loss(logits, ref, labels, positions="all")
        assert float(loss.detach()) >= 0.0
        raw = _fp32_kl_sum(logits.detach(), ref)
        if raw < 0:
            negative += 1
            assert float(loss.detach()) == 0.0  # rounding, reported as the 0 it is
        loss.backward()
        count = float((labels[:, 1:] != -100).sum())
        exact = torch.softmax(logits.detach().double(), -1) - torch.softmax(ref.double(), -1)
        # fp32 softmax entries (<= 1) carry up to an ulp each, 2 of them per entry, / count:
        # seen 1.03e-8 against 1e-8 allowed before, at one of 21651 entries.
        ulp = torch.finfo(torch.float32).eps
        torch.testing.assert_close(
            logits.grad.double(), exact / count, rtol=0, atol=4 * ulp / count
        )
    # Perturbations of 1e-6 round the fp32 sum below 0 about half the time (measured 11/20):
    # without such a case this test would check nothing.
    assert negative > 0
