"""The eager path (``ops.functional`` calling the pipeline without the custom-op boundary)
and the rule any metadata shortcut must keep: a call never reuses a stale check.

After a good call on a set of tensors, changing one tensor's shape, stride, dtype,
device or storage, or passing a new tensor, must still raise before anything is
written. The eager path must give bitwise the results of the boundary and bump the
mutated tensors' version counters as it does.
"""

from __future__ import annotations

import pytest
import torch

from safegrad_kernels.ops import functional, library, project_conflicting_

BACKENDS = ["torch", "cpp"]


def _lists(n: int, numel: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(numel + i, generator=gen) for i in range(n)]
    refs = [torch.randn(numel + i, generator=gen) - 0.5 for i in range(n)]
    return grads, refs


def _backend_ok(name: str) -> None:
    from safegrad_kernels.ops.dispatch import available_backends

    ok, why = available_backends("cpu")[name]
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_eager_matches_boundary_bitwise(backend, per_tensor, n):
    _backend_ok(backend)
    grads, refs = _lists(n, seed=n)
    a = [g.clone() for g in grads]
    b = [g.clone() for g in grads]
    assert functional._eager(a, refs)
    out_eager = project_conflicting_(a, refs, rho=0.7, per_tensor=per_tensor, backend=backend)
    out_op = library.project_conflicting_(b, refs, 0.7, 1e-12, per_tensor, backend)
    assert torch.equal(out_eager, out_op)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        # Bumped, as autograd needs; the count may differ (the torch backend's own
        # in-place ops bump it too outside the boundary), which autograd allows.
        assert x._version >= 1 and y._version >= 1


def test_eager_not_taken_where_the_boundary_matters():
    grads, refs = _lists(3)
    assert functional._eager(grads, refs)
    needs = [g.clone().requires_grad_() for g in grads]
    assert not functional._eager(needs, refs)
    with torch.no_grad():
        assert functional._eager(needs, refs)
    meta = [torch.empty(3, device="meta")]
    assert not functional._eager(meta, meta)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not functional._eager(grads, refs)


def test_requires_grad_input_still_records_the_op():
    grads, refs = _lists(2)
    grads = [g.requires_grad_() for g in grads]
    out = project_conflicting_(grads, refs, rho=1.0, backend="torch")
    assert out.grad_fn is not None  # as through the boundary


def _good_then(backend, mutate, error):
    """A good call, then the same lists with one change: raises, writes nothing."""
    _backend_ok(backend)
    grads, refs = _lists(6, seed=3)
    project_conflicting_(grads, refs, rho=1.0, backend=backend)
    grads, refs = mutate(grads, refs)
    before = [g.clone() for g in grads]
    with pytest.raises(error):
        project_conflicting_(grads, refs, rho=1.0, backend=backend)
    for g, b in zip(grads, before):
        if g.device.type != "meta":
            assert torch.equal(g, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_shape_after_good_call(backend):
    def mutate(grads, refs):
        refs[2].resize_(refs[2].numel() - 1)  # same storage, same pointer, new shape
        return grads, refs

    _good_then(backend, mutate, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_stride_after_good_call(backend):
    def mutate(grads, refs):
        g = grads[4]
        g.as_strided_((g.numel() // 2,), (2,))  # same tensor object, now not contiguous
        refs[4] = refs[4][: g.numel()].clone()
        return grads, refs

    _good_then(backend, mutate, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_dtype_after_good_call(backend):
    def mutate(grads, refs):
        grads[1].data = grads[1].data.double()  # same object, unsupported dtype
        return grads, refs

    _good_then(backend, mutate, TypeError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_device_after_good_call(backend):
    def mutate(grads, refs):
        refs[3] = torch.empty(refs[3].shape, device="meta")
        return grads, refs

    _good_then(backend, mutate, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_overlapping_tensor_after_good_call(backend):
    def mutate(grads, refs):
        refs[5] = grads[0][: refs[5].numel()] if grads[0].numel() >= refs[5].numel() else None
        if refs[5] is None:  # make the pair's shapes match and alias a written tensor
            grads[5] = grads[5][: grads[0].numel()].clone()
            refs[5] = grads[0]
        return grads, refs

    _good_then(backend, mutate, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_storage_after_good_call(backend):
    def mutate(grads, refs):
        # Same tensor objects, new storage: grads[2] now aliases grads[1].
        grads[2].set_(grads[1].untyped_storage(), 0, (grads[1].numel() - 1,))
        refs[2] = refs[2][: grads[2].numel()].clone()
        return grads, refs

    _good_then(backend, mutate, ValueError)
