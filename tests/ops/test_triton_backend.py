"""Triton backend kernels on CPU tensors under the interpreter, against float64 references.

Chunks and blocks are shrunk (32 and 8 elements) so that a few dozen elements already
cross chunk boundaries: sizes 31/32/33 are chunk -1/0/+1, 7 is below one 16-byte vector,
and primes keep every tail ragged. Three layouts: separate tensors (16-byte aligned, the
ALIGNED kernels), views at a 1-element offset (misaligned, unhinted kernels), and views of
one flat buffer (the flat fast path, whose chunks start at tensor boundaries).
Tolerance: error vs float64 <= 2x the torch backend's error + a small per-dtype floor.
"""


# TRITON_INTERPRET: tests/conftest.py (on without CUDA, off with it).

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from safegrad_kernels.ops import triton_backend as tb
from safegrad_kernels.ops.torch_backend import TorchBackend

TRITON = tb.TritonBackend()
TORCH = TorchBackend()
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not (TRITON.available()[0] and TRITON.supports(CPU)),
    reason="needs triton and TRITON_INTERPRET=1 (kernels on CPU tensors)",
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Relative floors for elementwise results (about one ulp of the output dtype) and for
# fp32-accumulated reductions (relative to the sum of |terms|).
FLOOR = {F32: 2e-7, BF16: 2**-8, F16: 2**-11}
SUM_FLOOR = 1e-6

SIZES = {
    1: [33],
    7: [0, 1, 7, 31, 32, 33, 97],
    130: [1, 2, 3, 5, 7, 31, 32, 33, 6, 4] * 13,
    1000: [0, 1, 2, 3, 5] * 200,
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(tb, "CHUNK_SIZE", 32)
    monkeypatch.setattr(tb, "BLOCK_SIZE", 8)
    tb.clear_cache()
    yield
    tb.clear_cache()


def make(sizes, dtype, layout="separate"):
    """Fresh random tensors (never zeros) of ``sizes`` in one of three memory layouts."""
    if layout == "flat":
        return list(torch.randn(sum(sizes)).to(dtype).split(sizes))
    if layout == "offset":
        return [torch.randn(n + 1).to(dtype)[1:] for n in sizes]
    return [torch.randn(n).to(dtype) for n in sizes]


def f64(t):
    return t.reshape(-1).double()


def check_rows(out, expect_torch, ref, mag):
    """Reductions: per entry, error <= 2x torch's + SUM_FLOOR * sum of |terms|."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    base = (expect_torch.double() - ref).abs()
    bad = err > 2 * base + SUM_FLOOR * mag + 1e-30
    assert not bad.any(), f"max err {err.max():.3g} vs torch {base.max():.3g}"


def check_tensors(outs, torch_outs, refs):
    """Elementwise: per tensor, max error <= 2x torch's + FLOOR[dtype] * max |ref|."""
    for i, (o, t, ref) in enumerate(zip(outs, torch_outs, refs)):
        if not o.numel():
            continue
        err = (f64(o) - ref).abs().max()
        base = (f64(t) - ref).abs().max()
        assert err <= 2 * base + FLOOR[o.dtype] * ref.abs().max(), f"tensor {i}: {err:.3g}"


def dot_ref(grads, refs):
    rows, mags = [], []
    for g, r in zip(grads, refs):
        g, r = f64(g), f64(r)
        rows.append(torch.stack([g @ r, r @ r, g @ g]))
        mags.append(torch.stack([(g.abs() @ r.abs()), r @ r, g @ g]))
    return torch.stack(rows), torch.stack(mags)


# ----------------------------------------------------------------------------- dot_norms

DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)]


@pytest.mark.parametrize("gdt,rdt", DTYPE_PAIRS)
@pytest.mark.parametrize("layout", ["separate", "offset", "flat"])
@pytest.mark.parametrize("count", [1, 7])
def test_dot_norms(gdt, rdt, layout, count):
    grads, refs = make(SIZES[count], gdt, layout), make(SIZES[count], rdt, layout)
    out = TRITON.dot_norms(grads, refs)
    ref, mag = dot_ref(grads, refs)
    check_rows(out, TORCH.dot_norms(grads, refs), ref, mag)
    assert out[SIZES[count].index(33)].abs().min() > 0  # written, not left at zero


