"""Test-wide set-up: the Triton interpreter, seeds and thread count.

TRITON_INTERPRET must be set before anything imports triton, so that the Triton
backend runs its kernels on CPU tensors (correctness only; it is slow).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch


def pytest_report_header(config):
    from safegrad_kernels import available_backends

    rows = [
        f"{k}={'yes' if ok else 'no (' + why + ')'}"
        for k, (ok, why) in available_backends().items()
    ]
    return [f"torch {torch.__version__}; backends: " + ", ".join(rows)]


@pytest.fixture(autouse=True)
def _fresh_seed_and_threads(request):
    # Fresh random data every run (the seed is printed on failure), 2 threads like CI.
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(2)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({value})")
