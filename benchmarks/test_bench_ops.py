"""pytest-benchmark cases mirroring ``bench_ops.py`` (not part of the default test run).

    pytest benchmarks/test_bench_ops.py --benchmark-only                    # W1, W2, W4
    SAFEGRAD_BENCH_W3=1 pytest benchmarks/test_bench_ops.py -k W3 --benchmark-only
    pytest benchmarks/test_bench_ops.py -k "W1 and project and fp32" --benchmark-columns=median,iqr

Each test times one provider on one case with ``benchmark.pedantic``: the in-place
modified gradients are restored in ``setup`` (untimed), one call per round. Before the
first round the provider's output is checked against a float64 reference, as in
``bench_ops``. Cases are ordered so that consecutive tests share the (large) input data.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from benchmarks import bench_ops
from benchmarks.cases import Case
from benchmarks.check import Checker
from benchmarks.families import FAMILIES
from benchmarks.harness import DTYPES
from benchmarks.workloads import WORKLOADS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = bench_ops.available_backend_names(DEVICE, allow_interpreter=False)
PROVIDERS = [*BACKENDS, *bench_ops.DEFAULT_PROVIDERS]
WORKLOAD_NAMES = ["W1", "W2", "W4"] + (["W3"] if os.environ.get("SAFEGRAD_BENCH_W3") else [])


def _cases():
    out = []
    for w in WORKLOAD_NAMES:
        for dname in ("fp32", "bf16"):
            specs = [("dot_norms", 2, True)]
            specs += [("project_conflicting_", 2, c) for c in (True, False)]
            ms = bench_ops.DEFAULT_MS.get(w, (2, 4, 8))
            specs += [(op, m, c) for op in bench_ops.TASK_OPS for m in ms for c in (True, False)]
            for op, m, conflict in specs:
                for prov in PROVIDERS:
                    if prov == "flat-gemm" and op not in bench_ops.PAIR_OPS:
                        continue
                    if prov == "torchjd" and op != "pcgrad_":
                        continue
                    mark = f"m{m}-" if op in bench_ops.TASK_OPS else ""
                    cid = f"{w}-{dname}-{op}-{mark}{'conflict' if conflict else 'none'}-{prov}"
                    out.append(pytest.param(w, dname, op, m, conflict, prov, id=cid))
    return out


_cache: dict[tuple, tuple] = {}


def _case_data(key: tuple) -> tuple:
    """Build the case's inputs once; drop the previous case's (they can be GBs)."""
    if key not in _cache:
        _cache.clear()
        gc.collect()
        w, dname, op, m, conflict = key
        case = Case(WORKLOADS[w], DTYPES[dname], FAMILIES[op], m, conflict)
        data = case.build(DEVICE, PROVIDERS)
        _cache[key] = (case, data, Checker(case, data))
    return _cache[key]


@pytest.mark.parametrize(("workload", "dtype", "op", "m", "conflict", "provider"), _cases())
def test_op(benchmark, workload, dtype, op, m, conflict, provider):
    case, data, checker = _case_data((workload, dtype, op, m, conflict))
    cands = case.family.candidates(data, BACKENDS, [provider], 0.0)
    cands = [c for c in cands if c.name == provider]
    if not cands:
        pytest.skip(f"provider {provider} not available")
    cand = cands[0]
    if cand.reset:
        cand.reset()
    assert not checker.verify(cand.name, cand.fn(), 0.0)
    benchmark.extra_info.update(
        numel=case.work.numel, n_tensors=case.work.n_tensors, bytes=case.bytes_moved()
    )

    def setup():
        if cand.reset:
            cand.reset()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    def run():
        cand.fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, setup=setup, rounds=7, iterations=1, warmup_rounds=1)