@pytest.mark.parametrize("gdt,rdt", [(F32, F32), (BF16, F32)])
def test_dot_norms_130_tensors(gdt, rdt):
    grads, refs = make(SIZES[130], gdt), make(SIZES[130], rdt, "flat")
    ref, mag = dot_ref(grads, refs)
    check_rows(TRITON.dot_norms(grads, refs), TORCH.dot_norms(grads, refs), ref, mag)


def test_1000_tensors_dot_norms_and_axpy():
    sizes = SIZES[1000]
    grads, refs = make(sizes, F32), make(sizes, BF16)
    ref, mag = dot_ref(grads, refs)
    check_rows(TRITON.dot_norms(grads, refs), TORCH.dot_norms(grads, refs), ref, mag)
    coef = torch.randn(len(sizes))
    expect = [g.clone() for g in grads]
    TORCH.axpy_(expect, refs, coef)
    TRITON.axpy_(grads, refs, coef)
    # Same fp32 math, one rounding: bitwise equal to the torch backend.
    assert all(torch.equal(a, b) for a, b in zip(grads, expect))


# ----------------------------------------------------------------------------- axpy_


def _axpy_case(gdt, rdt, sizes, layout):
    grads, refs = make(sizes, gdt, layout), make(sizes, rdt, layout)
    coef = torch.randn(len(sizes))
    coef[::3] = 0.0
    for i in range(0, len(sizes), 3):  # zero coefficient: even inf/NaN refs leave g untouched
        if refs[i].numel():
            refs[i][0] = float("nan")
    before = [g.clone() for g in grads]
    refs_before = [r.clone() for r in refs]
    expect = [g.clone() for g in grads]
    TORCH.axpy_(expect, refs, coef)
    TRITON.axpy_(grads, refs, coef)
    exact = [f64(g) + float(c) * f64(r) for g, r, c in zip(before, refs, coef)]
    for i in range(0, len(sizes), 3):
        exact[i] = f64(before[i])
    check_tensors(grads, expect, exact)
    # The interpreter does no FMA contraction: same fp32 ops, same rounding as torch.
    assert all(torch.equal(a, b) for a, b in zip(grads, expect))
    for i in range(0, len(sizes), 3):
        assert torch.equal(grads[i], before[i])
    for r, r0 in zip(refs, refs_before):
        assert torch.equal(r, r0) or torch.equal(r.isnan(), r0.isnan())


@pytest.mark.parametrize("gdt,rdt", DTYPE_PAIRS)
@pytest.mark.parametrize("layout", ["separate", "offset", "flat"])
def test_axpy_(gdt, rdt, layout):
    _axpy_case(gdt, rdt, SIZES[7], layout)


@pytest.mark.parametrize("count", [1, 130])
def test_axpy_counts(count):
    _axpy_case(BF16, F32, SIZES[count], "separate")


def test_axpy_all_zero_coef_is_bitwise_noop():
    grads, refs = make(SIZES[7], BF16), make(SIZES[7], F32)
    before = [g.clone() for g in grads]
    TRITON.axpy_(grads, refs, torch.zeros(len(grads)))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


# ----------------------------------------------------------------------------- gram


def gram_ref(lists):
    m = len(lists)
    ref = torch.zeros(m, m, dtype=torch.float64)
    mag = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            for a, b in zip(lists[i], lists[j]):
                ref[i, j] += f64(a) @ f64(b)
                mag[i, j] += f64(a).abs() @ f64(b).abs()
    return ref, mag


@pytest.mark.parametrize(
    "dtypes", [(F32,), (F32, F32, F32), (BF16, BF16), (F16, F16, F16), (BF16, F32, F16)]
)
@pytest.mark.parametrize("layout", ["separate", "flat"])
def test_gram(dtypes, layout):
    lists = [make(SIZES[7], dt, layout) for dt in dtypes]
    out = TRITON.gram(lists)
    ref, mag = gram_ref(lists)
    check_rows(out, TORCH.gram(lists), ref, mag)
    assert torch.equal(out, out.T)


def test_gram_130_tensors_misaligned():
    lists = [make(SIZES[130], F32, "offset") for _ in range(2)]
    ref, mag = gram_ref(lists)
    check_rows(TRITON.gram(lists), TORCH.gram(lists), ref, mag)


