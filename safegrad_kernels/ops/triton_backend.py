"""Triton backend: multi-tensor kernels with one launch per pass, whatever the tensor count.

In the spirit of apex's ``multi_tensor_apply`` (idea credited; no code shared): the host
describes every tensor of a dtype group in one int64 device table (base addresses, a
chunk table ``chunk -> (row, start, end, owner)``), and each kernel runs one program per
chunk. ``dot_norms`` and ``gram`` are two launches (per-chunk partials to fixed slots, then a
fixed-order segment sum: deterministic, no atomics); ``axpy_`` and ``combine_`` are one.

Tables are cached (bounded LRU) keyed by the tensors' addresses, sizes, dtypes and
device, so a training loop that reuses its gradient buffers uploads nothing in steady state.

Flat fast path: when every list is a run of contiguous views of one buffer, in order (a
flat gradient buffer), the table has one pointer row per list and chunks follow the
buffer's ``CHUNK_SIZE`` grid cut at tensor boundaries. The buffer's base alignment then
carries over to every chunk, so small, oddly sized tensors still get 128-bit loads.

This module imports without triton; triton and the kernels load on first use.
On CPU the kernels run only under the interpreter (``TRITON_INTERPRET=1``), for tests.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .backend import Backend, register_backend

# Chunk and block sizes, in elements. A chunk is one program. 16384 elements (64 KiB of
# fp32 per list) gives ~2,600 programs for 40M LoRA parameters and >= 1 program per tensor
# for small ones, enough to fill 132 SMs several times over; 2048-element blocks with 8 warps
# are 8 elements per thread: two 128-bit loads per list for fp32, one for bf16/fp16.
# Module-level so tests can shrink them (the interpreter is slow). Results depend on
# CHUNK_SIZE, BLOCK_SIZE and the layout (flat buffer or not), which fix the summation
# order, and on nothing else: not the grid, the GPU model's SM count or the call.
CHUNK_SIZE = 16384
BLOCK_SIZE = 2048
NUM_WARPS = 8
# Elements per 16 bytes for the narrowest supported dtype: body blocks start on multiples
# of VEC, so they are 16-byte aligned for fp32 and fp16/bf16 alike.
VEC = 8
# Second stage: a program sums 32 tensors' partials with 16 lanes each (a 16384-element
# chunk makes most LoRA tensors 1-4 chunks); gram's single long segment gets 256 lanes.
SEGMENTS_PER_PROGRAM = 32
SEGMENT_LANES = 16
GRAM_SEGMENT_LANES = 256
TABLE_CACHE_SIZE = 64

_INTERPRET_ENV = "TRITON_INTERPRET"

_triton_error: str | None = None
_kernels_module: ModuleType | None = None


def interpreter_on() -> bool:
    return os.environ.get(_INTERPRET_ENV, "") == "1"


def _import_triton() -> str | None:
    """None if triton imports, else why not (cached)."""
    global _triton_error
    if _triton_error is None:
        try:
            import triton  # noqa: F401

            _triton_error = ""
        except Exception as exc:  # ImportError, or a broken install raising anything
            _triton_error = (
                "triton is not installed"
                if isinstance(exc, ModuleNotFoundError)
                else f"triton failed to import: {exc}"
            )
    return _triton_error or None


def kernels() -> ModuleType:
    """The ``triton_kernels`` module (imported on first use)."""
    global _kernels_module
    if _kernels_module is None:
        from . import triton_kernels

        _kernels_module = triton_kernels
    return _kernels_module


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Every kernel launch goes through here (tests wrap it to count launches)."""
    kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Table:
    """One int64 device buffer ``[ptrs | chunks | first | 0, C]`` and its views."""

    data: Tensor
    ptrs: Tensor  # [L, n_rows] base addresses
    chunks: Tensor  # [C, 4] (row, start, end, owner)
    first: Tensor  # [n + 1] chunk range of each tensor
    whole: Tensor  # [2] = (0, C): the single segment of gram
    n_rows: int
    n_chunks: int
    aligned: bool  # every base address is 16-byte aligned
    flat: bool


_cache: OrderedDict[tuple, _Table] = OrderedDict()
_cache_stats = {"hits": 0, "misses": 0}


def cache_info() -> dict[str, int]:
    """Table cache hits, misses and current size (for tests and ``safegrad info``)."""
    return {**_cache_stats, "size": len(_cache)}


def clear_cache() -> None:
    _cache.clear()
    _cache_stats.update(hits=0, misses=0)


