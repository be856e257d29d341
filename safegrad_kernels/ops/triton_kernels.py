"""Triton kernels for the multi-tensor ops (launchers live in ``triton_backend``).

Every streaming kernel runs one program per *chunk*. The host builds a device table
(see ``triton_backend._Table``) holding, as int64:

* ``ptrs[L, n_rows]``  base addresses: list ``l``, pointer row ``p`` (a tensor, or the
                       whole flat buffer on the flat fast path),
* ``chunks[C, 4]``     ``(row, start, end, owner)``: elements ``[start, end)`` of row
                       ``row``, belonging to output tensor ``owner``,
* ``first[S + 1]``     chunk ranges of the output segments for the second stage.

Addresses become typed pointers with ``.to(x_ty.dtype)``, where ``x_ty`` is any tensor of
the list's dtype passed only for its type (the launcher passes the list's first tensor).

A chunk is walked as an unmasked body plus two masked edges. With ``ALIGNED`` (the host
checked that every base address is 16-byte aligned) the body starts at the first multiple
of ``VEC`` elements and its blocks carry divisibility hints, which is what lets the
compiler emit 128-bit loads; the head (< ``VEC`` elements) and the ragged tail
(< ``BLOCK``) stay masked. Without the hints Triton emits one 32- or 16-bit access per
element (sm_90 PTX: ``ld.global.b32`` vs ``ld.global.v4.b32``, see ``triton_aot``).

Reductions write one partial per chunk to a fixed slot and ``_segment_sum_kernel`` adds
the partials of each segment in a fixed order: deterministic, no atomics. Offsets and
program ids are int64 (a 7B model's flat buffer passes 2**31 elements); math is fp32.

The chunk walk (the helpers below) is written once, as functions declared with
``_device_fn``. Compiled, Triton inlines them: the PTX and AMDGCN of every kernel (sm_80,
sm_90, gfx942; fp32, bf16, fp16; aligned or not) were instruction for instruction those of
the kernels written out in full (triton 3.9.0, compared through ``triton_aot``). Pointer
arithmetic keeps its grouping, ``g + o + lanes``: ``g + (o + lanes)`` changed the axpy
kernel's code (sm_90 fp32: 60 -> 58 registers; gfx942 fp16 unaligned: 16 -> 45 VGPRs).
Under ``TRITON_INTERPRET=1`` every call of an @jit function re-patches ``triton.language``,
about 1-6 ms a call here; ``_device_fn`` helpers skip that, and accumulators start from
``tl.full`` rather than ``tl.zeros`` (an @jit function) for the same reason: the 1,000-tensor
tests were 3-5x slower with the calls.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The CPU interpreter truncates fp32 -> bf16 (measured: about half the elements 1 ulp off
# torch's result, even with fp_downcast_rounding="rtne"); the GPU rounds to nearest even.
# Fixed at import time, as @triton.jit fixes interpreted vs compiled.
_BF16_RNE_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") == "1")


def _device_fn(fn):
    """``@triton.jit`` for a helper that kernels call, without the interpreter's per-call cost.

    Compiled, it is the @jit function, which Triton inlines. Interpreted, it is the
    interpreter's rewrite of ``fn`` called as a plain function: ``InterpretedFunction``'s own
    call first re-patches ``triton.language`` (module docstring), which the launch of the
    calling kernel has already done.
    """
    jitted = triton.jit(fn)
    if isinstance(jitted, triton.runtime.JITFunction):
        return jitted
    return jitted.rewrite()


@_device_fn
def _bf16_rne(v):
    """fp32 -> bf16, round to nearest even, NaN kept NaN (what cvt.rn.bf16.f32 does)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@_device_fn
def _store_f32(ptr, v, mask):
    """Stores fp32 ``v`` in ``ptr``'s dtype (bf16 rounded to nearest even on both paths)."""
    if _BF16_RNE_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
        v = _bf16_rne(v)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- the chunk walk


@_device_fn
def _chunk(chunks, pid):
    """``(row, start, end)`` of chunk ``pid``: elements ``[start, end)`` of pointer row ``row``."""
    row = tl.load(chunks + pid * 4)
    start = tl.load(chunks + pid * 4 + 1)
    end = tl.load(chunks + pid * 4 + 2)
    return row, start, end


@_device_fn
def _base(slot, x_ty, ALIGNED: tl.constexpr):
    """The typed base address at table entry ``slot``, hinted 16-byte aligned when ALIGNED."""
    base = tl.load(slot).to(x_ty.dtype)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base