# ----------------------------------------------------------------------------- combine_


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16, BF16), (F16, F32), (BF16, F32, F16)])
@pytest.mark.parametrize("layout", ["separate", "offset", "flat"])
@pytest.mark.parametrize("in_place", [True, False])
def test_combine_(dtypes, layout, in_place):
    sizes = SIZES[7]
    lists = [make(sizes, dt, layout) for dt in dtypes]
    weights = torch.randn(len(lists))
    exact = [sum(float(w) * f64(lst[i]) for w, lst in zip(weights, lists)) for i in range(7)]
    if in_place:
        out, expect = lists[0], [t.clone() for t in lists[0]]
        TORCH.combine_(expect, [expect, *lists[1:]], weights)
    else:
        out, expect = make(sizes, BF16, layout), make(sizes, BF16, layout)
        TORCH.combine_(expect, lists, weights)
    TRITON.combine_(out, lists, weights)
    check_tensors(out, expect, exact)
    assert all(torch.equal(a, b) for a, b in zip(out, expect))  # no FMA in the interpreter


def test_combine_130_tensors():
    lists = [make(SIZES[130], F32, "flat") for _ in range(3)]
    weights = torch.randn(3)
    exact = [sum(float(w) * f64(lst[i]) for w, lst in zip(weights, lists)) for i in range(130)]
    out = make(SIZES[130], F32)
    expect = [t.clone() for t in out]
    TORCH.combine_(expect, lists, weights)
    TRITON.combine_(out, lists, weights)
    check_tensors(out, expect, exact)


# ----------------------------------------------------------------------------- structure


def test_flat_fast_path_table():
    sizes = SIZES[7]
    grads, refs = make(sizes, F32, "flat"), make(sizes, BF16, "flat")
    tab = tb._table([grads, refs])
    assert tab.flat and tab.aligned and tab.n_rows == 1
    # Chunks follow the buffer's 32-element grid, cut at tensor boundaries.
    chunks = tab.chunks.view(-1, 4).tolist()
    assert all(c[0] == 0 and c[1] < c[2] for c in chunks)
    assert all(c[1] // 32 == (c[2] - 1) // 32 for c in chunks)
    # The separate layout keeps one row per tensor.
    assert not tb._table([make(sizes, F32), make(sizes, F32)]).flat
    # Views of a 4-byte-offset buffer are flat but not 16-byte aligned.
    buf = torch.randn(sum(sizes) + 1)[1:]
    mis = tb._table([list(buf.split(sizes)), list(buf.clone().split(sizes))])
    assert mis.flat and not mis.aligned


@pytest.mark.parametrize("layout", ["separate", "flat"])
def test_deterministic(layout):
    grads, refs = make(SIZES[7] * 3, BF16, layout), make(SIZES[7] * 3, F32, layout)
    first = TRITON.dot_norms(grads, refs)
    tb.clear_cache()  # a rebuilt table gives the same chunking, hence the same bits
    assert torch.equal(first, TRITON.dot_norms(grads, refs))
    g1 = TRITON.gram([grads, refs])
    assert torch.equal(g1, TRITON.gram([grads, refs]))


def test_table_cache_hits_and_bound(monkeypatch):
    grads, refs = make(SIZES[7], F32), make(SIZES[7], F32)
    TRITON.dot_norms(grads, refs)
    TRITON.axpy_(grads, refs, torch.randn(7))
    info = tb.cache_info()
    assert info["misses"] == 1 and info["hits"] == 1  # steady state: no new table
    monkeypatch.setattr(tb, "TABLE_CACHE_SIZE", 2)
    for _ in range(3):
        TRITON.dot_norms(make(SIZES[1], F32), make(SIZES[1], F32))
    assert tb.cache_info()["size"] == 2


def test_empty_tensors():
    grads, refs = make([0, 0], F32), make([0, 0], BF16)
    assert torch.equal(TRITON.dot_norms(grads, refs), torch.zeros(2, 3))
    TRITON.axpy_(grads, refs, torch.ones(2))
    assert torch.equal(TRITON.gram([grads, grads]), torch.zeros(2, 2))
    TRITON.combine_(grads, [grads], torch.ones(1))


def test_non_finite_propagates():
    grads, refs = make([33, 5], F32), make([33, 5], F32)
    grads[0][3] = float("inf")
    out = TRITON.dot_norms(grads, refs)
    assert not out[0].isfinite().all() and out[1].isfinite().all()


def test_supports_and_available():
    assert TRITON.name == "triton"
    assert TRITON.available() == (True, "")
    assert TRITON.supports(CPU)
    assert not TRITON.supports(torch.device("meta"))


def test_import_without_triton():
    # Importing the backend must never fail; it reports why it cannot run.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from safegrad_kernels.ops import triton_backend as tb\n"
        "print(tb.TritonBackend().available())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "(False, 'triton is not installed')" in out
