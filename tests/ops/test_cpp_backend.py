"""The C++ CPU backend against a float64 reference, kernel by kernel.

Tolerance rule: the backend's error against float64 is at most twice plain PyTorch's
(the torch backend's) error in the same dtype, plus a small per-dtype floor. Sizes
straddle the C++ chunk size (read from csrc/chunks.h) and tensor counts go past 1000.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from paths import ROOT

from safegrad_kernels.ops import cpp_backend, library
from safegrad_kernels.ops.torch_backend import TorchBackend

BACKEND = cpp_backend.BACKEND
_OK, _WHY = BACKEND.available()
if not _OK:
    pytest.skip(f"cpp backend unavailable: {_WHY}", allow_module_level=True)

ORACLE = TorchBackend()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_PAIRS = [pytest.param(g, r, id=f"{str(g)[6:]}-{str(r)[6:]}") for g in DTYPES for r in DTYPES]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _chunk() -> int:
    text = (cpp_backend.sources_dir() / "chunks.h").read_text()
    return int(re.search(r"kChunk\s*=\s*(\d+)", text).group(1))


CHUNK = _chunk()


def _layout(name: str) -> list[int]:
    """Tensor sizes for a named layout (counts 1, 7, 130 and 1000+)."""
    if name == "one":
        return [CHUNK + 1]
    if name == "edges":
        return [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]
    if name == "primes130":
        primes = (2, 3, 5, 13, 31, 97, 1009, 4099)
        return [primes[i % len(primes)] for i in range(130)]
    if name == "many":
        return [random.randrange(0, 64) for _ in range(1031)]
    raise ValueError(name)


LAYOUTS = ("one", "edges", "primes130", "many")


def _randn(sizes: list[int], dtype: torch.dtype, shift: float = 0.0) -> list[torch.Tensor]:
    return [(torch.randn(s) + shift).to(dtype) for s in sizes]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in tensors])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_within(name, got, oracle, ref, floor):
    """|got - ref| <= 2 |oracle - ref| + floor, elementwise (float64)."""
    err = (got.double() - ref).abs()
    allowed = 2 * (oracle.double() - ref).abs() + floor
    bad = err > allowed
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} values out of tolerance; worst err {err.max().item():.3g}, "
        f"allowed there {allowed[bad].min().item():.3g}"
    )


# --------------------------------------------------------------------- dot_norms
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("gdtype", "rdtype"), DTYPE_PAIRS)
def test_dot_norms(layout, gdtype, rdtype):
    sizes = _layout(layout)
    grads, refs = _randn(sizes, gdtype), _randn(sizes, rdtype, shift=0.1)
    got = BACKEND.dot_norms(grads, refs)
    assert got.dtype == torch.float32 and got.shape == (len(sizes), 3)
    oracle = ORACLE.dot_norms(grads, refs)
    g64, r64 = _flat(grads), _flat(refs)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def per_tensor(x):
        return torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, owner, x)

    ref = torch.stack([per_tensor(g64 * r64), per_tensor(r64 * r64), per_tensor(g64 * g64)], 1)
    # fp32 accumulation error scales with sum |a_i b_i|; inputs are exact in any dtype.
    scale = torch.stack([per_tensor((g64 * r64).abs()), ref[:, 1], ref[:, 2]], 1)
    _assert_within("dot_norms", got, oracle, ref, 4e-6 * scale + 1e-30)


def test_dot_norms_empty_tensors_give_zero_rows():
    grads = [torch.randn(0), torch.randn(5), torch.randn(0, 3)]
    refs = [torch.randn(0), torch.randn(5), torch.randn(0, 3)]
    got = BACKEND.dot_norms(grads, refs)
    assert torch.equal(got[0], torch.zeros(3)) and torch.equal(got[2], torch.zeros(3))


# --------------------------------------------------------------------- axpy_
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("gdtype", "rdtype"), DTYPE_PAIRS)
def test_axpy(layout, gdtype, rdtype):
    sizes = _layout(layout)
    grads, refs = _randn(sizes, gdtype), _randn(sizes, rdtype)
    coef = torch.randn(len(sizes))
    coef[::3] = 0.0  # every third tensor: exactly zero, so bitwise untouched
    before = [g.clone() for g in grads]
    expected = [g.clone() for g in grads]
    ORACLE.axpy_(expected, refs, coef)
    BACKEND.axpy_(grads, refs, coef)
    zero = [i for i in range(len(sizes)) if coef[i] == 0]
    for i in zero:
        assert torch.equal(_bits(grads[i]), _bits(before[i])), f"tensor {i} with coef 0 was written"
    # Elementwise check on everything concatenated (one reference, not a loop per tensor).
    c = torch.cat([coef[i].double().expand(n) for i, n in enumerate(sizes)])
    ref = _flat(before) + c * _flat(refs)
    # One rounding to the grad dtype (plus the fp32 intermediate): about 1 ulp.
    _assert_within("axpy", _flat(grads), _flat(expected), ref, ULP[gdtype] * ref.abs() + 1e-30)


@pytest.mark.parametrize("gdtype", DTYPES, ids=str)
def test_axpy_zero_coef_never_touches_nan_tensors(gdtype):
    # NaN in both operands: reading and writing back g + 0 * r would give NaN bits
    # different from the original payload or spread NaN; untouched means bit-identical.
    sizes = [CHUNK + 5, 17, 3 * CHUNK]
    grads = [torch.full((s,), float("nan"), dtype=gdtype) for s in sizes]
    grads[1] = torch.randn(17).to(gdtype)
    refs = [torch.full((s,), float("nan"), dtype=torch.float32) for s in sizes]
    refs[1] = torch.randn(17)
    before = [g.clone() for g in grads]
    BACKEND.axpy_(grads, refs, torch.tensor([0.0, 0.5, -0.0]))
    assert torch.equal(_bits(grads[0]), _bits(before[0]))
    assert torch.equal(_bits(grads[2]), _bits(before[2]))
    assert torch.isfinite(grads[1]).all() and not torch.equal(grads[1], before[1])


# --------------------------------------------------------------------- gram
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["edges", "primes130"])
def test_gram(m, layout):
    sizes = _layout(layout)
    lists = [_randn(sizes, DTYPES[j % 3], shift=0.05 * j) for j in range(m)]
    got = BACKEND.gram(lists)
    assert got.dtype == torch.float32 and got.shape == (m, m)
    assert torch.equal(got, got.T)
    oracle = ORACLE.gram(lists)
    flat = torch.stack([_flat(lst) for lst in lists])  # [m, total] float64
    ref = flat @ flat.T
    scale = flat.abs() @ flat.abs().T
    _assert_within("gram", got, oracle, ref, 4e-6 * scale + 1e-30)


# --------------------------------------------------------------------- combine_
@pytest.mark.parametrize("out_is_first", [True, False])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("odtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["edges", "many"])
def test_combine(out_is_first, m, odtype, layout):
    sizes = _layout(layout)
    out = _randn(sizes, odtype)
    lists = [_randn(sizes, DTYPES[(j + 1) % 3]) for j in range(m)]
    if out_is_first:
        lists[0] = out
    weights = torch.randn(m)
    originals = [[t.clone() for t in lst] for lst in lists]
    expected = [o.clone() for o in out]
    ORACLE.combine_(expected, originals, weights)
    BACKEND.combine_(out, lists, weights)
    flat = [_flat(lst) for lst in originals]
    ref = sum(weights[j].double() * flat[j] for j in range(m))
    mag = sum(weights[j].double().abs() * flat[j].abs() for j in range(m))
    # fp32 sum of m terms, then one rounding to the out dtype.
    floor = ULP[odtype] * ref.abs() + 4 * m * 2.0**-24 * mag + 1e-30
    _assert_within("combine", _flat(out), _flat(expected), ref, floor)


# --------------------------------------------------------------------- conversions
def test_fp16_widening_is_exact_for_every_bit_pattern():
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    out = [torch.empty(every.numel(), dtype=torch.float32)]
    BACKEND.combine_(out, [[every]], torch.ones(1))
    expected = every.float()
    nan = expected.isnan()
    assert torch.equal(out[0].isnan(), nan)
    assert torch.equal(_bits(out[0])[~nan], _bits(expected)[~nan])  # incl. -0 and subnormals


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_narrowing_rounds_like_torch(dtype):
    info = torch.finfo(dtype)
    # Random bit patterns across the whole fp32 range (ties, subnormals, overflow, inf).
    x = torch.randint(-(2**31), 2**31 - 1, (200_003,), dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    x = torch.cat([x, torch.tensor([0.0, -0.0, info.max, info.tiny, float("inf"), -float("inf")])])
    x = torch.cat([x, torch.randn(100_000) * info.tiny, torch.randn(100_000) * info.max])
    out = [torch.empty(x.numel(), dtype=dtype)]
    BACKEND.combine_(out, [[x]], torch.ones(1))
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(out[0].isnan(), nan)
    assert torch.equal(_bits(out[0])[~nan], _bits(expected)[~nan])


# --------------------------------------------------------------------- determinism
def _all_ops(grads, refs, lists, weights):
    out = [t.clone() for t in lists[0]]
    BACKEND.combine_(out, [out, *lists[1:]], weights)
    axpied = [g.clone() for g in grads]
    BACKEND.axpy_(axpied, refs, torch.randn(len(grads), generator=torch.Generator().manual_seed(1)))
    return BACKEND.dot_norms(grads, refs), BACKEND.gram(lists), out, axpied


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic_across_calls_and_threads(dtype):
    # Big enough for several chunks per thread, so the parallel path runs.
    sizes = [5 * CHUNK + 11, 3, 2 * CHUNK - 1, 70_001]
    grads, refs = _randn(sizes, dtype), _randn(sizes, torch.float32)
    lists = [grads, refs, _randn(sizes, torch.bfloat16)]
    weights = torch.randn(3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _all_ops(grads, refs, lists, weights)
        again = _all_ops(grads, refs, lists, weights)
        torch.set_num_threads(1)
        single = _all_ops(grads, refs, lists, weights)
    finally:
        torch.set_num_threads(threads)
    for other in (again, single):
        for a, b in zip(first, other):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert torch.equal(_bits(x), _bits(y))


# --------------------------------------------------------------------- op registration
def _opcheck_cases():
    g = [torch.randn(5, 3), torch.randn(CHUNK + 1)]
    r = [torch.randn(5, 3), torch.randn(CHUNK + 1)]
    h = [torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(CHUNK + 1, dtype=torch.bfloat16)]
    ops = torch.ops.safegrad
    return [
        ("dot_norms", ops.cpp_dot_norms.default, (g, h)),
        ("axpy", ops.cpp_axpy_.default, (h, r, torch.tensor([0.0, 0.25]))),
        ("gram", ops.cpp_gram.default, ([*g, *r, *h], 3)),
        ("combine_first", ops.cpp_combine_.default, (g, [*r, *h], torch.randn(3), True)),
        ("combine", ops.cpp_combine_.default, (h, [*g, *r], torch.randn(2), False)),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(case):
    _, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_schemas_come_from_the_python_definition_module():
    """csrc/ registers implementations only; each schema is the one ops.library defines."""
    assert set(cpp_backend.KERNEL_OPS) == set(library.CPP_KERNEL_OPS)
    source = (cpp_backend.sources_dir() / "safegrad_cpu.cpp").read_text()
    assert "m.def(" not in source and "TORCH_LIBRARY_IMPL(safegrad, CPU, m)" in source


def test_extension_loaded_before_the_package_works(tmp_path):
    """Loading the compiled library first and importing the package (the schemas) second."""
    import subprocess
    import sys
    from pathlib import Path

    info = BACKEND.build_info()
    if "build_dir" not in info:
        pytest.skip("the extension was loaded by hand in this process: no build to point at")
    so = Path(info["build_dir"]) / f"{info['name']}.so"
    probe = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "import safegrad_kernels as sk\n"
        "from safegrad_kernels.ops import cpp_backend\n"
        "assert cpp_backend.BACKEND.available() == (True, '')\n"
        "assert 'build_dir' not in cpp_backend.BACKEND.build_info(), 'rebuilt, not found'\n"
        "g, r = [torch.ones(5), torch.ones(2, 3)], [torch.full((5,), 2.0), torch.ones(2, 3)]\n"
        "torch.library.opcheck(torch.ops.safegrad.cpp_dot_norms.default, (g, r))\n"
        "print(torch.ops.safegrad.cpp_dot_norms(g, r).tolist())\n"
        "print(sk.dot_norms(g, r, backend='cpp').tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(so)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows, sums = out.stdout.strip().splitlines()[-2:]
    assert rows == "[[10.0, 20.0, 5.0], [6.0, 6.0, 6.0]]"
    assert sums == "[16.0, 26.0, 11.0]"


def test_build_name_follows_sources_and_flags(tmp_path):
    """A changed header, source or flag gives a new build directory (no stale .so)."""
    import shutil

    src = tmp_path / "csrc"
    shutil.copytree(cpp_backend.sources_dir(), src)
    name = cpp_backend._build_name(src, ["-O3"])
    assert cpp_backend._build_name(src, ["-O3"]) == name
    names = {name}
    for file in ("kernels.h", "safegrad_cpu.cpp"):
        path = src / file
        path.write_text(path.read_text() + "\n// edited\n")
        names.add(cpp_backend._build_name(src, ["-O3"]))
    names.add(cpp_backend._build_name(src, ["-O2"]))
    assert len(names) == 4


def test_kernel_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="refs"):
        torch.ops.safegrad.cpp_dot_norms([torch.randn(3)], [torch.randn(4)])
    with pytest.raises(RuntimeError, match="coef"):
        torch.ops.safegrad.cpp_axpy_([torch.randn(3)], [torch.randn(3)], torch.zeros(2))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.safegrad.cpp_dot_norms([torch.randn(3, dtype=torch.float64)], [torch.randn(3)])


def test_disable_env(monkeypatch):
    monkeypatch.setenv(cpp_backend.DISABLE_ENV, "1")
    ok, why = BACKEND.available()
    assert not ok and cpp_backend.DISABLE_ENV in why
    monkeypatch.delenv(cpp_backend.DISABLE_ENV)
    assert BACKEND.available() == (True, "")


def test_build_info():
    info = BACKEND.build_info()
    assert info["loaded"] and info["sources"] and "-O3" in info["flags"]


# --------------------------------------------------------------------- scalar fallback
_SCALAR_CHILD = """
import sys, torch
from torch.utils import cpp_extension
src, flags, name, path = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
sources = [str(p) for p in sorted(__import__("pathlib").Path(src).glob("*.cpp"))]
cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_include_paths=[src],
                   is_python_module=False, verbose=False)
