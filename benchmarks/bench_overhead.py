"""Host overhead of one ``SafeGrad.step()``: the time the GPU would wait on Python.

    python -m benchmarks.bench_overhead                       # cpp and triton, 448/1120/5000
    python -m benchmarks.bench_overhead --counts 448 --backends cpp --repeats 400
    python -m benchmarks.bench_ops --overhead                 # the same, from bench_ops

Every tensor has 4 elements, so the kernels' own work is negligible and what is timed
is the host side: building the lists in ``SafeGrad.step``, validation, grouping,
backend resolution, the kernel-op calls and the stats. The triton path runs on CPU
tensors with its launch function stubbed out (``triton_backend._launch`` does nothing):
it measures everything the triton backend does on the host (pointer-table lookup,
chunk metadata, launch arguments) except the launch itself, which on a GPU costs a few
us per kernel (3 kernels per global step). For cpp the measured time includes the two
C++ kernel ops, run for real on 4-element tensors.

Two layouts are timed side by side: the default surgeon (one gradient tensor per
parameter, every op sees n tensors) and ``SafeGrad(flat_grads=True)`` (the surgeon owns
one buffer per dtype, ``p.grad`` are views: the op sees one tensor, the per-parameter
work is an identity check). The target is judged on the flat step, the means issue 14
names; the default step is printed beside it. For the flat layout the other per-step
host work the surgeon adds is timed too: entering and leaving the ``reference()``
context (two ``p.grad`` swaps per parameter, in both layouts) and ``zero_grad()``, and,
beside SafeGrad's, the flat step of ``PCGrad(num_objectives=3, flat_grads=True)`` (one Gram
pass and one combine pass over three flat buffers, plus drawing the visiting order).

For the default layout it times each stage of the op pipeline on the same lists, so
that the breakdown (validation, grouping, resolve, kernels, the op boundary) reads
beside the total. Medians over ``--repeats`` calls; the load average is printed, since
the machine may be shared. Nothing is saved: the numbers go to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safegrad_kernels import PCGrad, SafeGrad
from safegrad_kernels.ops import library, pipeline, validate
from safegrad_kernels.ops.dispatch import resolve

NUMEL = 4
# The target of issue 14 item 3: 0.2 ms for W1's 448 tensors, 0.5 us per further tensor.
TARGET_BASE_MS, TARGET_BASE_N, TARGET_PER_TENSOR_US = 0.2, 448, 0.5


def median_us(fn: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def target_ms(n: int) -> float:
    return TARGET_BASE_MS + max(n - TARGET_BASE_N, 0) * TARGET_PER_TENSOR_US / 1e3


def measure_flat(backend: str, n: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median microseconds of the flat layout's step, capture context and zero_grad.

    On CUDA the kernels run asynchronously, so this is the host's time per call: what
    the GPU would wait for if its own work were shorter.
    """
    gen = torch.Generator().manual_seed(n)
    params = [torch.nn.Parameter(torch.randn(NUMEL, generator=gen).to(device)) for _ in range(n)]
    surgeon = SafeGrad(params, rho=1.0, backend=backend, flat_grads=True)
    with surgeon.reference():  # a g_a in the surgeon's buffers, as a backward leaves it
        for p in params:
            p.grad.add_(torch.randn(NUMEL, generator=gen).to(device))
    for p in params:
        p.grad.add_(torch.randn(NUMEL, generator=gen).to(device))

    def step() -> None:
        surgeon._live[0] = True  # what a reference() context leaves: this step's capture
        surgeon.step()

    def capture() -> None:
        with surgeon.reference():
            pass

    pcgrad = PCGrad(params, num_objectives=3, backend=backend, flat_grads=True)
    for j in (1, 2):  # each objective's gradient in the surgeon's buffers
        with pcgrad.objective(j):
            for p in params:
                p.grad.add_(torch.randn(NUMEL, generator=gen).to(device))

    def pcgrad_step() -> None:
        pcgrad._live[:] = [True, True]  # what the two objective() contexts leave
        pcgrad.step()

    return {
        "flat step": median_us(step, repeats),
        "flat reference() ctx": median_us(capture, repeats),
        "flat zero_grad()": median_us(surgeon.zero_grad, repeats),
        "pcgrad(3) flat step": median_us(pcgrad_step, repeats),
    }


