"""Ahead-of-time compilation of the Triton kernels: registers, spills, load widths.

Needs triton but no GPU: ``triton.compile`` with a ``GPUTarget`` produces PTX and a cubin
for sm_80 / sm_90 on any Linux machine, and the ``cuobjdump`` shipped in the triton wheel
reads the cubin's resource usage. ``aot_report()`` feeds ``safegrad info --aot``, the
benchmarks and ``tests/test_triton_aot.py``.

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
DTYPES = ("fp32", "bf16", "fp16")

# The four kernels that stream gradient data; the segment sum reads a few KiB of partials.
STREAMING = ("_dot_norms_partial_kernel", "_axpy_kernel", "_gram_partial_kernel", "_combine_kernel")

_LOAD_RE = re.compile(r"\bld\.global((?:\.[a-z0-9]+)*)\s")
_STORE_RE = re.compile(r"\bst\.global((?:\.[a-z0-9]+)*)\s")
_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


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


@functools.cache
def compile_kernel(kernel: str, arch: int, dtype: str = "fp32", aligned: bool = True) -> Any:
    """A ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``) for ``sm_{arch}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(compiled_kernels(), kernel)
    sig, const = _signature(kernel, dtype, aligned)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    from . import triton_backend as tb

    num_warps = 4 if kernel == "_segment_sum_kernel" else tb.NUM_WARPS
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    with _interpreter_off():
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


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


def ptx_accesses(ptx: str) -> dict[str, dict[str, int]]:
    """``{"loads": {form: count}, "stores": {form: count}}`` of global memory accesses."""
    out: dict[str, dict[str, int]] = {"loads": {}, "stores": {}}
    for key, regex in (("loads", _LOAD_RE), ("stores", _STORE_RE)):
        for m in regex.finditer(ptx):
            form = m.group(1).lstrip(".")
            out[key][form] = out[key].get(form, 0) + 1
    return out


def _report_here(
    archs: tuple[int, ...], dtypes: tuple[str, ...], aligned: tuple[bool, ...]
) -> list[dict[str, Any]]:
    rows = []
    for kernel in KERNELS:
        for arch in archs:
            for dtype in dtypes if kernel != "_segment_sum_kernel" else ("fp32",):
                for al in aligned if kernel != "_segment_sum_kernel" else (True,):
                    ck = compile_kernel(kernel, arch, dtype, al)
                    acc = ptx_accesses(ck.asm["ptx"])
                    usage = resource_usage(ck.asm["cubin"])
                    rows.append(
                        {
                            "kernel": kernel,
                            "arch": f"sm_{arch}",
                            "dtype": dtype,
                            "aligned": al,
                            "registers": usage["registers"] if usage else None,
                            "spill_bytes": usage["local"] if usage else None,
                            "stack_bytes": usage["stack"] if usage else None,
                            "max_load_bits": _widest(acc["loads"]),
                            "max_store_bits": _widest(acc["stores"]),
                            "loads": acc["loads"],
                            "stores": acc["stores"],
                        }
                    )
    return rows


def _can_compile_here() -> bool:
    # A process that imported triton with TRITON_INTERPRET=1 (the test session) holds
    # interpreted versions of triton's own library functions (tl.sum, ...): nothing can be
    # compiled in it, so the report then runs in a clean subprocess.
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return isinstance(standard.sum, JITFunction)


def aot_report(
    archs: tuple[int, ...] = ARCHS,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    aligned: tuple[bool, ...] = (True,),
) -> list[dict[str, Any]]:
    """One row per (kernel, arch, dtype, aligned): registers, spills, widest global access.

    ``spill_bytes`` is cuobjdump's LOCAL (None when cuobjdump is absent). Access widths
    come from the PTX, leaving out the int64 table loads; 128 means ``ld.global.v4.b32``
    (``st.global.v4.b32``), 32/16 one element per instruction.
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