import safegrad_kernels.ops.library  # the schemas, defined after the kernels registered
ops = torch.ops.safegrad
data = torch.load(path)
out = {}
for key, (g, r, coef, w) in data.items():
    out[key + "dn"] = [ops.cpp_dot_norms(g, r)]
    axpied = [t.clone() for t in g]
    ops.cpp_axpy_(axpied, r, coef)
    out[key + "ax"] = axpied
    out[key + "gram"] = [ops.cpp_gram([*g, *r], 2)]
    comb = [t.clone() for t in g]
    ops.cpp_combine_(comb, r, w, True)
    out[key + "co"] = comb
torch.save(out, path + ".out")
"""


@pytest.mark.slow
def test_scalar_build_matches_vector_build_bitwise(tmp_path):
    """Compilers without vector extensions get the scalar loops: same lanes, same bits."""
    import subprocess
    import sys

    sizes = [1, 7, 31, 33, 1000, CHUNK - 1, CHUNK + 1, 100_003]
    data = {}
    for gd, rd in [(g, r) for g in DTYPES for r in DTYPES]:
        data[f"{gd}{rd}"] = (_randn(sizes, gd), _randn(sizes, rd), torch.randn(8), torch.randn(2))
    path = tmp_path / "data.pt"
    torch.save(data, path)
    info = BACKEND.build_info()
    flags = [*info["flags"], "-DSAFEGRAD_VECTOR=0"]
    name = f"{info['name']}_scalar"
    child = [sys.executable, "-c", _SCALAR_CHILD, info["sources"], " ".join(flags), name, str(path)]
    subprocess.run(child, check=True, timeout=600)
    scalar = torch.load(str(path) + ".out")
    for key, (g, r, coef, w) in data.items():
        axpied = [t.clone() for t in g]
        BACKEND.axpy_(axpied, r, coef)
        comb = [t.clone() for t in g]
        BACKEND.combine_(comb, [comb, r], w)
        vector = {"dn": [BACKEND.dot_norms(g, r)], "ax": axpied, "gram": [BACKEND.gram([g, r])]}
        vector["co"] = comb
        for op, tensors in vector.items():
            for a, b in zip(tensors, scalar[key + op]):
                assert torch.equal(_bits(a), _bits(b)), f"{key} {op}"


def test_built_wheel_carries_the_sources_and_builds(tmp_path):
    """A wheel (not an editable install) finds its bundled csrc copy and compiles from it."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build the wheel without isolation)")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} < 68 (pyproject's build requirement)")
    import shutil

    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    root = tmp_path / "src"
    keep = ("pyproject.toml", "setup.py", "README.md", "csrc", "safegrad_kernels")
    checkout = ROOT
    for name in keep:
        src = checkout / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            root.mkdir(exist_ok=True)
            shutil.copy2(src, root / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", str(root), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run(build, check=True, cwd=tmp_path, timeout=300)
    (wheel,) = tmp_path.glob("safegrad_kernels-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import torch, safegrad_kernels as sk\n"
        "from safegrad_kernels.ops import cpp_backend\n"
        "print(cpp_backend.sources_dir())\n"
        "g, r = [torch.ones(5)], [torch.full((5,), 2.0)]\n"
        "print(sk.dot_norms(g, r, backend='cpp').tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    # Its own build folder: sharing the default one would leave it pointing at this
    # wheel's (temporary) sources, and the next process would rebuild from the checkout.
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    src, sums = out.stdout.strip().splitlines()[-2:]
    assert Path(src) == target / "safegrad_kernels" / "_csrc", src
    assert any((tmp_path / "torch_extensions").iterdir()), "the wheel did not build its own"
    assert sums == "[10.0, 20.0, 5.0]"


def test_no_compiler_means_unavailable_with_a_reason(tmp_path):
    """Without a working C++ compiler the import, `safegrad info` and the ops still work."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["CXX"] = str(tmp_path / "no-such-compiler")
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")  # nothing cached: it must build
    env.pop("SAFEGRAD_BACKEND", None)
    probe = (
        "import json, torch, safegrad_kernels as sk\n"
        "from safegrad_kernels.cli import main\n"
        "main(['info', '--json'])\n"
        "print(json.dumps(sk.dot_norms([torch.ones(3)], [torch.ones(3)]).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info_text, sums = out.stdout.rsplit("\n", 2)[:2]
    info = json.loads(info_text)
    cpp = info["backends"]["cpp"]
    assert not cpp["available"] and cpp["reason"], cpp
    assert info["auto_backend"]["cpu"] == "torch"
    assert json.loads(sums) == [3.0, 3.0, 3.0]
