"""Ahead-of-time compilation of the Triton kernels: registers, spills, load widths.

Needs triton but no GPU: ``triton.compile`` with a ``GPUTarget`` produces PTX and a cubin
for sm_80 / sm_90 on any Linux machine, and the ``cuobjdump`` shipped in the triton wheel
reads the cubin's resource usage. The same works for AMD (``GPUTarget("hip", "gfx942",
64)``: AMDGCN assembly and an HSACO, whose metadata carry VGPR/SGPR counts and spills),
since the triton wheel bundles the AMD backend and its linker (measured with triton 3.9.0:
1.5 s for the first kernel, 0.3 s after). ``aot_report()`` feeds ``safegrad info --aot``,
the benchmarks and ``tests/ops/test_triton_aot.py``.

What AMD shows (triton 3.9.0, gfx942 and gfx90a): fp32 streaming bodies use 128-bit
``buffer_load_dwordx4``, but bf16/fp16 bodies only 64-bit ``buffer_load_dwordx2``: a
wavefront has 64 lanes, so 8 warps x 64 lanes share a 2048-element block as 4 elements
per lane (8 on NVIDIA's 32-lane warps). Halving ``NUM_WARPS`` on HIP would restore 128-bit
half-precision loads; left until an AMD GPU can time it.

The kernels are compiled from a private copy of ``triton_kernels`` imported with the
interpreter switched off: ``@triton.jit`` picks interpreted or compiled at decoration time,
and the test session runs with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ARCHS = (80, 90)
AMD_ARCHS = ("gfx942", "gfx90a")  # MI300, MI200
DTYPES = ("fp32", "bf16", "fp16")

# The four kernels that stream gradient data; the segment sum reads a few KiB of partials.
STREAMING = ("_dot_norms_partial_kernel", "_axpy_kernel", "_gram_partial_kernel", "_combine_kernel")

_LOAD_RE = re.compile(r"\bld\.global((?:\.[a-z0-9]+)*)\s")
_STORE_RE = re.compile(r"\bst\.global((?:\.[a-z0-9]+)*)\s")
_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_AMD_ACCESS_RE = re.compile(r"\b(?:global|buffer|flat)_(load|store)_([a-z0-9_]+)")
_AMD_META_RE = re.compile(
    r"\.(vgpr_count|sgpr_count|vgpr_spill_count|sgpr_spill_count|private_segment_fixed_size):"
    r"\s+(\d+)"
)
# Bits per lane of one AMDGCN memory instruction, by suffix.
_AMD_BITS = {"byte": 8, "ubyte": 8, "sbyte": 8, "short": 16, "ushort": 16, "sshort": 16}
_AMD_BITS |= {"dword": 32, "dwordx2": 64, "dwordx3": 96, "dwordx4": 128}


@contextlib.contextmanager
def _interpreter_off() -> Iterator[None]:
    # Both decoration and code generation consult TRITON_INTERPRET (jit.py reads the knob
    # while lowering constexprs), so it must be off for the import *and* each compile.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@functools.lru_cache(maxsize=1)
def compiled_kernels() -> ModuleType:
    """``triton_kernels`` imported afresh with ``TRITON_INTERPRET`` off (JITFunctions)."""
    path = Path(__file__).with_name("triton_kernels.py")
    spec = importlib.util.spec_from_file_location("safegrad_kernels.ops._triton_kernels_aot", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _interpreter_off():
        spec.loader.exec_module(module)
    return module


def _signature(kernel: str, dtype: str, aligned: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """(signature, constexprs) of the backend's launch for lists of ``dtype``."""
    from . import triton_backend as tb

    t = f"*{dtype}"
    tile = {"BLOCK": tb.BLOCK_SIZE, "VEC": tb.VEC, "ALIGNED": aligned}
    if kernel == "_dot_norms_partial_kernel":
        sig = {"ptrs": "*i64", "chunks": "*i64", "partial": "*fp32", "n_rows": "i32"}
        sig |= {"g_ty": t, "r_ty": t}
    elif kernel == "_axpy_kernel":
        sig = {"ptrs": "*i64", "chunks": "*i64", "coef": "*fp32", "n_rows": "i32"}
        sig |= {"g_ty": t, "r_ty": t}
    elif kernel == "_gram_partial_kernel":
        sig = {"ptrs": "*i64", "chunks": "*i64", "partial": "*fp32", "n_rows": "i32"}
        sig |= {"M": "i32", "x_ty": t}
    elif kernel == "_combine_kernel":
        sig = {"ptrs": "*i64", "chunks": "*i64", "weights": "*fp32", "n_rows": "i32"}
        sig |= {"M": "i32", "x_ty": t, "out_ty": t}
    elif kernel == "_segment_sum_kernel":
        sig = {"partial": "*fp32", "first": "*i64", "out": "*fp32", "n_segments": "i32"}
        sig |= {"K": "i32", "STRIDE": "i32"}
        tile = {"BLOCK_S": tb.SEGMENTS_PER_PROGRAM, "BLOCK_C": tb.SEGMENT_LANES}
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return sig | dict.fromkeys(tile, "constexpr"), tile


