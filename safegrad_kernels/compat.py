"""Living with several versions of the frameworks: feature detection and the declared ranges.

Two kinds of helper, both free of heavy imports (only ``numpy_rng_state_globals`` imports
torch and numpy, when called), so ``safegrad info`` can use them with torch alone:

- Feature detection: ``forward_inputs`` asks a model's forward what it takes, and
  ``numpy_rng_state_globals`` asks torch for what it has, instead of comparing version
  strings, so the code keeps working on a release that back-ports (or drops) a feature.
  (``SafeGradTrainer``'s overrides need none: they pass the arguments of whichever
  transformers calls them through to the same release's parent.)
- The declared ranges: ``declared_ranges`` reads the requirement specifiers from the
  installed package metadata (written from ``pyproject.toml``, the one place a range is
  stated), and ``version_rows`` compares each installed framework against its range for
  ``safegrad info``.

Version comparison uses ``packaging`` when it is importable (transformers, peft and
accelerate all depend on it), else ``_release_satisfies``, a small comparison of release
numbers that covers the specifier forms a range is written with here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

__all__ = [
    "FRAMEWORKS",
    "VersionRow",
    "declared_ranges",
    "forward_inputs",
    "numpy_rng_state_globals",
    "out_of_range_warnings",
    "parse_ranges",
    "satisfies",
    "version_rows",
]

# The distributions whose installed version decides whether our code paths work; the
# ranges themselves live in pyproject.toml (a name without a declared range is skipped).
FRAMEWORKS = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "deepspeed",
    "torchjd",
)

PACKAGE = "safegrad_kernels"


# -- feature detection ------------------------------------------------------------------------


def forward_inputs(module: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` less the keys that ``module.forward`` does not take.

    A tokenizer returns what its model family uses (a BERT tokenizer adds
    ``token_type_ids``), which need not be what the judge model takes: transformers 4.52's
    ``LlamaForSequenceClassification.forward`` raises on ``token_type_ids``, 5.x swallows
    it in ``**kwargs``. A forward with ``**kwargs`` gets everything, as it asked for.
    """
    params = inspect.signature(module.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in params}


def numpy_rng_state_globals() -> contextlib.AbstractContextManager[None]:
    """Allow-list numpy's array types for ``torch.load`` inside the ``with`` block.

    A Trainer checkpoint's ``rng_state.pth`` holds numpy's RNG state (an ndarray). Since
    torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses it unless the
    types are allow-listed; transformers 4.46 loads it without doing so, so resuming fails
    with "Weights only load failed ... numpy._core.multiarray._reconstruct" (later releases
    allow-list the same types themselves; nesting is harmless). A no-op on a torch without
    ``torch.serialization.safe_globals``, whose ``torch.load`` has no such check.
    """
    import numpy as np
    import torch

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return contextlib.nullcontext()
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved np.core to np._core
    # type(np.dtype(np.uint32)): the dtype class that numpy >= 1.25 pickles by its own name.
    return safe_globals(
        [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    )


# -- declared ranges --------------------------------------------------------------------------


class VersionRow(NamedTuple):
    """One framework: its installed version (None: absent), declared range, and verdict.

    ``ok`` is None when there is nothing to judge (not installed), else whether the
    installed version lies inside the declared range.
    """

    name: str
    installed: str | None
    declared: str
    ok: bool | None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# name, optional [extras], then the specifier (PEP 508 allows it in parentheses), then ;marker
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?(?P<spec>[^;()]*)\)?\s*(;.*)?$"
)


def _split_requirement(text: str) -> tuple[str, str]:
    """``(normalized name, specifier)`` of a requirement string; markers are ignored.

    A marker (``; extra == "hf"``, ``; platform_system == "Linux"``) says when a
    requirement applies, not which versions work, so it plays no part in the range.
    """
    match = _REQUIREMENT.match(text)
    if match is None:
        raise ValueError(f"cannot parse the requirement {text!r}")
    spec = ",".join(part.strip() for part in match["spec"].split(",") if part.strip())
    return _normalize(match["name"]), spec


def parse_ranges(requirements: Iterable[str]) -> dict[str, str]:
    """Normalized name -> specifier, over requirement strings (every extra included).

    A name listed by several extras with different specifiers gets all of them (the range
    is their intersection); names without a specifier are left out.
    """
    ranges: dict[str, list[str]] = {}
    for text in requirements:
        name, spec = _split_requirement(text)
        if not spec:
            continue
        parts = ranges.setdefault(name, [])
        parts.extend(p for p in spec.split(",") if p not in parts)
    return {name: ",".join(parts) for name, parts in ranges.items()}


def declared_ranges(package: str = PACKAGE) -> dict[str, str]:
    """The version specifiers ``package``'s installed metadata declares, by normalized name.

    Empty when the package is not installed (run from a source tree without ``pip
    install``): the ranges are then unknown, not violated.
    """
    try:
        requirements = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    return parse_ranges(requirements)


_CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*(\d\S*?)\s*$")


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of ``version``: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``."""
    match = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a release number from the version {version!r}")
    return tuple(int(x) for x in match[1].split("."))


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def _release_satisfies(version: str, specifier: str) -> bool:
    """``version`` against ``specifier`` by release numbers alone (``packaging`` absent).

    Pre-release, post-release and local labels are ignored (``5.0.0rc1`` counts as
    ``5.0.0``): close enough for a warning, and the ranges here name releases only.
    """
    have = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"cannot read the version clause {clause!r}")
        op, target = match.groups()
        if op in ("==", "!=") and target.endswith(".*"):
            prefix = _release(target[:-2])
            inside = have[: len(prefix)] == prefix
            if inside != (op == "=="):
                return False
            continue
        a, b = _padded(have, _release(target))
        if op == "~=":  # >= target and the same release up to the last given number
            stem = _release(target)[:-1]
            ok = a >= b and have[: len(stem)] == stem
        else:
            ok = {
                "==": a == b,
                "!=": a != b,
                "<=": a <= b,
                ">=": a >= b,
                "<": a < b,
                ">": a > b,
            }[op]
        if not ok:
            return False
    return True


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` lies in ``specifier`` (e.g. ``">=4.46.3,<6"``)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _release_satisfies(version, specifier)
    try:
        parsed = Version(version)
    except InvalidVersion:
        return _release_satisfies(version, specifier)
    # prereleases=True: a 5.0.0rc1 is judged by its number, not rejected for being an rc.
    return SpecifierSet(specifier).contains(parsed, prereleases=True)


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_rows(
    ranges: Mapping[str, str] | None = None,
    installed: Callable[[str], str | None] | None = None,
) -> list[VersionRow]:
    """One row per framework in ``FRAMEWORKS`` that has a declared range.

    ``ranges`` defaults to ``declared_ranges()``; ``installed`` maps a distribution name
    to its version or None, by default from the installed metadata.
    """
    ranges = declared_ranges() if ranges is None else ranges
    installed = _installed if installed is None else installed
    rows = []
    for name in FRAMEWORKS:
        spec = ranges.get(_normalize(name))
        if not spec:
            continue
        version = installed(name)
        ok = None if version is None else satisfies(version, spec)
        rows.append(VersionRow(name, version, spec, ok))
    return rows


def out_of_range_warnings(rows: Iterable[VersionRow]) -> list[str]:
    """One line per installed framework outside its declared range."""
    return [
        f"warning: {row.name} {row.installed} is outside the supported range {row.declared} "
        f"(pip install '{row.name}{row.declared}')"
        for row in rows
        if row.ok is False
    ]
