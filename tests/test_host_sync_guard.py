"""The ``forbid_host_sync`` fixture (tests/conftest.py) catches what it promises, and only there."""

import operator

import pytest
import torch

READS = {
    "item": lambda t: t.item(),
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "bool": lambda t: bool(t),
    "if": lambda t: 1 if t else 0,
    "float": lambda t: float(t),
    "int": lambda t: int(t),
    "index": lambda t: operator.index(t),
    "complex": lambda t: complex(t),
    "format": lambda t: f"{t:.3f}",
    "in": lambda t: 0.5 in t,
}


@pytest.mark.parametrize("read", list(READS), ids=list(READS))
def test_every_host_read_raises_inside_and_works_after(read, forbid_host_sync):
    t = torch.tensor([3], dtype=torch.int64) if read == "index" else torch.tensor(2.5)
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        READS[read](t)
    READS[read](t)  # restored on the way out, also after the error


def test_device_work_is_allowed(forbid_host_sync):
    x = torch.randn(7, 3)
    with forbid_host_sync():
        y = torch.where(x.sum() < 0, x, -x).norm()  # stays a tensor: no read
    assert y.item() >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_mode_needs_cuda(forbid_host_sync):
    with pytest.raises(RuntimeError, match="needs CUDA"), forbid_host_sync(cuda=True):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_debug_mode_catches_syncs_below_python(forbid_host_sync):
    x = torch.randn(1031, device="cuda")
    before = torch.cuda.get_sync_debug_mode()
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        x.nonzero()  # no Python-level read: only the CUDA sync check sees it
    assert torch.cuda.get_sync_debug_mode() == before
    with forbid_host_sync():
        x.mul_(0.5).add_(x.sum())  # asynchronous work passes
    assert x.isfinite().all().item()