@_device_fn
def _body(start, end, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """``(body, n_full)``: the chunk's unmasked part is ``n_full`` blocks from ``body``.

    Apart from ``_chunk`` so that kernels load their base addresses first, as they did: one
    helper for both moved this arithmetic ahead of those loads in the PTX.
    """
    body = start
    if ALIGNED:
        body = tl.minimum((start + VEC - 1) // VEC * VEC, end)
    n_full = (end - body) // BLOCK
    return body, n_full


@_device_fn
def _block(body, b, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Offset of unmasked block ``b``, hinted a multiple of VEC when ALIGNED."""
    o = body + b * BLOCK
    if ALIGNED:
        o = tl.multiple_of(o, VEC)
    return o


@_device_fn
def _edge(edge: tl.constexpr, start, end, body, n_full, BLOCK: tl.constexpr):
    """``[lo, hi)`` of masked edge ``edge``: 0 the unaligned head, 1 the ragged tail."""
    if edge == 0:
        lo = start
        hi = body
    else:
        lo = body + n_full * BLOCK
        hi = end
    return lo, hi


# ----------------------------------------------------------------------------- dot_norms


@triton.jit
def _dot_norms_partial_kernel(
    ptrs, chunks, partial, n_rows, g_ty, r_ty,
    BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """partial[c, :] = [<g, r>, ||r||^2, ||g||^2, ||g||^2] over chunk c (list 0 = g, 1 = r).

    The row has 4 slots (the last repeats ||g||^2) so it is one 2x2 store.
    """
    pid = tl.program_id(0).to(tl.int64)
    row, start, end = _chunk(chunks, pid)
    g = _base(ptrs + row, g_ty, ALIGNED)
    r = _base(ptrs + n_rows + row, r_ty, ALIGNED)
    body, n_full = _body(start, end, BLOCK, VEC, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    acc_gr = tl.full([BLOCK], 0.0, tl.float32)
    acc_rr = tl.full([BLOCK], 0.0, tl.float32)
    acc_gg = tl.full([BLOCK], 0.0, tl.float32)
    for b in range(n_full):
        o = _block(body, b, BLOCK, VEC, ALIGNED)
        x = tl.load(g + o + lanes).to(tl.float32)
        y = tl.load(r + o + lanes).to(tl.float32)
        acc_gr += x * y
        acc_rr += y * y
        acc_gg += x * x
    for edge in tl.static_range(2):
        lo, hi = _edge(edge, start, end, body, n_full, BLOCK)
        if lo < hi:
            offs = lo + lanes
            x = tl.load(g + offs, mask=offs < hi, other=0.0).to(tl.float32)
            y = tl.load(r + offs, mask=offs < hi, other=0.0).to(tl.float32)
            acc_gr += x * y
            acc_rr += y * y
            acc_gg += x * x
    # One reduction rather than three tl.sum calls (a third of the reduction calls under the
    # interpreter). tl.join stacks on a new last axis, so sums[i, j] is slot i + 2 j:
    # sums = [[gr, gg], [rr, gg]].
    sums = tl.sum(tl.join(tl.join(acc_gr, acc_rr), tl.join(acc_gg, acc_gg)), axis=0)
    two = tl.arange(0, 2)
    tl.store(partial + pid * 4 + two[:, None] + two[None, :] * 2, sums)


@triton.jit
def _segment_sum_kernel(
    partial, first, out, n_segments, K, STRIDE, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr
):
    """out[s, k] = sum of partial[c, k] for c in [first[s], first[s + 1]), in a fixed order.

    ``partial`` rows have ``STRIDE >= K`` slots; ``out`` is ``[n_segments, K]``.

    One program per BLOCK_S segments. Lane i of a segment adds its chunks i, i + BLOCK_C,
    ... and a fixed tree finishes: the result depends on the chunking and BLOCK_C only,
    never on the grid. (A program per segment and column was 3,000 programs for 1,000
    tensors: most of dot_norms' time under the interpreter.)
    """
    pid = tl.program_id(0).to(tl.int64)
    segs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    live = segs < n_segments
    c0 = tl.load(first + segs, mask=live, other=0)
    count = tl.load(first + segs + 1, mask=live, other=0) - c0
    lanes = tl.arange(0, BLOCK_C)
    longest = tl.max(count)
    for k in range(K):
        acc = tl.full([BLOCK_S, BLOCK_C], 0.0, tl.float32)
        for c in range(0, longest, BLOCK_C):
            i = c + lanes
            idx = c0[:, None] + i[None, :]
            acc += tl.load(partial + idx * STRIDE + k, mask=i[None, :] < count[:, None], other=0.0)
        tl.store(out + segs * K + k, tl.sum(acc, axis=1), mask=live)


# ----------------------------------------------------------------------------- axpy_


@triton.jit
def _axpy_kernel(
    ptrs, chunks, coef, n_rows, g_ty, r_ty,
    BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """g += coef[owner] * r over chunk c; a zero coefficient reads and writes no data."""
    pid = tl.program_id(0).to(tl.int64)
    owner = tl.load(chunks + pid * 4 + 3)
    c = tl.load(coef + owner)
    # The no-conflict step (c == 0 everywhere) then costs the table reads only: 2N instead of
    # 5N element moves per SafeGrad step. NaN != 0, so a NaN coefficient is still applied.
    if c != 0.0:
        row, start, end = _chunk(chunks, pid)
        g = _base(ptrs + row, g_ty, ALIGNED)
        r = _base(ptrs + n_rows + row, r_ty, ALIGNED)
        body, n_full = _body(start, end, BLOCK, VEC, ALIGNED)
        lanes = tl.arange(0, BLOCK)
        for b in range(n_full):
            o = _block(body, b, BLOCK, VEC, ALIGNED)
            v = tl.load(g + o + lanes).to(tl.float32) + c * tl.load(r + o + lanes).to(tl.float32)
            _store_f32(g + o + lanes, v, None)
        for edge in tl.static_range(2):
            lo, hi = _edge(edge, start, end, body, n_full, BLOCK)
            if lo < hi:
                offs = lo + lanes
                m = offs < hi
                x = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
                v = x + c * tl.load(r + offs, mask=m, other=0.0).to(tl.float32)
                _store_f32(g + offs, v, m)


# ----------------------------------------------------------------------------- gram


@triton.jit
def _gram_partial_kernel(
    ptrs, chunks, partial, n_rows, M, x_ty,
    BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """partial[c, i, j] = <list i, list j> over chunk c, for all i <= j (mirrored).

    Pairs re-read a chunk from L1/L2 (a chunk of every list is at most M * 64 KiB), so
    DRAM traffic stays near M reads per element while M stays a runtime value.
    """
    pid = tl.program_id(0).to(tl.int64)
    row, start, end = _chunk(chunks, pid)
    body, n_full = _body(start, end, BLOCK, VEC, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    out = partial + pid * M * M
    for i in range(M):
        xi = _base(ptrs + i * n_rows + row, x_ty, ALIGNED)
        for j in range(i, M):
            xj = _base(ptrs + j * n_rows + row, x_ty, ALIGNED)
            acc = tl.full([BLOCK], 0.0, tl.float32)
            for b in range(n_full):
                o = _block(body, b, BLOCK, VEC, ALIGNED)
                a = tl.load(xi + o + lanes).to(tl.float32)
                acc += a * tl.load(xj + o + lanes).to(tl.float32)
            for edge in tl.static_range(2):
                lo, hi = _edge(edge, start, end, body, n_full, BLOCK)
                if lo < hi:
                    offs = lo + lanes
                    a = tl.load(xi + offs, mask=offs < hi, other=0.0).to(tl.float32)
                    acc += a * tl.load(xj + offs, mask=offs < hi, other=0.0).to(tl.float32)
            d = tl.sum(acc)
            tl.store(out + i * M + j, d)
            tl.store(out + j * M + i, d)


# ----------------------------------------------------------------------------- combine_


@triton.jit
def _combine_kernel(
    ptrs, chunks, weights, n_rows, M, x_ty, out_ty,
    BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """out = sum_j weights[j] * list_j over chunk c; lists are ptr rows 0..M-1, out is row M.

    Each element is read from every list before the same thread stores it, which is what
    makes ``out`` being ``lists[0]`` safe.
    """
    pid = tl.program_id(0).to(tl.int64)
    row, start, end = _chunk(chunks, pid)
    out = _base(ptrs + M * n_rows + row, out_ty, ALIGNED)
    body, n_full = _body(start, end, BLOCK, VEC, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    for b in range(n_full):
        o = _block(body, b, BLOCK, VEC, ALIGNED)
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for j in range(M):
            x = _base(ptrs + j * n_rows + row, x_ty, ALIGNED)
            acc += tl.load(weights + j) * tl.load(x + o + lanes).to(tl.float32)
        _store_f32(out + o + lanes, acc, None)
    for edge in tl.static_range(2):
        lo, hi = _edge(edge, start, end, body, n_full, BLOCK)
        if lo < hi:
            acc = tl.full([BLOCK], 0.0, tl.float32)
            offs = lo + lanes
            m = offs < hi
            for j in range(M):
                x = _base(ptrs + j * n_rows + row, x_ty, ALIGNED)
                acc += tl.load(weights + j) * tl.load(x + offs, mask=m, other=0.0).to(tl.float32)
            _store_f32(out + offs, acc, m)
