"""The public ops, through every available backend, against a float64 reference.

Backend-specific kernel tests live in test_cpp_backend.py / test_triton_backend.py;
this file checks the contract a user sees: results, in-place effects, statistics,
validation, determinism, opcheck, torch.compile and the absence of host syncs.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import device_backend_params

import safegrad_kernels as sk
from safegrad_kernels.ops import pipeline
from safegrad_kernels.ops.dispatch import available_backends

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]


def _backends_on(device: str) -> list[str]:
    return [name for name, (ok, _) in available_backends(device).items() if ok]


# Every (device, backend) pair: the same oracle and tolerances on each device. A test that
# takes these runs with its device as torch's default device (the ``on_device`` fixture),
# so every tensor it makes lives there.
DEVICE_BACKENDS = device_backend_params(_backends_on)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes around the chunk sizes the kernels use (4096 and 16384 are common choices)
# plus 0, 1 and primes.
SIZES = [0, 1, 2, 3, 31, 127, 1021, 4095, 4096, 4097, 16383, 16384, 16385]
# Relative error floors per dtype, on top of 2x plain PyTorch's own error.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# The Triton interpreter evaluates tl.sum over a block's 2048 lanes with numpy along a
# non-contiguous axis, which numpy sums sequentially (a GPU reduces as a tree): fp32 sums
# then carry up to ~1e-6 relative error (seen here: median 3e-7, worst 1.2e-6 in 30 seeds).
REDUCTION_FLOOR = {("triton", torch.float32): 4e-6}


def sum_floor(dtype, backend):
    return REDUCTION_FLOOR.get((backend, dtype), FLOOR[dtype])


def _skip_slow_interpreter(backend: str, count: int, limit: int = 7) -> None:
    # The Triton interpreter runs every program in Python (a 300-tensor reduction takes
    # ~25 s here); its kernels are covered in depth by test_triton_backend.py, so the
    # API-level sweep keeps it to short lists. On a GPU the kernels are compiled: no limit.
    on_cpu = torch.get_default_device().type == "cpu"
    if backend == "triton" and on_cpu and count > limit:
        pytest.skip("long lists under the Triton interpreter are covered by test_triton_backend.py")


def make_lists(count, dtype, *, sizes=SIZES, m=2, device="cpu"):
    """m lists of `count` random tensors with sizes drawn from `sizes`, some 2-D.

    Sizes above 1024 (the chunk-boundary cases) go to at most 8 tensors so that long
    lists stay quick; the rest draw from the small sizes.
    """
    small = [n for n in sizes if n <= 1024] or sizes
    big = [n for n in sizes if n > 1024]
    shapes = []
    for k in range(count):
        n = random.choice(big if big and k % max(1, count // 8) == 0 else small)
        shapes.append((n,) if n < 4 or random.random() < 0.5 else (1, n) if n % 2 else (2, n // 2))
    return [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(m)]


def flat64(tensors):
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.reshape(-1).double() for t in tensors])


def plain_dot_norms(grads, refs):
    """What plain PyTorch computes in the inputs' dtype (for the tolerance rule)."""
    dot = sum(
        (torch.dot(g.reshape(-1), r.reshape(-1)).double() for g, r in zip(grads, refs)),
        torch.zeros((), dtype=torch.float64),
    )
    rr = sum(
        (torch.dot(r.reshape(-1), r.reshape(-1)).double() for r in refs),
        torch.zeros((), dtype=torch.float64),
    )
    gg = sum(
        (torch.dot(g.reshape(-1), g.reshape(-1)).double() for g in grads),
        torch.zeros((), dtype=torch.float64),
    )
    return torch.stack([dot, rr, gg])


