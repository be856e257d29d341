"""The study's run cache: one JSON file per training run, keyed by what determines it.

A run's result is a function of

* the run itself: method, its swept weight, the harmful ratio p, the seed;
* the method's registry defaults (e.g. SafeGrad's ``surgery_granularity``), which the run
  uses without naming them;
* the recipe: model, alignment and user-stage specs (the aligned model's own cache key
  covers the first two plus the vocabulary), the evaluation set sizes and seed, and the
  pairing of batch streams;
* the code that trains and evaluates: a fingerprint of the modules on that path
  (``TRAINING_MODULES``), taken from their syntax tree without docstrings, so that edits to
  comments, docstrings or formatting keep the cache and any other edit invalidates it;
  ``STUDY_VERSION`` for the study's own run function;
* the numerics: package, torch, transformers and peft versions, torch's thread count, and
  ``SAFEGRAD_BACKEND`` (the op backends agree to rounding, not bitwise).

Nothing else enters the key: not the output folder, the number of jobs, the time budget,
nor the rest of the design (which seeds or ratios the study also runs), so a study can be
extended (more seeds) and still reuse every run it already has. The op layer
(``safegrad_kernels.ops``) is left out of the fingerprint on purpose: its backends are
tested against a float64 oracle, and a refactor there must not restart a study.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

# Bump when the study's run function (``study._train_one``) changes what it records.
STUDY_VERSION = 2

# The modules that decide a run's numbers (imported by name, fingerprinted by source).
TRAINING_MODULES = (
    "safegrad_kernels.demo.world",
    "safegrad_kernels.demo.model",
    "safegrad_kernels.demo.train",
    "safegrad_kernels.demo.evaluate",
    "safegrad_kernels.losses",
    "safegrad_kernels.fused_losses",
    "safegrad_kernels.reference_store",
    "safegrad_kernels.integrations.fused_head",
    "safegrad_kernels.surgery.base",
    "safegrad_kernels.surgery.methods",
    "safegrad_kernels.surgery.safegrad",
    "safegrad_kernels.surgery.spf",
    "safegrad_kernels.surgery.stats",
    "safegrad_kernels.integrations.peft",
)


def source_fingerprint(source: str) -> str:
    """Hash of a module's syntax tree with docstrings removed (comments never reach it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body:
            continue
        first = body[0]
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    dump = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def code_fingerprint(modules: tuple[str, ...] = TRAINING_MODULES) -> dict[str, str]:
    """``{module: source_fingerprint}`` for each module (found, not imported)."""
    out = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"module {name!r} of the training path was not found")
        out[name] = source_fingerprint(Path(spec.origin).read_text())
    return out


def environment(threads: int) -> dict:
    """The versions and settings that can change a run's numbers (see the module docstring)."""
    import peft
    import torch
    import transformers

    from safegrad_kernels import __version__

    return {
        "study_version": STUDY_VERSION,
        "package": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": threads,
        "backend": os.environ.get("SAFEGRAD_BACKEND", "auto"),
        "code": code_fingerprint(),
    }


def run_key(inputs: dict) -> str:
    """A stable hash of a run's key inputs (JSON with sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class RunCache:
    """JSON entries ``<folder>/<prefix>-<key>.json``, written atomically (temp file + rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str, prefix: str = "run") -> Path:
        return self.folder / f"{prefix}-{key}.json"

    def load(self, key: str, prefix: str = "run") -> dict | None:
        """The entry, or ``None`` when absent or unreadable (a torn file is a miss)."""
        try:
            entry = json.loads(self.path(key, prefix).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def save(self, key: str, entry: dict, prefix: str = "run") -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key, prefix)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{prefix}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**entry, "key": key}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
