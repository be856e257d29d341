"""compat: feature detection, the declared version ranges and their check in `safegrad info`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safegrad_kernels import compat
from safegrad_kernels.cli.info import _print_info
from safegrad_kernels.environment import collect_info

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS_OLDEST = ROOT / ".ci" / "constraints-oldest.txt"

# -- version comparison --------------------------------------------------------------------

# (version, specifier, inside?): local labels, padding, wildcards, ~=, and an rc.
CASES = [
    ("2.13.0+cpu", ">=2.6", True),
    ("2.5.1", ">=2.6", False),
    ("4.46.3", ">=4.46.3", True),
    ("4.46.2", ">=4.46.3", False),
    ("4.46", ">=4.46.0", True),
    ("5.24.0", ">=4.46.3,<6", True),
    ("6.0.0", ">=4.46.3,<6", False),
    ("0.13.2", ">0.13.2", False),
    ("0.13.3", ">0.13.2", True),
    ("1.0.1", "<=1.0.1", True),
    ("1.0.1", "!=1.0.1", False),
    ("1.0.1", "==1.0.*", True),
    ("1.1.0", "==1.0.*", False),
    ("1.1.0", "!=1.0.*", True),
    ("0.15.7", "~=0.15.2", True),
    ("0.16.0", "~=0.15.2", False),
    ("0.15.1", "~=0.15.2", False),
    ("3.2.0", "==3.2", True),
    ("11.0.0", ">=9.0", True),  # numeric, not lexical
]


@pytest.mark.parametrize(("version", "spec", "inside"), CASES)
def test_satisfies_and_the_fallback_agree_with_the_expected_verdict(version, spec, inside):
    assert compat.satisfies(version, spec) is inside
    assert compat._release_satisfies(version, spec) is inside


def test_satisfies_works_without_packaging(monkeypatch):
    # `safegrad info` must judge torch's range on an install with torch alone.
    monkeypatch.setitem(sys.modules, "packaging", None)
    monkeypatch.setitem(sys.modules, "packaging.specifiers", None)
    monkeypatch.setitem(sys.modules, "packaging.version", None)
    assert compat.satisfies("2.13.0+cpu", ">=2.6,<3") is True
    assert compat.satisfies("1.13.1", ">=2.6") is False


@pytest.mark.parametrize("bad", ["=>2.6", ">=", "~2.6"])
def test_unreadable_clause_raises(bad):
    with pytest.raises(ValueError, match="clause"):
        compat._release_satisfies("2.6.0", bad)


# -- declared ranges -------------------------------------------------------------------------


def test_parse_ranges_reads_names_specifiers_extras_and_markers():
    requirements = [
        "torch>=2.6",
        "numpy",
        'triton>=3.2; platform_system == "Linux" and extra == "triton"',
        'transformers>=4.46.3; extra == "hf"',
        'transformers>=4.46.3; extra == "demo"',
        'Peft (>=0.13.2,<1); extra == "hf"',
        'accelerate[torch]>=1.0.1; extra == "hf"',
        'safegrad_kernels[cpp,demo,hf,triton]; extra == "test"',
        'torch!=2.7.0; extra == "x"',
    ]
    assert compat.parse_ranges(requirements) == {
        "torch": ">=2.6,!=2.7.0",  # two extras' clauses: both hold
        "triton": ">=3.2",
        "transformers": ">=4.46.3",
        "peft": ">=0.13.2,<1",
        "accelerate": ">=1.0.1",
    }


def test_version_rows_judge_each_installed_framework():
    ranges = {"torch": ">=2.6", "transformers": ">=4.46.3", "peft": ">=0.13.2", "numpy": ">=1"}
    installed = {"torch": "2.13.0+cpu", "transformers": "4.45.2"}
    rows = compat.version_rows(ranges, installed.get)
    assert rows == [
        compat.VersionRow("torch", "2.13.0+cpu", ">=2.6", True),
        compat.VersionRow("transformers", "4.45.2", ">=4.46.3", False),
        compat.VersionRow("peft", None, ">=0.13.2", None),  # absent: nothing to judge
    ]  # numpy is no framework: not listed
    (line,) = compat.out_of_range_warnings(rows)
    assert "transformers 4.45.2" in line and ">=4.46.3" in line


def test_declared_ranges_come_from_the_installed_metadata():
    ranges = compat.declared_ranges()
    assert "torch" in ranges and ranges["torch"].startswith(">=")
    assert compat.declared_ranges("no-such-distribution-xyz") == {}


def _pyproject_ranges() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return compat.parse_ranges(requirements)


def _oldest_pins() -> dict[str, str]:
    """Framework -> pinned version; other lines may only constrain non-frameworks."""
    pins = {}
    for line in CONSTRAINTS_OLDEST.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, spec = compat._split_requirement(line)
        if name not in compat.FRAMEWORKS:
            assert not spec.startswith("=="), f"{line!r}: a pin of a non-framework"
            continue
        match = re.fullmatch(r"==(\S+)", spec)
        assert match, f"{CONSTRAINTS_OLDEST.name}: {line!r} is not a name==version pin"
        pins[name] = match[1]
    return pins


def test_oldest_ci_pins_are_exactly_the_declared_floors():
    # One idea, one place: pyproject.toml states each range; the oldest-stack CI run
    # installs each framework's floor, and this test keeps the two from drifting apart.
    ranges = _pyproject_ranges()
    floors = {}
    for name in compat.FRAMEWORKS:
        spec = ranges.get(name)
        if spec is None:
            continue
        lower = [c for c in spec.split(",") if c.startswith(">=")]
        assert len(lower) == 1, f"{name}{spec}: a framework's range needs one >= floor"
        floors[name] = lower[0][2:]
    # The newest-only integrations are not installed on the oldest stack (trl >= 1.8 needs a
    # newer transformers than the hf floor); their floors were verified against the newest
    # stack instead (see pyproject.toml). Every other declared floor is pinned.
    for name in NEWEST_ONLY:
        floors.pop(name, None)
    assert _oldest_pins() == floors


# Frameworks the oldest-stack CI run leaves out (.ci/run installs .[triton,hf,cpp,demo,dev]).
NEWEST_ONLY = ("trl", "deepspeed", "torchjd")


def test_the_frameworks_we_use_have_declared_ranges():
    assert {"torch", "transformers", "peft", "accelerate"} <= set(_pyproject_ranges())


# -- feature detection ------------------------------------------------------------------------


class _Judge(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids.sum() + attention_mask.sum()


class _KwargsJudge(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return len(kwargs)


def test_forward_inputs_drops_only_keys_the_forward_cannot_take():
    ids = torch.randint(1, 17, (3, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": ids * 0}
    judge = _Judge()
    kept = compat.forward_inputs(judge, batch)
    assert set(kept) == {"input_ids", "attention_mask"} and kept["input_ids"] is ids
    judge(**kept)  # would raise TypeError on token_type_ids
    with pytest.raises(TypeError, match="token_type_ids"):
        judge(**batch)
    assert compat.forward_inputs(_KwargsJudge(), batch) == batch  # **kwargs: all of it


@pytest.mark.skipif(
    not hasattr(torch.serialization, "safe_globals"), reason="torch.load has no allow-list"
)
def test_numpy_rng_state_loads_inside_the_allow_list(tmp_path):
    # What a Trainer checkpoint's rng_state.pth holds, loaded the way transformers 4.46 does.
    np.random.seed(int(torch.randint(0, 2**31 - 1, ())))
    state = {"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    path = tmp_path / "rng_state.pth"
    torch.save(state, path)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        torch.load(path, weights_only=True)
    with compat.numpy_rng_state_globals():
        loaded = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(loaded["numpy"][1], state["numpy"][1])
    assert torch.equal(loaded["cpu"], state["cpu"])


# -- `safegrad info` ---------------------------------------------------------------------------


def test_info_reports_every_declared_framework():
    rows = collect_info()["supported_ranges"]
    assert {"torch", "transformers", "peft", "accelerate"} <= {r["name"] for r in rows}
    torch_row = next(r for r in rows if r["name"] == "torch")
    assert torch_row["installed"] and torch_row["ok"] is not None


def test_info_warns_when_a_framework_is_outside_its_range(monkeypatch, capsys):
    ranges = {"torch": ">=99.1", "transformers": ">=4.0", "trl": ">=0.1"}
    monkeypatch.setattr(compat, "declared_ranges", lambda *a: ranges)
    info = collect_info()
    by_name = {r["name"]: r for r in info["supported_ranges"]}
    assert by_name["torch"]["ok"] is False and by_name["torch"]["declared"] == ">=99.1"
    assert by_name["transformers"]["ok"] is True
    _print_info(info)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "torch" in warnings[0] and ">=99.1" in warnings[0]


def test_machine_line_names_the_cpu_model(monkeypatch, tmp_path):
    import builtins
    import os

    from safegrad_kernels import environment

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Vendor CPU 9000\nflags\t: x\n")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert environment.cpu_model() == "Some Vendor CPU 9000"
    assert environment.machine_line().startswith("Some Vendor CPU 9000, ")
    assert environment.machine_line().endswith(f", {os.cpu_count()} CPUs")
    cpuinfo.unlink()  # no /proc/cpuinfo: platform's answer, never an error
    assert environment.cpu_model()