def assert_sums_close(got, ref, plain, scale, dtype, backend):
    got, ref, plain = got.double(), ref.double(), plain.double()
    assert torch.isfinite(got).all(), got
    err = (got - ref).abs()
    allowed = 2 * (plain - ref).abs() + sum_floor(dtype, backend) * scale + 1e-30
    assert (err <= allowed).all(), f"error {err.tolist()} > allowed {allowed.tolist()}"


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 7, 130, 1000])
def test_dot_norms_matches_float64(device, on_device, backend, dtype, count):
    _skip_slow_interpreter(backend, count, limit=130)
    sizes = SIZES if count <= 130 else SIZES[:6]
    grads, refs = make_lists(count, dtype, sizes=sizes)
    g, r = flat64(grads), flat64(refs)
    ref = torch.stack([g @ r, r @ r, g @ g])
    scale = torch.stack([(g @ g * (r @ r)).sqrt(), r @ r, g @ g])
    got = sk.dot_norms(grads, refs, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert_sums_close(got, ref, plain_dot_norms(grads, refs), scale, dtype, backend)

    rows = sk.dot_norms(grads, refs, per_tensor=True, backend=backend)
    assert rows.shape == (count, 3)
    for i in random.sample(range(count), min(count, 20)):
        gi, ri = flat64([grads[i]]), flat64([refs[i]])
        ref_i = torch.stack([gi @ ri, ri @ ri, gi @ gi])
        scale_i = torch.stack([(gi @ gi * (ri @ ri)).sqrt(), ri @ ri, gi @ gi])
        plain_i = plain_dot_norms([grads[i]], [refs[i]])
        assert_sums_close(rows[i], ref_i, plain_i, scale_i, dtype, backend)


def reference_update(grads, refs, rho, eps, per_tensor):
    """Float64 SafeGrad update of each tensor, and the float64 statistics."""
    groups = [[i] for i in range(len(grads))] if per_tensor else [list(range(len(grads)))]
    new, stats = [None] * len(grads), []
    for idx in groups:
        g, r = flat64([grads[i] for i in idx]), flat64([refs[i] for i in idx])
        dot, rr, gg = g @ r, r @ r, g @ g
        c = dot / rr if (dot < 0 and rr > eps) else torch.zeros((), dtype=torch.float64)
        stats.append(torch.stack([dot, rr, gg, c]))
        for i in idx:
            new[i] = grads[i].double() - c * refs[i].double() + rho * refs[i].double()
    return new, torch.stack(stats) if per_tensor else stats[0]


def plain_update(grads, refs, coef, rho):
    """The update as plain PyTorch does it in the gradients' dtype."""
    return [g.add(r.to(g.dtype), alpha=float(rho - c)) for g, r, c in zip(grads, refs, coef)]


def make_conflict(grads, refs, conflict: bool):
    """Shift the refs so the global dot product has the requested sign."""
    dot = flat64(grads) @ flat64(refs)
    if (dot < 0) != conflict:
        for r in refs:
            r.neg_()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 7, 130])
