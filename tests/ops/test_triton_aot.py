"""Ahead-of-time checks of the Triton kernels for sm_80 and sm_90 (no GPU needed).

Every kernel compiles for fp32 and bf16; the streaming kernels' aligned variants use
128-bit global accesses and spill nothing; kernel launches per op do not grow with the
number of tensors (counted under the interpreter).
"""


# TRITON_INTERPRET: tests/conftest.py (on without CUDA, off with it).

import pytest
import torch

pytest.importorskip("triton")

from safegrad_kernels.ops import triton_aot as aot
from safegrad_kernels.ops import triton_backend as tb

ARCHS = ("sm_80", "sm_90")
DTYPES = ("fp32", "bf16")


@pytest.fixture(scope="module")
def rows():
    return aot.aot_report(archs=(80, 90), dtypes=DTYPES, aligned=(True,))


def _vector(forms):
    return [f for f in forms if f.split(".")[-2:-1] == ["v4"] and f.endswith("b32")]


def test_every_kernel_compiles(rows):
    got = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    for kernel in aot.STREAMING:
        for arch in ARCHS:
            for dtype in DTYPES:
                assert (kernel, arch, dtype) in got
    assert {("_segment_sum_kernel", arch, "fp32") for arch in ARCHS} <= got
    table = aot.format_report(rows)
    assert all(k in table for k in aot.KERNELS)


def test_streaming_kernels_use_128_bit_accesses(rows):
    for r in rows:
        if r["kernel"] not in aot.STREAMING:
            continue
        where = f"{r['kernel']} {r['arch']} {r['dtype']}"
        assert _vector(r["loads"]), f"{where}: no 128-bit load in {r['loads']}"
        assert r["max_load_bits"] == 128, where
        if r["kernel"] in ("_axpy_kernel", "_combine_kernel"):
            assert _vector(r["stores"]), f"{where}: no 128-bit store in {r['stores']}"


def test_no_spills(rows):
    if aot.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (neither in the triton wheel nor on PATH)")
    for r in rows:
        assert r["spill_bytes"] == 0, f"{r['kernel']} {r['arch']} {r['dtype']} spills"
        assert 0 < r["registers"] <= 128, r


def test_unaligned_variant_has_no_vector_loads():
    # Table addresses carry no alignment facts: without the host-checked hints Triton
    # falls back to one access per element. This is why the hints (and the check) exist.
    for r in aot.aot_report(archs=(90,), dtypes=("fp32",), aligned=(False,)):
        if r["kernel"] in aot.STREAMING:
            assert not _vector(r["loads"]) and r["max_load_bits"] == 32, r


@pytest.mark.skipif(
    not (tb.TritonBackend().available()[0] and tb.TritonBackend().supports(torch.device("cpu"))),
    reason="needs TRITON_INTERPRET=1 to launch on CPU tensors",
)
def test_launches_per_op_do_not_depend_on_tensor_count(monkeypatch):
    counting, names = tb.launch_counter()
    monkeypatch.setattr(tb, "_launch", counting)
    monkeypatch.setattr(tb, "CHUNK_SIZE", 32)  # small blocks: the interpreter is slow
    monkeypatch.setattr(tb, "BLOCK_SIZE", 8)
    backend = tb.TritonBackend()
    per_count = {}
    for n in (1, 40):
        grads = [torch.randn(k % 5 + 1) for k in range(n)]
        refs = [torch.randn(k % 5 + 1, dtype=torch.bfloat16) for k in range(n)]
        names.clear()
        backend.dot_norms(grads, refs)
        backend.axpy_(grads, refs, torch.randn(n))
        backend.gram([grads, grads, grads])
        backend.combine_(grads, [grads, grads], torch.randn(2))
        per_count[n] = list(names)
    assert (
        per_count[1]
        == per_count[40]
        == [
            "_dot_norms_partial_kernel",
            "_segment_sum_kernel",
            "_axpy_kernel",
            "_gram_partial_kernel",
            "_segment_sum_kernel",
            "_combine_kernel",
        ]
    )


@pytest.fixture(scope="module")
def amd_rows():
    # Compiled in a clean subprocess (this session interprets triton's own functions); an
    # AMD arch this triton cannot compile for comes back as one row with its error.
    rows = aot.aot_report(archs=aot.AMD_ARCHS, dtypes=DTYPES, aligned=(True,))
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        pytest.skip(f"this triton cannot compile for AMD here: {errors[0]}")
    return rows


def test_amd_targets_compile_without_spills(amd_rows):
    got = {(r["kernel"], r["arch"], r["dtype"]) for r in amd_rows}
    for arch in aot.AMD_ARCHS:
        for kernel in aot.STREAMING:
            for dtype in DTYPES:
                assert (kernel, arch, dtype) in got
    for r in amd_rows:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 256, r


def test_amd_fp32_bodies_use_128_bit_buffer_loads(amd_rows):
    for r in amd_rows:
        if r["kernel"] in aot.STREAMING and r["dtype"] == "fp32":
            assert r["loads"].get("buffer_dwordx4", 0) > 0, r
            assert r["max_load_bits"] == 128, r


def test_amd_access_width_parsing():
    asm = "buffer_load_dwordx4 v[0:3]\nglobal_load_dwordx2 v[4:5]\nglobal_store_short_d16_hi v1"
    acc = aot.amdgcn_accesses(asm)
    assert acc == {
        "loads": {"buffer_dwordx4": 1, "global_dwordx2": 1},
        "stores": {"global_short_d16_hi": 1},
    }
    assert aot._amd_widest(acc["loads"]) == 128
    assert aot._amd_widest(acc["stores"]) == 16
    assert aot._amd_widest({"global_dwordx2": 3, "global_dword": 1}) == 32