KERNELS = (*STREAMING, "_segment_sum_kernel")


def _target(arch: int | str) -> Any:
    """``sm_{arch}`` for an int (CUDA, 32-lane warps), a ``gfx*`` name for AMD (wave64)."""
    from triton.backends.compiler import GPUTarget

    if isinstance(arch, str) and arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    return GPUTarget("cuda", int(arch), 32)


def arch_name(arch: int | str) -> str:
    return arch if isinstance(arch, str) else f"sm_{arch}"


@functools.cache
def compile_kernel(kernel: str, arch: int | str, dtype: str = "fp32", aligned: bool = True) -> Any:
    """A ``CompiledKernel`` for ``sm_{arch}`` (``.asm["ptx"]``, ``["cubin"]``) or an AMD
    ``gfx*`` target (``.asm["amdgcn"]``, ``["hsaco"]``)."""
    import triton

    fn = getattr(compiled_kernels(), kernel)
    sig, const = _signature(kernel, dtype, aligned)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    from . import triton_backend as tb

    num_warps = 4 if kernel == "_segment_sum_kernel" else tb.NUM_WARPS
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    with _interpreter_off():
        return triton.compile(src, target=_target(arch), options=options)


@functools.cache
def amd_support() -> tuple[bool, str]:
    """Whether this triton compiles for AMD without a GPU: ``(True, "")`` or why not."""
    try:
        compile_kernel("_segment_sum_kernel", AMD_ARCHS[0])
    except Exception as exc:  # no AMD backend in the wheel, no linker, ...
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return True, ""