@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("rho", [0.0, 1.0])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_project_conflicting_matches_float64(
    device, on_device, backend, dtype, count, conflict, rho, per_tensor
):
    _skip_slow_interpreter(backend, count)
    grads, refs = make_lists(count, dtype, sizes=SIZES[:9] if backend == "triton" else SIZES)
    make_conflict(grads, refs, conflict)
    before = [g.clone() for g in grads]
    new_ref, stats_ref = reference_update(before, refs, rho, 1e-12, per_tensor)
    stats = sk.project_conflicting_(grads, refs, rho=rho, per_tensor=per_tensor, backend=backend)
    assert stats.shape == ((count, 4) if per_tensor else (4,))
    assert torch.isfinite(stats).all()
    # c = dot / ||r||^2, and dot's rounding error scales with ||g|| ||r||, so c's absolute
    # slack is tol * ||g|| / ||r|| per row; that also covers a row whose dot is a rounding
    # call around zero (c may then be 0 on one side and tiny on the other).
    c_ref, c = stats_ref[..., 3], stats[..., 3].double()
    rr, gg = stats_ref[..., 1], stats_ref[..., 2]
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    slack = torch.where(rr > 0, tol * (gg / rr.clamp_min(1e-300)).sqrt(), 0.0)
    assert ((c - c_ref).abs() <= tol * c_ref.abs() + slack).all(), (c, c_ref)
    coef = stats[:, 3] if per_tensor else stats[3].expand(count)
    plain = plain_update(before, refs, coef.tolist(), rho)
    for i, (g, ref_i, p, b, r) in enumerate(zip(grads, new_ref, plain, before, refs)):
        if float(rho - coef[i]) == 0.0:
            assert torch.equal(g, b), f"tensor {i} changed although its coefficient is 0"
            continue
        err = (g.double() - ref_i).abs().max() if g.numel() else 0.0
        plain_err = (p.double() - ref_i).abs().max() if g.numel() else 0.0
        # Cancellation (g - c*r can be ~0) makes the floor relative to the inputs' scale.
        scale = (
            (b.double().abs() + (rho - coef[i].double()).abs() * r.double().abs()).max()
            if g.numel()
            else 0.0
        )
        assert err <= 2 * plain_err + FLOOR[dtype] * scale + 1e-30, (i, err, plain_err)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_no_conflict_and_zero_rho_leaves_grads_bitwise_untouched(device, on_device, backend):
    grads, refs = make_lists(50, torch.bfloat16)
    make_conflict(grads, refs, conflict=False)
    before = [g.clone() for g in grads]
    stats = sk.project_conflicting_(grads, refs, rho=0.0, backend=backend)
    assert stats[3] == 0
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sums_leave_grads_untouched(device, on_device, backend, bad):
    grads, refs = make_lists(9, torch.float32)
    grads[4] = torch.randn(7)
    grads[4][3] = bad
    refs[4] = torch.randn(7)
    before = [g.clone() for g in grads]
    stats = sk.project_conflicting_(grads, refs, rho=1.0, backend=backend)
    assert not torch.isfinite(stats[:3]).all()
    assert stats[3] == 0
    for a, b in zip(grads, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_zero_reference_is_a_no_op(device, on_device, backend, per_tensor):
    grads = [torch.randn(33), torch.randn(4, 5).bfloat16()]
    refs = [torch.zeros(33), torch.zeros(4, 5).bfloat16()]
    before = [g.clone() for g in grads]
    stats = sk.project_conflicting_(grads, refs, rho=1.0, per_tensor=per_tensor, backend=backend)
    assert torch.isfinite(stats).all()
    assert (stats[..., 3] == 0).all()
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_mixed_dtypes_in_one_list(device, on_device, backend):
    grads, refs = [], []
    for i in range(12):
        n = random.choice(SIZES[1:9])
        grads.append(torch.randn(n).to(DTYPES[i % 3]))
        refs.append(torch.randn(n).to(DTYPES[(i // 3) % 3]))
    make_conflict(grads, refs, conflict=True)
    before = [g.clone() for g in grads]
    new_ref, stats_ref = reference_update(before, refs, 1.0, 1e-12, per_tensor=False)
    stats = sk.project_conflicting_(grads, refs, rho=1.0, backend=backend)
    assert torch.allclose(stats.double(), stats_ref, rtol=2e-3, atol=1e-3)
    for g, ref_i in zip(grads, new_ref):
        assert torch.allclose(g.double(), ref_i, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_gram_matches_float64(device, on_device, backend, dtype, m):
    lists = make_lists(7 if backend == "triton" else 40, dtype, m=m, sizes=SIZES[:10])
    flats = torch.stack([flat64(lst) for lst in lists])
    ref = flats @ flats.T
    got = sk.gram(lists, backend=backend)
    assert got.shape == (m, m) and got.dtype == torch.float32
    norms = flats.norm(dim=1)
    scale = norms[:, None] * norms[None, :]
    plain = torch.stack([torch.stack([plain_dot_norms(a, b)[0] for b in lists]) for a in lists])
    assert_sums_close(got, ref, plain, scale, dtype, backend)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [True, False])
def test_combine_matches_float64(device, on_device, backend, dtype, in_place):
    m = 3
    lists = make_lists(9 if backend == "triton" else 40, dtype, m=m, sizes=SIZES[:10])
    weights = torch.randn(m)
    ref = [
        sum(weights[j].double() * lists[j][i].double() for j in range(m))
        for i in range(len(lists[0]))
    ]
    plain = [sum(float(weights[j]) * lists[j][i] for j in range(m)) for i in range(len(lists[0]))]
    out = lists[0] if in_place else [torch.empty_like(t) for t in lists[0]]
    sk.combine_(out, lists, weights, backend=backend)
    for i, (o, r, p) in enumerate(zip(out, ref, plain)):
        if o.numel():
            err, plain_err = (o.double() - r).abs().max(), (p.double() - r).abs().max()
            # The floor scales with the terms, not the result: a weighted sum can cancel
            # to far below its inputs (seen: a result of 1e-3 from terms of order 1).
            terms = sum(weights[j].double().abs() * lists[j][i].double().abs() for j in range(m))
            assert err <= 2 * plain_err + FLOOR[dtype] * terms.max() + 1e-30


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_empty_lists_return_zeros(device, on_device, backend):
    assert torch.equal(sk.dot_norms([], [], backend=backend), torch.zeros(3))
    assert sk.dot_norms([], [], per_tensor=True, backend=backend).shape == (0, 3)
    assert torch.equal(sk.project_conflicting_([], [], rho=1.0, backend=backend), torch.zeros(4))
    assert torch.equal(sk.gram([[], []], backend=backend), torch.zeros(2, 2))
    sk.combine_([], [[], []], torch.ones(2), backend=backend)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_repeated_calls_are_bitwise_identical(device, on_device, backend):
    grads, refs = make_lists(60 if backend == "triton" else 300, torch.bfloat16)
    first = sk.dot_norms(grads, refs, per_tensor=True, backend=backend)
    gram1 = sk.gram([grads, refs], backend=backend)
    for _ in range(2):
        assert torch.equal(sk.dot_norms(grads, refs, per_tensor=True, backend=backend), first)
        assert torch.equal(sk.gram([grads, refs], backend=backend), gram1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
def test_results_do_not_depend_on_thread_count(backend):
    grads, refs = make_lists(3, torch.float32, sizes=[1_000_003, 65_537, 17])
    torch.set_num_threads(1)
    one = sk.dot_norms(grads, refs, backend=backend), sk.gram([grads, refs], backend=backend)
    torch.set_num_threads(2)
    two = sk.dot_norms(grads, refs, backend=backend), sk.gram([grads, refs], backend=backend)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# --- validation -------------------------------------------------------------------------


def _bad_calls():
    g, r = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.randn(8)
    return [
        ("grads must be a list", lambda b: sk.dot_norms(g, [r], backend=b), TypeError),
        (
            "refs\\[0\\] must be a torch.Tensor",
            lambda b: sk.dot_norms([g], [1.0], backend=b),
            TypeError,
        ),
        (
            "grads has 2 tensors but refs has 1",
            lambda b: sk.project_conflicting_([g, g.clone()], [r], backend=b),
            ValueError,
        ),
        (
            "shape mismatch at index 1",
            lambda b: sk.project_conflicting_([g, torch.randn(3)], [r, torch.randn(4)], backend=b),
            ValueError,
        ),
        (
            "grads\\[1\\] has dtype torch.int64",
            lambda b: sk.project_conflicting_(
                [g, torch.ones(2, dtype=torch.long)], [r, torch.ones(2)], backend=b
            ),
            TypeError,
        ),
        (
            "grads\\[1\\] has dtype torch.float64",
            lambda b: sk.project_conflicting_(
                [g, torch.ones(2, dtype=torch.float64)], [r, torch.ones(2)], backend=b
            ),
            TypeError,
        ),
        (
            "refs\\[1\\] .* is not contiguous",
            lambda b: sk.project_conflicting_(
                [g, torch.randn(3, 4)], [r, torch.randn(4, 3).T], backend=b
            ),
            ValueError,
        ),
        (
            "refs\\[1\\] is on meta",
            lambda b: sk.project_conflicting_(
                [g, torch.randn(2)], [r, torch.randn(2, device="meta")], backend=b
            ),
            ValueError,
        ),
        (
            "grads\\[1\\] overlaps grads\\[0\\]",
            lambda b: sk.project_conflicting_(
                [t[:5], t[3:]], [torch.randn(5), torch.randn(5)], backend=b
            ),
            ValueError,
        ),
        ("overlaps", lambda b: sk.project_conflicting_([t[:4]], [t[2:6]], backend=b), ValueError),
        (
            "layout",
            lambda b: sk.project_conflicting_(
                [g, torch.randn(3, 3).to_sparse()], [r, torch.randn(3, 3).to_sparse()], backend=b
            ),
            TypeError,
        ),
        (
            "rho must be finite",
            lambda b: sk.project_conflicting_([g], [r], rho=float("nan"), backend=b),
            ValueError,
        ),
        (
            "eps must be >= 0",
            lambda b: sk.project_conflicting_([g], [r], eps=-1.0, backend=b),
            ValueError,
        ),
        (
            "weights must have shape \\[2\\]",
            lambda b: sk.combine_([g], [[g], [r]], torch.ones(3), backend=b),
            ValueError,
        ),
        (
            "weights must be a tensor",
            lambda b: sk.combine_([g], [[g], [r]], [1.0, 2.0], backend=b),
            TypeError,
        ),
        (
            "lists\\[0\\] has 1 tensors but lists\\[1\\] has 2",
            lambda b: sk.gram([[g], [r, r]], backend=b),
            ValueError,
        ),
        (
            "overlaps out\\[0\\]",
            lambda b: sk.combine_([r], [[g], [r]], torch.ones(2), backend=b),
            ValueError,
        ),
        ("unknown backend 'nope'", lambda b: sk.dot_norms([g], [r], backend="nope"), ValueError),
    ]


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(device, on_device, backend, case):
    match, call, exc = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call(backend)


def test_overlap_check_agrees_with_brute_force():
    """The vectorised sweep in check_no_overlap against an all-pairs check, on random views."""
    from safegrad_kernels.ops.validate import check_no_overlap

    buf = torch.zeros(256)
    for _ in range(300):

        def views(k):
            out = []
            for _ in range(k):
                a = random.randrange(0, 256)
                out.append(buf[a : a + random.choice([0, 1, 3, 8, 20])])
            return out

        written, read = views(random.randint(1, 4)), views(random.randint(0, 4))

        def span(t):
            return (t.data_ptr(), t.data_ptr() + 4 * t.numel()) if t.numel() else None

        def hit(a, b):
            sa, sb = span(a), span(b)
            return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]

        clash = any(hit(a, b) for i, a in enumerate(written) for b in written[i + 1 :]) or any(
            hit(a, b) for a in written for b in read
        )
        if clash:
            with pytest.raises(ValueError, match="overlaps"):
                check_no_overlap("out", written, [("x", read)])
        else:
            check_no_overlap("out", written, [("x", read)])


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_bad_input_mutates_nothing(device, on_device, backend):
    grads = [torch.randn(10), torch.randn(10), torch.randn(3)]
    refs = [-g.clone() for g in grads[:2]] + [torch.randn(4)]  # last pair mismatched
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="index 2"):
        sk.project_conflicting_(grads, refs, rho=1.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_backend_selection(monkeypatch):
    g, r = [torch.randn(5)], [torch.randn(5)]
    monkeypatch.setenv("SAFEGRAD_BACKEND", "torch")
    assert pipeline is not None and sk.dot_norms(g, r).shape == (3,)
    monkeypatch.setenv("SAFEGRAD_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        sk.dot_norms(g, r)
    # An explicit backend beats the environment variable.
    assert sk.dot_norms(g, r, backend="torch").shape == (3,)


def test_backends_load_lazily_one_by_one():
    """Importing loads no backend (nor triton, nor the C++ toolchain); asking for one loads it."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "import safegrad_kernels as sk\n"
        "def loaded():\n"
        "    return sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
        "                  if m.startswith('safegrad_kernels.ops.') and m.endswith('_backend'))\n"
        "print(loaded(), 'triton' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)\n"
        "sk.dot_norms([torch.ones(3)], [torch.ones(3)], backend='torch')\n"
        "print(loaded())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAFEGRAD_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["[] False False", "['torch_backend']"]


# --- torch.library / torch.compile / host sync --------------------------------------------


def test_every_schema_comes_from_the_definition_module():
    from safegrad_kernels.ops import library

    for name, schema in {**library.PUBLIC_OPS, **library.CPP_KERNEL_OPS}.items():
        assert str(getattr(torch.ops.safegrad, name).default._schema) == f"safegrad::{name}{schema}"


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck_every_op(device, on_device, backend):
    g = [torch.randn(5, 3), torch.randn(7).bfloat16()]
    r = [torch.randn(5, 3), torch.randn(7).bfloat16()]
    ops = torch.ops.safegrad
    cases = [
        (ops.dot_norms.default, (g, r, False, backend)),
        (ops.dot_norms.default, (g, r, True, backend)),
        (ops.project_conflicting_.default, ([t.clone() for t in g], r, 1.0, 1e-12, False, backend)),
        (ops.project_conflicting_.default, ([t.clone() for t in g], r, 0.0, 1e-12, True, backend)),
        (ops.axpy_.default, ([t.clone() for t in g], r, torch.tensor([0.5, 0.0]), backend)),
        (ops.gram.default, ([*g, *r], 2, backend)),
        (ops.combine_.default, ([t.clone() for t in g], [*g, *r], torch.randn(2), False, backend)),
        (ops.combine_.default, ([t.clone() for t in g], [*r], torch.randn(2), True, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def step(grads, refs):
        stats = sk.project_conflicting_(grads, refs, rho=1.0)
        return stats[3] * 2

    grads, refs = make_lists(5, torch.float32, sizes=[3, 17, 64])
    make_conflict(grads, refs, conflict=True)
    eager = [g.clone() for g in grads]
    expected = step(eager, refs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(grads, refs)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_hot_path_never_syncs(device, on_device, backend, per_tensor, forbid_host_sync):
    grads, refs = make_lists(20, torch.bfloat16, sizes=SIZES[:9], m=2)
    make_conflict(grads, refs, conflict=True)
    weights = torch.tensor([0.5, -1.0])
    with forbid_host_sync():
        sk.dot_norms(grads, refs, per_tensor=per_tensor, backend=backend)
        sk.project_conflicting_(grads, refs, rho=1.0, per_tensor=per_tensor, backend=backend)
        sk.gram([grads, refs], backend=backend)
        sk.combine_(grads, [grads, refs], weights, backend=backend)


def test_the_sync_guard_can_fail(forbid_host_sync):
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        if torch.ones(1):
            pass