def _is_flat(ptrs: Sequence[int], numels: Sequence[int], esize: int) -> bool:
    """Non-empty tensors sit back to back, in order, in one buffer (>= 2 of them)."""
    expected, seen = None, 0
    for p, n in zip(ptrs, numels):
        if n == 0:
            continue
        if expected is not None and p != expected:
            return False
        expected, seen = p + n * esize, seen + 1
    return seen >= 2


def _build(lists: Sequence[Sequence[Tensor]], chunk: int) -> _Table:
    numels = [t.numel() for t in lists[0]]
    ptrs = [[t.data_ptr() for t in lst] for lst in lists]
    esizes = [lst[0].element_size() for lst in lists]
    nonempty = [i for i, n in enumerate(numels) if n]
    flat = all(_is_flat(p, numels, e) for p, e in zip(ptrs, esizes))

    chunks: list[int] = []
    first = [0]
    if flat:
        # One row per list: the buffer base. Chunks follow the buffer's CHUNK grid, cut at
        # tensor boundaries so every chunk has one owner.
        rows = [[p[nonempty[0]]] for p in ptrs]
        pos = 0
        for i, n in enumerate(numels):
            end = pos + n
            while pos < end:
                nxt = min((pos // chunk + 1) * chunk, end)
                chunks += (0, pos, nxt, i)
                pos = nxt
            first.append(len(chunks) // 4)
    else:
        rows = ptrs
        for i, n in enumerate(numels):
            for s in range(0, n, chunk):
                chunks += (i, s, min(s + chunk, n), i)
            first.append(len(chunks) // 4)
    n_chunks = len(chunks) // 4
    # Rows of empty tensors are never dereferenced, so their addresses do not count.
    checked = [0] if flat else nonempty
    aligned = bool(nonempty) and all(row[i] % 16 == 0 for row in rows for i in checked)
    n_rows = len(rows[0])
    host = [*(p for row in rows for p in row), *chunks, *first, 0, n_chunks]
    device = lists[0][0].device
    data = torch.tensor(host, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: the first call does not wait for the copy; the caching host
        # allocator keeps the staging buffer alive until the copy has run.
        data = data.pin_memory().to(device, non_blocking=True)
    o_chunk = len(lists) * n_rows
    o_first = o_chunk + len(chunks)
    o_whole = o_first + len(first)
    return _Table(
        data=data,
        ptrs=data[:o_chunk],
        chunks=data[o_chunk:o_first],
        first=data[o_first:o_whole],
        whole=data[o_whole:],
        n_rows=n_rows,
        n_chunks=n_chunks,
        aligned=aligned,
        flat=flat,
    )


def _table(lists: Sequence[Sequence[Tensor]]) -> _Table:
    """The (cached) table for ``lists``; steady-state calls upload nothing."""
    chunk = CHUNK_SIZE
    # map() over the unbound methods: this key is the whole steady-state host cost of a
    # call, and it is about 2x faster than generator expressions for hundreds of tensors.
    key = (
        lists[0][0].device,
        chunk,
        len(lists),
        tuple(lst[0].dtype for lst in lists),
        tuple(map(Tensor.numel, lists[0])),
        tuple(map(Tensor.data_ptr, itertools.chain.from_iterable(lists))),
    )
    table = _cache.get(key)
    if table is not None:
        _cache.move_to_end(key)
        _cache_stats["hits"] += 1
        return table
    _cache_stats["misses"] += 1
    table = _build(lists, chunk)
    _cache[key] = table
    while len(_cache) > TABLE_CACHE_SIZE:
        _cache.popitem(last=False)
    return table


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    # Triton launches on the current CUDA device; tensors on cuda:1 need it switched.
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _meta(aligned: bool) -> dict[str, Any]:
    if BLOCK_SIZE < VEC or BLOCK_SIZE & (BLOCK_SIZE - 1):
        raise ValueError(f"BLOCK_SIZE must be a power of two >= {VEC}, got {BLOCK_SIZE}")
    return {
        "BLOCK": BLOCK_SIZE,
        "VEC": VEC,
        "ALIGNED": aligned,
        "num_warps": NUM_WARPS,
        # Explicit, to pin today's default (triton 3.9 warns it will flip in 3.10): fused
        # multiply-adds round once, which only helps the "one rounding" contract.
        "enable_fp_fusion": True,
    }


# ----------------------------------------------------------------------------- backend


def _uniform(lists: Sequence[Sequence[Tensor]]) -> list[Sequence[Tensor]]:
    """Lists of mixed dtypes upcast to fp32 copies (exact), so one kernel variant reads them.

    Rare by construction (the lists are gradients of the same parameters); it costs one
    extra pass instead of a per-list runtime dtype branch in every kernel.
    """
    if len({lst[0].dtype for lst in lists}) == 1:
        return list(lists)
    return [[t.float() for t in lst] for lst in lists]


def _one_pass(kernel: str, lists: Sequence[Sequence[Tensor]], vec: Tensor, *args: Any) -> None:
    """Launch a single-pass kernel (``axpy_``, ``combine_``): one program per chunk of ``lists``.

    ``vec`` is the small float32 device vector the kernel reads (coefficients, weights);
    ``args`` follow the table arguments in the kernel's signature.
    """
    tab = _table(lists)
    if not tab.n_chunks:
        return
    vec = vec.to(torch.float32).contiguous()
    with _on(lists[0][0].device):
        _launch(
            getattr(kernels(), kernel), (tab.n_chunks,),
            tab.ptrs, tab.chunks, vec, tab.n_rows, *args,
            **_meta(tab.aligned),
        )  # fmt: skip


class TritonBackend(Backend):
    """Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``, for tests)."""

    name = "triton"

    def available(self) -> tuple[bool, str]:
        why = _import_triton()
        if why:
            return False, why
        if interpreter_on() or torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"

    def supports(self, device: torch.device) -> bool:
        # Under the interpreter the kernels dereference table addresses on the host, so CUDA
        # tensors would be read through device addresses: CPU only, then.
        return device.type == ("cpu" if interpreter_on() else "cuda")

    def dot_norms(self, grads: Sequence[Tensor], refs: Sequence[Tensor]) -> Tensor:
        k = kernels()
        device = grads[0].device
        tab = _table([grads, refs])
        out = torch.empty(len(grads), 3, dtype=torch.float32, device=device)
        partial = torch.empty(max(tab.n_chunks, 1) * 4, dtype=torch.float32, device=device)
        with _on(device):
            if tab.n_chunks:
                _launch(
                    k._dot_norms_partial_kernel, (tab.n_chunks,),
                    tab.ptrs, tab.chunks, partial, tab.n_rows, grads[0], refs[0],
                    **_meta(tab.aligned),
                )  # fmt: skip
            _launch(
                k._segment_sum_kernel, (_cdiv(len(grads), SEGMENTS_PER_PROGRAM),),
                partial, tab.first, out, len(grads), 3, 4,
                BLOCK_S=SEGMENTS_PER_PROGRAM, BLOCK_C=SEGMENT_LANES, num_warps=4,
            )  # fmt: skip
        return out

    def axpy_(self, grads: Sequence[Tensor], refs: Sequence[Tensor], coef: Tensor) -> None:
        _one_pass("_axpy_kernel", [grads, refs], coef, grads[0], refs[0])

    def gram(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        k = kernels()
        lists = _uniform(lists)
        m = len(lists)
        device = lists[0][0].device
        tab = _table(lists)
        out = torch.empty(m, m, dtype=torch.float32, device=device)
        partial = torch.empty(max(tab.n_chunks, 1) * m * m, dtype=torch.float32, device=device)
        with _on(device):
            if tab.n_chunks:
                _launch(
                    k._gram_partial_kernel, (tab.n_chunks,),
                    tab.ptrs, tab.chunks, partial, tab.n_rows, m, lists[0][0],
                    **_meta(tab.aligned),
                )  # fmt: skip
            _launch(
                k._segment_sum_kernel, (1,),
                partial, tab.whole, out, 1, m * m, m * m,
                BLOCK_S=1, BLOCK_C=GRAM_SEGMENT_LANES, num_warps=4,
            )  # fmt: skip
        return out

    def combine_(
        self, out: Sequence[Tensor], lists: Sequence[Sequence[Tensor]], weights: Tensor
    ) -> None:
        lists = _uniform(lists)
        _one_pass("_combine_kernel", [*lists, out], weights, len(lists), lists[0][0], out[0])


def launch_counter() -> tuple[Callable[..., None], list[str]]:
    """A drop-in for ``_launch`` that also records kernel names (for tests)."""
    names: list[str] = []

    def counting(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        names.append(getattr(kernel, "__name__", str(kernel)))
        kernel[grid](*args, **meta)

    return counting, names


register_backend(TritonBackend())