def cuobjdump_path() -> str | None:
    """The ``cuobjdump`` shipped with triton (or on PATH), or None."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """``{registers, stack, shared, local}`` bytes from ``cuobjdump``; None without the tool."""
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = _USAGE_RE.search(text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def _access_bits(suffixes: str) -> int:
    """Bits moved by one ``ld/st.global`` with these suffixes (``.v4.b32`` -> 128)."""
    parts = suffixes.split(".")
    width = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    return width * vec


def _widest(forms: dict[str, int]) -> int:
    # 64-bit scalar accesses are the int64 chunk/pointer table, not gradient data (which is
    # fp32/bf16/fp16): leave them out so the number says how wide the *data* accesses are.
    return max((_access_bits(f) for f in forms if not re.fullmatch(r"[bsu]64", f)), default=0)


def amdgcn_accesses(asm: str) -> dict[str, dict[str, int]]:
    """``{"loads": {form: count}, "stores": {form: count}}``, forms like ``buffer_dwordx4``."""
    out: dict[str, dict[str, int]] = {"loads": {}, "stores": {}}
    for m in _AMD_ACCESS_RE.finditer(asm):
        key = "loads" if m.group(1) == "load" else "stores"
        form = m.group(0).replace(f"_{m.group(1)}_", "_", 1)
        out[key][form] = out[key].get(form, 0) + 1
    return out


def _amd_bits(form: str) -> int:
    suffix = form.split("_", 1)[1]
    return next(
        (
            b
            for name, b in _AMD_BITS.items()
            if suffix.startswith(name) and (suffix == name or not suffix[len(name)].isalnum())
        ),
        0,
    )


def _amd_widest(forms: dict[str, int]) -> int:
    # Triton lowers the gradient bodies to buffer instructions; global ones are the ragged
    # tails and the int64 pointer/chunk table (64-bit, left out as in the PTX count).
    data = [f for f in forms if f.startswith("buffer_")]
    data = data or [f for f in forms if f != "global_dwordx2"]
    return max((_amd_bits(f) for f in data), default=0)


def amdgcn_usage(asm: str) -> dict[str, int]:
    """VGPRs, SGPRs, spilled registers and scratch bytes from the HSACO metadata."""
    found = {k: int(v) for k, v in _AMD_META_RE.findall(asm)}
    return {
        "registers": found.get("vgpr_count", 0),
        "sgprs": found.get("sgpr_count", 0),
        "spilled": found.get("vgpr_spill_count", 0) + found.get("sgpr_spill_count", 0),
        "scratch_bytes": found.get("private_segment_fixed_size", 0),
    }


def ptx_accesses(ptx: str) -> dict[str, dict[str, int]]:
    """``{"loads": {form: count}, "stores": {form: count}}`` of global memory accesses."""
    out: dict[str, dict[str, int]] = {"loads": {}, "stores": {}}
    for key, regex in (("loads", _LOAD_RE), ("stores", _STORE_RE)):
        for m in regex.finditer(ptx):
            form = m.group(1).lstrip(".")
            out[key][form] = out[key].get(form, 0) + 1
    return out


def _row(kernel: str, arch: int | str, dtype: str, aligned: bool) -> dict[str, Any]:
    ck = compile_kernel(kernel, arch, dtype, aligned)
    row: dict[str, Any] = {"kernel": kernel, "arch": arch_name(arch), "dtype": dtype}
    row["aligned"] = aligned
    if "amdgcn" in ck.asm:
        acc = amdgcn_accesses(ck.asm["amdgcn"])
        usage = amdgcn_usage(ck.asm["amdgcn"])
        # Registers spilled to scratch count as spills, like cuobjdump's LOCAL bytes.
        spill = usage["scratch_bytes"] if usage["spilled"] else 0
        row |= {"registers": usage["registers"], "spill_bytes": spill, "stack_bytes": None}
        row |= {"max_load_bits": _amd_widest(acc["loads"])}
        row |= {"max_store_bits": _amd_widest(acc["stores"])}
    else:
        acc = ptx_accesses(ck.asm["ptx"])
        usage = resource_usage(ck.asm["cubin"])
        row |= {
            "registers": usage["registers"] if usage else None,
            "spill_bytes": usage["local"] if usage else None,
            "stack_bytes": usage["stack"] if usage else None,
            "max_load_bits": _widest(acc["loads"]),
            "max_store_bits": _widest(acc["stores"]),
        }
    return row | {"loads": acc["loads"], "stores": acc["stores"]}


def _report_here(
    archs: tuple[int | str, ...], dtypes: tuple[str, ...], aligned: tuple[bool, ...]
) -> list[dict[str, Any]]:
    rows = []
    for arch in archs:
        if isinstance(arch, str) and not amd_support()[0]:
            # Said once per arch, so a report shows what it could not compile and why.
            rows.append({"kernel": "*", "arch": arch, "error": amd_support()[1]})
            continue
        for kernel in KERNELS:
            for dtype in dtypes if kernel != "_segment_sum_kernel" else ("fp32",):
                for al in aligned if kernel != "_segment_sum_kernel" else (True,):
                    rows.append(_row(kernel, arch, dtype, al))
    return rows


def _can_compile_here() -> bool:
    # A process that imported triton with TRITON_INTERPRET=1 (the test session) holds
    # interpreted versions of triton's own library functions (tl.sum, ...): nothing can be
    # compiled in it, so the report then runs in a clean subprocess.
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return isinstance(standard.sum, JITFunction)


def aot_report(
    archs: tuple[int | str, ...] = (*ARCHS, *AMD_ARCHS),
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    aligned: tuple[bool, ...] = (True,),
) -> list[dict[str, Any]]:
    """One row per (kernel, arch, dtype, aligned): registers, spills, widest global access.

    ``archs``: ints are CUDA ``sm_*``, ``gfx*`` names AMD. ``spill_bytes`` is cuobjdump's
    LOCAL (None when cuobjdump is absent), on AMD the scratch bytes when registers spill.
    Access widths come from the PTX / AMDGCN, leaving out the int64 table loads; 128 means
    ``ld.global.v4.b32`` or ``buffer_load_dwordx4``, 32/16 one element per instruction.
    An AMD arch this triton cannot compile for gives one row with its ``error``.
    Needs triton, not a GPU.
    """
    if _can_compile_here():
        return _report_here(archs, dtypes, aligned)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    args = json.dumps({"archs": archs, "dtypes": dtypes, "aligned": aligned})
    proc = subprocess.run(
        [sys.executable, "-m", "safegrad_kernels.ops.triton_aot", "--json", args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of ``aot_report()`` rows."""
    head = f"{'kernel':<28}{'arch':<7}{'dtype':<6}{'align':<6}{'regs':>5}{'spill':>6}{'ld bits':>8}{'st bits':>8}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<28}{r['arch']:<7}cannot compile here: {r['error']}")
            continue
        lines.append(
            f"{r['kernel']:<28}{r['arch']:<7}{r['dtype']:<6}{r['aligned']!s:<6}{r['registers']!s:>5}"
            f"{r['spill_bytes']!s:>6}{r['max_load_bits']:>8}{r['max_store_bits']:>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        spec = json.loads(sys.argv[2])
        rows = _report_here(
            tuple(spec["archs"]), tuple(spec["dtypes"]), tuple(map(bool, spec["aligned"]))
        )
        print(json.dumps(rows))
    else:
        print(format_report(aot_report()))
