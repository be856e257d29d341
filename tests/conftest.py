"""Test-wide set-up: devices, the Triton interpreter, seeds, threads and the host-sync guard.

Devices: ``DEVICE_PARAMS`` is cpu always and cuda when a CUDA device is present (marked
``gpu``, so ``pytest -m gpu`` selects the CUDA cases; skipped with a reason elsewhere).

TRITON_INTERPRET must be set before anything imports triton. Without CUDA it is switched
on, so that the Triton backend runs its kernels on CPU tensors (correctness only; slow);
with CUDA it is left alone, so that Triton compiles natively for the GPU.
"""

import contextlib
import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

NO_CUDA = "no CUDA device here (pytest -m gpu runs these on a GPU machine)"
DEVICE_PARAMS = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]),
]


def device_backend_params(backends_of):
    """``(device, backend)`` params: every backend available on each device of ``DEVICE_PARAMS``.

    ``backends_of(device)`` lists the backends to test there. Without CUDA the cuda
    entries are the backends a GPU would run (triton, torch), skipped with a reason.
    """
    out = [("cpu", b) for b in backends_of("cpu")]
    cuda = backends_of("cuda") if CUDA else ["triton", "torch"]
    marks = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
    return out + [pytest.param("cuda", b, marks=marks) for b in cuda]


@pytest.fixture
def on_device(request):
    """Runs a test with ``device`` (its parameter) as torch's default device."""
    device = request.getfixturevalue("device")
    torch.set_default_device(device)
    yield torch.device(device)
    # None, not "cpu": set_default_device installs a TorchFunctionMode for any device, and a
    # mode left behind would change later tests (the ops' eager path steps aside for modes).
    torch.set_default_device(None)


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


# Every Python-level way of reading a tensor's value on the host. On CUDA each one waits
# for the device; on the CPU they are free, but forbidding them there too lets the CPU
# test run prove that the hot path never asks (`if dot < 0:` would call __bool__).
_HOST_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
)


@contextlib.contextmanager
def _no_host_sync(cuda: bool | None = None):
    """Inside the block, reading a tensor value on the host raises ``AssertionError``.

    ``cuda``: also set ``torch.cuda.set_sync_debug_mode("error")``, which catches the
    synchronising CUDA calls that never pass through Python (``nonzero``, ``torch.equal``
    on device tensors, a blocking copy to the host). ``None`` (default): on when CUDA is
    available and already initialised, i.e. when the test has put tensors on a GPU;
    setting the mode would otherwise initialise CUDA for a CPU-only test.
    """

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation on the hot path")

    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("forbid_host_sync(cuda=True) needs CUDA")
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    mode = torch.cuda.get_sync_debug_mode() if cuda else None
    for name in _HOST_READS:
        setattr(torch.Tensor, name, boom)
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        yield
    except RuntimeError as exc:
        if cuda and "synchronizing" in str(exc):
            raise AssertionError(f"host synchronisation on the hot path: {exc}") from exc
        raise
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def forbid_host_sync():
    """The guard as a context manager: ``with forbid_host_sync(): surgeon.step()``."""
    return _no_host_sync


# --- the `safegrad train`/`eval` tests: the `safegrad example` folder and a tripwire ---
# ``example_world`` writes the example model and sample data (about a second, once per
# module); ``no_model_load`` makes any tokenizer or model load fail the test, to prove that
# a refusal happened before anything loaded. ``helpers_example.train_argv`` runs on them.
# (Here, not in tests/cli/conftest.py: a second module named ``conftest`` would shadow
# this one for the tests that import ``conftest``'s helpers.)


@pytest.fixture(scope="module")
def example_world(tmp_path_factory) -> dict:
    from safegrad_kernels.example import write_example

    root = tmp_path_factory.mktemp("example")
    written = write_example(root / "ex")
    data = Path(written["data_dir"])
    return {
        "root": root,
        "model": str(written["model"]),
        "task": str(data / "sentiment_train.json"),
        "task_eval": str(data / "sentiment_eval.jsonl"),
        "harmful": str(data / "harmful.jsonl"),
        "alignment": str(data / "refusals.jsonl"),
        "harmful_eval": str(data / "harmful_eval.json"),
        "written": written,
    }


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Fail the test if a tokenizer or model is loaded."""
    from safegrad_kernels import evaluation_run, training_run

    def tripwire(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded")

    for module in (training_run, evaluation_run):
        for name in ("load_tokenizer", "load_causal_lm"):
            monkeypatch.setattr(module, name, tripwire)
