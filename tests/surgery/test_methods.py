"""The method registry: settings and their checks, surgeons, alignment needs, resume counts."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch

from safegrad_kernels.surgery import (
    ALIGNMENT_LOSSES,
    HYPERPARAMETERS,
    METHODS,
    SPF,
    Hyperparameter,
    Method,
    SafeGrad,
    get_method,
)


def params(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def test_registry_names_and_entries():
    assert tuple(METHODS) == ("sft", "safegrad", "spf", "mixed")
    for name, m in METHODS.items():
        assert get_method(name) is m
        assert m.validate() == m.defaults
        assert isinstance(m, Method) and m.name == name and m.description
        assert m.alignment_loss is None or m.alignment_loss in ALIGNMENT_LOSSES
        for h in m.hyperparameters:
            assert HYPERPARAMETERS[h.name] is h
            assert h.validate(h.default) == h.default  # every default passes its own check
    # Each method's alignment needs and default loss (spf: CE, see the trainer docstring).
    assert {n: m.alignment_loss for n, m in METHODS.items()} == {
        "sft": None,
        "safegrad": "kl",
        "spf": "ce",
        "mixed": "kl",
    }
    assert [n for n, m in METHODS.items() if m.needs_alignment] == ["safegrad", "spf", "mixed"]


def test_importing_the_registry_does_not_import_transformers():
    code = "import sys, safegrad_kernels.surgery.methods; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("bad", ["pcgrad", "SafeGrad", "", None, ["sft"]])
def test_unknown_method_lists_the_choices(bad):
    with pytest.raises(ValueError, match="method must be one of") as info:
        get_method(bad)
    for name in METHODS:
        assert repr(name) in str(info.value)


def test_validate_fills_defaults_and_keeps_only_the_methods_own():
    rho = random.uniform(0.01, 3.0)
    lam = random.uniform(0.01, 3.0)
    everything = dict(
        rho=rho, lam=lam, spf_rank=5, spf_refresh_every=7, spf_mode="always", alignment_every=3
    )
    assert get_method("sft").validate(**everything) == {}
    assert get_method("safegrad").validate(**everything) == {
        "rho": rho,
        "surgery_granularity": "global",
        "alignment_every": 3,
    }
    assert get_method("spf").validate(**everything) == {
        "spf_rank": 5,
        "spf_refresh_every": 7,
        "spf_mode": "always",
    }
    assert get_method("mixed").validate(**everything) == {"lam": lam}
    assert get_method("spf").validate() == {
        "spf_rank": 8,
        "spf_refresh_every": None,
        "spf_mode": "conflicting",
    }
    assert isinstance(get_method("safegrad").validate(rho=2)["rho"], float)
    assert get_method("safegrad").validate()["alignment_every"] == 1


BAD_SETTINGS = [
    ("rho", -1.0, ValueError, "rho must be >= 0"),
    ("rho", math.nan, ValueError, "rho must be finite"),
    ("rho", math.inf, ValueError, "rho must be finite"),
    ("rho", torch.tensor(1.0), TypeError, "rho must be a Python float"),
    ("rho", True, TypeError, "rho"),
    ("lam", -0.1, ValueError, "lam must be >= 0"),
    ("lam", "1", TypeError, "lam"),
    ("spf_rank", 0, ValueError, "spf_rank must be >= 1"),
    ("spf_rank", 2.0, TypeError, "spf_rank must be an int"),
    ("spf_refresh_every", 0, ValueError, "spf_refresh_every must be >= 1"),
    ("spf_refresh_every", 1.5, TypeError, "spf_refresh_every must be an int or None"),
    ("spf_mode", "sometimes", ValueError, "spf_mode must be one of"),
    ("surgery_granularity", "layer", ValueError, "surgery_granularity must be one of"),
    ("alignment_every", 0, ValueError, "alignment_every must be >= 1"),
    ("alignment_every", None, TypeError, "alignment_every must be an int"),
    ("alignment_every", 2.0, TypeError, "alignment_every must be an int"),
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("name", "value", "exc", "match"), BAD_SETTINGS)
def test_every_method_rejects_a_bad_setting_naming_it(method, name, value, exc, match):
    # A bad value is an error whichever method is chosen (a command line passes them all).
    with pytest.raises(exc, match=match):
        get_method(method).validate(**{name: value})


def test_unknown_setting_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="spf_rnak"):
        get_method("spf").validate(spf_rnak=4)


def test_rho_rule_is_the_same_in_registry_surgeon_and_op():
    from safegrad_kernels import project_conflicting_

    g, r = [torch.randn(7)], [torch.randn(7)]
    for bad in (-0.5, math.nan):
        with pytest.raises(ValueError, match="rho"):
            get_method("safegrad").validate(rho=bad)
        with pytest.raises(ValueError, match="rho"):
            SafeGrad(params((3, 5)), rho=bad)
        with pytest.raises(ValueError, match="rho"):
            project_conflicting_(g, r, rho=bad)


def test_sft_and_mixed_build_no_surgeon():
    ps = params((3, 5))
    assert get_method("sft").build_surgeon(ps, {}) is None
    assert get_method("mixed").build_surgeon(ps, {"lam": 0.5}) is None


def test_safegrad_surgeon_gets_its_settings():
    ps = params((5, 3), (7,))
    rho = random.uniform(0.1, 2.0)
    s = get_method("safegrad").validate(
        rho=rho, surgery_granularity="per_tensor", alignment_every=4
    )
    surgeon = get_method("safegrad").build_surgeon(ps, s, backend="torch")
    assert isinstance(surgeon, SafeGrad)
    assert (surgeon.rho, surgeon.granularity, surgeon.backend) == (rho, "per_tensor", "torch")
    assert surgeon.alignment_every == 4
    assert [id(p) for p in surgeon.params] == [id(p) for p in ps]


def test_spf_surgeon_gets_its_settings_and_seed():
    ps = params((9, 3), (3, 11))
    s = get_method("spf").validate(spf_rank=2, spf_refresh_every=3, spf_mode="always")
    surgeon = get_method("spf").build_surgeon(ps, s, seed=5)
    assert isinstance(surgeon, SPF)
    assert (surgeon.rank, surgeon.refresh_every, surgeon.mode, surgeon.seed) == (2, 3, "always", 5)
    # Missing settings take their defaults.
    assert get_method("spf").build_surgeon(ps, None).rank == HYPERPARAMETERS["spf_rank"].default


def test_build_surgeon_validates_settings_and_backend():
    ps = params((3, 5))
    with pytest.raises(ValueError, match="spf_rank"):
        get_method("spf").build_surgeon(ps, {"spf_rank": 0})
    with pytest.raises(ValueError, match="backend"):
        get_method("safegrad").build_surgeon(ps, {}, backend="cuda-fast")
    with pytest.raises(ValueError, match="backend"):
        get_method("sft").build_surgeon(ps, {}, backend="cuda-fast")


def test_loss_weight():
    lam = random.uniform(0.01, 3.0)
    assert get_method("mixed").loss_weight(get_method("mixed").validate(lam=lam)) == lam
    for name in ("sft", "safegrad", "spf"):
        m = get_method(name)
        assert m.loss_weight(m.validate()) == 1.0


def random_step(surgeon, ps, *, capture: bool) -> None:
    """One surgeon step on random task gradients, after a random g_a if ``capture``."""
    if capture:
        with surgeon.reference():
            for p in ps:
                p.grad = torch.randn_like(p)
    for p in ps:
        p.grad = torch.randn_like(p)
    surgeon.step()


def test_alignment_due_follows_the_surgeon():
    ps = params((9, 3), (3, 11))
    assert not get_method("sft").alignment_due(None)
    assert get_method("mixed").alignment_due(None)
    safegrad = get_method("safegrad")
    assert safegrad.alignment_due(safegrad.build_surgeon(ps))
    surgeon = safegrad.build_surgeon(ps, {"alignment_every": 3})
    due = []
    for _ in range(7):
        due.append(safegrad.alignment_due(surgeon))
        random_step(surgeon, ps, capture=due[-1])
    assert due == [True, True, False, True, False, False, True]  # 0, 1 and the multiples of 3
    spf = get_method("spf")
    surgeon = spf.build_surgeon(ps, {"spf_refresh_every": 2})
    due = []
    for _ in range(5):
        due.append(spf.alignment_due(surgeon))
        random_step(surgeon, ps, capture=due[-1])
    assert due == [True, False, True, False, True]


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        *[("spf", {"spf_rank": 2, "spf_refresh_every": k}) for k in (None, 1, 3, 4)],
        *[("safegrad", {"alignment_every": k}) for k in (1, 2, 3, 5)],
    ],
)
def test_alignment_steps_before_counts_the_steps_that_draw(name, settings):
    """The closed form used for exact resume equals counting alignment_due step by step."""
    ps = params((9, 3), (3, 11))
    method = get_method(name)
    settings = method.validate(**settings)
    surgeon = method.build_surgeon(ps, settings)
    drawn = 0
    for step in range(11):
        assert method.alignment_steps_before(step, settings) == drawn
        due = method.alignment_due(surgeon)
        drawn += due
        random_step(surgeon, ps, capture=due)
    steps = random.randrange(1, 50)
    assert get_method("sft").alignment_steps_before(steps, {}) == 0
    assert get_method("safegrad").alignment_steps_before(steps, {}) == steps
    assert get_method("mixed").alignment_steps_before(steps, {}) == steps


def test_a_new_method_is_one_entry():
    """An entry's fields are all a loop reads: a method with only a weighted loss works."""
    m = Method(
        "ce-mixed",
        "task + lam * CE on safe answers",
        (HYPERPARAMETERS["lam"],),
        alignment_loss="ce",
        loss_weight_from="lam",
    )
    assert m.needs_alignment and m.alignment_due(None)
    assert m.loss_weight(m.validate(lam=0.25)) == 0.25 and m.build_surgeon(params((2, 3))) is None
    # A new option travels with its method: validate knows it.
    beta = Hyperparameter("beta", float, 0.5, "a new weight", lambda n, v: float(v))
    assert Method("with-beta", "a new option", (beta,)).validate(beta=2, rho=0.5) == {"beta": 2.0}
    with pytest.raises(ValueError, match="alignment_loss"):
        Method("bad", "an unknown loss", alignment_loss="mse")
    with pytest.raises(ValueError, match="loss_weight_from"):
        Method("bad", "weight from an option it lacks", alignment_loss="kl", loss_weight_from="lam")


def test_trainer_methods_are_the_registry_names():
    pytest.importorskip("transformers")
    from safegrad_kernels.integrations import trainer

    assert tuple(METHODS) == trainer.METHODS