def measure(backend: str, n: int, repeats: int) -> dict[str, float]:
    """Median microseconds of the whole step and of each pipeline stage, ``n`` tensors."""
    gen = torch.Generator().manual_seed(n)
    params = [torch.nn.Parameter(torch.randn(NUMEL, generator=gen)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(NUMEL, generator=gen)
    refs = [torch.randn(NUMEL, generator=gen) for _ in range(n)]
    grads = [p.grad for p in params]
    surgeon = SafeGrad(params, rho=1.0, backend=backend)

    def step() -> None:
        surgeon._slots[0] = list(refs)  # what a reference() backward leaves there
        surgeon.step()

    kernels = resolve(backend, torch.device("cpu"))
    coef = torch.zeros(n)
    lists = (grads, refs)
    args = (grads, refs, 1.0, 1e-30, False, backend)
    return {
        "step": median_us(step, repeats),
        "check_lists": median_us(
            lambda: validate.check_lists(pipeline.PAIR_NAMES, lists, written=True), repeats
        ),
        "group_by_dtype": median_us(lambda: pipeline.group_by_dtype(lists), repeats),
        "resolve": median_us(lambda: resolve(backend, torch.device("cpu")), repeats),
        "kernel dot_norms": median_us(lambda: kernels.dot_norms(grads, refs), repeats),
        "kernel axpy_ (c=0)": median_us(lambda: kernels.axpy_(grads, refs, coef), repeats),
        "pipeline op": median_us(lambda: pipeline.project_conflicting_(*args), repeats),
        "custom op (boundary)": median_us(lambda: library.project_conflicting_(*args), repeats),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="448,1120,5000", help="comma list of tensor counts")
    p.add_argument("--backends", default="cpp,triton", help="comma list of cpp, triton, torch")
    p.add_argument("--repeats", type=int, default=200)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    backends = [b for b in args.backends.split(",") if b]
    print(
        f"host overhead, {NUMEL}-element tensors, load average {os.getloadavg()[0]:.2f}, "
        f"{os.cpu_count()} cpus, torch {torch.__version__}"
    )
    rows: list[dict[str, object]] = []
    for backend in backends:
        restore = None
        if backend == "triton":
            if not torch.cuda.is_available():  # CPU tensors: the interpreter's backend
                os.environ.setdefault("TRITON_INTERPRET", "1")
            from safegrad_kernels.ops import triton_backend

            ok, why = triton_backend.TritonBackend().available()
            if not ok:
                print(f"triton: skipped ({why})")
                continue
            # The host side only: no kernel launch (see the module docstring).
            restore, triton_backend._launch = triton_backend._launch, lambda *a, **k: None
        try:
            for n in counts:
                res = {
                    **measure_flat(backend, n, args.repeats),
                    **measure(backend, n, args.repeats),
                }
                goal = target_ms(n) * 1e3
                verdict = "ok" if res["flat step"] <= goal else "over"
                print(
                    f"\n{backend}, {n} tensors: flat_grads step {res['flat step']:.0f} us "
                    f"(target {goal:.0f} us: {verdict}); default step {res['step']:.0f} us "
                    f"({res['step'] / n:.2f} us/tensor)"
                )
                for stage, us in res.items():
                    if stage not in ("step", "flat step"):
                        print(f"  {stage:<22} {us:9.1f} us")
                rows.append({"backend": backend, "n": n, **res, "target_us": goal})
        finally:
            if restore is not None:
                triton_backend._launch = restore
    return rows


if __name__ == "__main__":
    main()
