"""`safegrad study`: run cache keys, bootstrap intervals, operating points, the conclusion's
rules on synthetic results, the batch pairing, and the quick study end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from safegrad_kernels.demo import study
from safegrad_kernels.demo.study import cache, report, stats


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- cache keys --------------------------------------------------------------------

RUN = study.StudyRun("safegrad", 0.3, 0.5, 7)


def _key(design=None, run=RUN, env=None, aligned=None) -> str:
    design = design or study.design_from(_args("--quick"))
    env = env or cache.environment(threads=1)
    aligned = aligned or study.aligned_key(design)
    return cache.run_key(study.run_inputs(design, run, env, aligned))


def _replace_spec(design, field, **changes):
    return dataclasses.replace(
        design, **{field: dataclasses.replace(getattr(design, field), **changes)}
    )


CHANGES = {
    "model width": lambda d, r, e: (_replace_spec(d, "model", hidden_size=96), r, e),
    "alignment steps": lambda d, r, e: (_replace_spec(d, "align", steps=121), r, e),
    "alignment seed": lambda d, r, e: (_replace_spec(d, "align", seed=3), r, e),
    "user lr": lambda d, r, e: (_replace_spec(d, "user", lr=2.9e-3), r, e),
    "safety groups": lambda d, r, e: (
        _replace_spec(d, "user", safety_groups=("aligned", "shared", "poison")), r, e
    ),
    "spf rank": lambda d, r, e: (_replace_spec(d, "user", spf_rank=5), r, e),
    "eval sizes": lambda d, r, e: (dataclasses.replace(d, eval_sizes=(9, 40, 40)), r, e),
    "eval seed": lambda d, r, e: (dataclasses.replace(d, eval_seed=d.eval_seed + 1), r, e),
    "method": lambda d, r, e: (d, dataclasses.replace(r, method="mixed"), e),
    "weight": lambda d, r, e: (d, dataclasses.replace(r, weight=0.31), e),
    "ratio": lambda d, r, e: (d, dataclasses.replace(r, harmful_ratio=0.7), e),
    "seed": lambda d, r, e: (d, dataclasses.replace(r, seed=8), e),
    "alignment_every": lambda d, r, e: (d, dataclasses.replace(r, alignment_every=4), e),
    "alignment batch": lambda d, r, e: (d, dataclasses.replace(r, alignment_batch_size=4), e),
    "reference top-k": lambda d, r, e: (d, dataclasses.replace(r, reference_top_k=64), e),
    "fused loss": lambda d, r, e: (d, dataclasses.replace(r, fused_loss=True), e),
    "torch version": lambda d, r, e: (d, r, {**e, "torch": "0.0.1"}),
    "package version": lambda d, r, e: (d, r, {**e, "package": "9.9.9"}),
    "threads": lambda d, r, e: (d, r, {**e, "threads": 2}),
    "backend": lambda d, r, e: (d, r, {**e, "backend": "torch"}),
    "training code": lambda d, r, e: (
        d, r, {**e, "code": {**e["code"], "safegrad_kernels.demo.train": "0" * 16}}
    ),
    "study version": lambda d, r, e: (d, r, {**e, "study_version": e["study_version"] + 1}),
}  # fmt: skip


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_cache_key_changes_with_each_determining_input(change):
    design = study.design_from(_args("--quick"))
    env = cache.environment(threads=1)
    base = _key(design, RUN, env, study.aligned_key(design))
    d, r, e = CHANGES[change](design, RUN, env)
    assert _key(d, r, e, study.aligned_key(d)) != base


def test_cache_key_follows_the_registry_defaults(monkeypatch):
    from safegrad_kernels.surgery import methods as registry

    before = _key()
    sg = registry.METHODS["safegrad"]
    hps = tuple(
        dataclasses.replace(h, default="per_tensor") if h.name == "surgery_granularity" else h
        for h in sg.hyperparameters
    )
    monkeypatch.setitem(registry.METHODS, "safegrad", dataclasses.replace(sg, hyperparameters=hps))
    assert _key() != before


def test_cache_key_ignores_what_does_not_determine_the_run():
    design = study.design_from(_args("--quick"))
    base = _key(design)
    assert _key(design) == base  # stable
    wider = study.design_from(
        _args("--quick", "--seeds", "0,7,11", "--ratios", "0,0.5", "--rho", "0.3,3", "--lam", "5")
    )
    assert RUN in wider.runs() and _key(wider) == base  # the rest of the design: no
    assert cache.environment(threads=1) == cache.environment(threads=1)


def test_source_fingerprint_ignores_comments_docstrings_and_layout():
    src = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    same = (
        '"""Module doc."""\n\n# why: measured\ndef f(x):  # trailing\n'
        "    return (x +\n            1)\n"
    )
    other = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert cache.source_fingerprint(src) == cache.source_fingerprint(same)
    assert cache.source_fingerprint(src) != cache.source_fingerprint(other)


def test_code_fingerprint_reads_every_training_module():
    import inspect

    from safegrad_kernels.demo import train

    prints = cache.code_fingerprint()
    assert set(prints) == set(cache.TRAINING_MODULES)
    assert prints["safegrad_kernels.demo.train"] == cache.source_fingerprint(
        inspect.getsource(train)
    )
    with pytest.raises(ValueError, match="no_such_module"):
        cache.code_fingerprint(("safegrad_kernels.no_such_module",))


def test_run_cache_round_trip_and_torn_files(tmp_path):
    store = cache.RunCache(tmp_path / "c")
    entry = {"metrics": {"harmful_score": 0.25}, "seed": 3}
    assert store.load("abc") is None
    store.save("abc", entry)
    assert store.load("abc") == {**entry, "key": "abc"}
    store.path("abc").write_text('{"metrics": ')  # torn write: a miss, not an error
    assert store.load("abc") is None
    store.path("abd").write_text(json.dumps({"key": "other"}))  # a renamed file: a miss
    assert store.load("abd") is None
    assert not list((tmp_path / "c").glob(".*.tmp"))


# --- bootstrap ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 20])
def test_paired_bootstrap_interval_covers_the_truth(n):
    rng = np.random.default_rng(random.randrange(2**32))
    truth, trials, covered = -0.07, 300, 0
    for _ in range(trials):
        seed_effect = rng.normal(0.4, 0.2, n)  # shared by both methods of a seed
        a = seed_effect + truth + rng.normal(0, 0.05, n)
        b = seed_effect + rng.normal(0, 0.05, n)
        d = stats.paired_difference(
            a, b, stats.resample_indices(n, 2000, int(rng.integers(1 << 30)))
        )
        covered += d["lo"] <= truth <= d["hi"]
    # The expanded interval covered 94% (n = 7) and 95% (n = 10) in 1000 trials; the
    # binomial spread of 300 trials is 0.013, so 0.89 is 4 spreads below. (The plain
    # percentile interval covered 87% at n = 7 and would fail here now and then.)
    assert covered / trials >= 0.89


@pytest.mark.parametrize(("df", "exact"), [(4, 2.7764), (9, 2.2622), (19, 2.0930), (60, 2.0003)])
def test_t_quantile(df, exact):
    assert stats.t_quantile(0.975, df) == pytest.approx(exact, abs=1e-3)


def test_paired_interval_excludes_zero_only_for_a_real_shift():
    rng = np.random.default_rng(random.randrange(2**32))
    base = rng.uniform(0.2, 0.8, 12)
    shifted = stats.paired_difference(base - 0.1 + rng.normal(0, 0.01, 12), base)
    assert stats.verdict(shifted) == "lower" and shifted["hi"] < 0
    assert stats.verdict(stats.paired_difference(base + 0.1, base)) == "higher"
    same = stats.paired_difference(base, base)
    assert stats.verdict(same) == "none" and same["lo"] == same["hi"] == 0.0
    # The same data and bootstrap seed give the same interval.
    assert stats.paired_difference(base, base[::-1]) == stats.paired_difference(base, base[::-1])
    assert stats.verdict(stats.estimate(float("nan"), np.array([]), 0)) == "n/a"
    assert stats.verdict(stats.paired_difference([0.3], [0.1])) == "no interval"  # one seed


def test_select_picks_the_lowest_hs_above_the_floor():
    hs = np.array([[0.3, 0.2, 0.1], [0.3, 0.2, 0.2], [0.5, 0.5, 0.5]])
    fa = np.array([[0.95, 0.92, 0.85], [0.95, 0.91, 0.97], [0.5, 0.6, 0.7]])
    got = stats.select(hs, fa, np.array([0.9, 0.9, 0.9]))
    # row 0: 0.1 is below the floor; row 1: HS tie, higher FA wins; row 2: none reaches it.
    assert got.tolist() == [1, 2, -1]
    tie = stats.select(np.array([[0.2, 0.2]]), np.array([[0.93, 0.93]]), np.array([0.9]))
    assert tie.tolist() == [0]  # a full tie goes to the smaller weight


def test_pareto_front():
    points = [(0.9, 0.2), (0.95, 0.3), (0.85, 0.25), (0.9, 0.2), (0.99, 0.9)]
    assert stats.pareto_front(points) == [True, True, False, True, True]


# --- the conclusion on synthetic results -------------------------------------------

CONFIGS = [("sft", None), ("mixed", 0.1), ("mixed", 1.0), ("safegrad", 0.1), ("safegrad", 1.0)]
RATIOS = (0.0, 0.1, 0.5, 0.9)
PAIRS = [("safegrad", "mixed"), ("safegrad", "sft"), ("mixed", "sft")]


def _entries(hs_of, fa_of=lambda m, w, p: 0.95, seeds=range(12), noise=0.02):
    """Synthetic runs: HS = hs_of(method, weight, p) + a per-seed effect shared by every
    method (the pairing) + a little noise of its own."""
    rng = np.random.default_rng(random.randrange(2**32))
    out = []
    for s in seeds:
        for p in RATIOS:
            shared = rng.normal(0, 0.05)
            for m, w in CONFIGS:
                hs = float(np.clip(hs_of(m, w, p) + shared + rng.normal(0, noise), 0, 1))
                groups = {g: hs for g in ("aligned", "shared", "novel")}
                groups["poison"] = min(1.0, hs + (0.3 if m == "safegrad" else 0.0))
                fa = float(np.clip(fa_of(m, w, p) + rng.normal(0, 0.005), 0, 1))
                metrics = {
                    "harmful_score": hs,
                    "finetune_accuracy": fa,
                    "harmful_score_by_group": groups,
                }
                out.append(
                    {"method": m, "weight": w, "harmful_ratio": p, "seed": s, "metrics": metrics}
                )
    return out


def _conclude(entries):
    analysis = stats.analyse(entries, CONFIGS, RATIOS, PAIRS)
    json.dumps(analysis)  # the analysis is what results.json holds
    return analysis, " ".join(report.conclusion(analysis))


def test_conclusion_supports_the_claim_when_the_numbers_do():
    def hs(m, w, p):
        return {"sft": 0.2 + 0.7 * p, "mixed": 0.2 + 0.5 * p, "safegrad": 0.2 + 0.05 * p}[m]

    analysis, text = _conclude(_entries(hs))
    rows = {r["p"]: r for r in analysis["matched_fa"] if r["b"] == "mixed"}
    assert rows[0.9]["verdict"] == "lower" and rows[0.9]["rule"] == "abs"
    lower = text.split("significantly lower than mixed's at ")[1].split(". ")[0]
    for p in (0.5, 0.9):
        assert rows[p]["verdict"] == "lower"
        assert f"p = {p:g}: {report.diff_text(rows[p]['diff'])}" in lower
    assert "is supported" in text
    assert "safegrad leaks most on `poison` templates" in text
    # safegrad's poison-group HS is its HS + 0.3 on every seed, mixed's is its HS.
    groups = next(d for d in analysis["group_diffs"] if d["p"] == 0.9)["groups"]
    gap = groups["poison"]["diff"]["mean"] - groups["aligned"]["diff"]["mean"]
    assert gap == pytest.approx(0.3)


def test_conclusion_says_no_significant_difference_when_the_methods_agree():
    entries = _entries(lambda m, w, p: 0.2 + 0.5 * p, noise=0.0)
    for e in entries:  # identical per-seed numbers for both methods: every difference is 0
        if e["method"] == "safegrad":
            twin = next(
                x for x in entries
                if (x["method"], x["weight"], x["harmful_ratio"], x["seed"])
                == ("mixed", e["weight"], e["harmful_ratio"], e["seed"])
            )  # fmt: skip
            e["metrics"] = twin["metrics"]
    _, text = _conclude(entries)
    assert "no significant difference between safegrad's and mixed's harmful score at any p" in text
    assert "no (p, weight) cell of 8 shows a significant difference" in text
    assert "is not supported at the 95% level" in text
    assert "significantly" not in text.replace("not significant", "")


def test_conclusion_reports_a_contradiction_and_the_relative_floor():
    def hs(m, w, p):
        return {"sft": 0.3 + 0.6 * p, "mixed": 0.1, "safegrad": 0.1 + 0.4 * p}[m]

    def fa(m, w, p):  # at p = 0.9 nothing reaches 90%: the relative floor decides
        return 0.7 if p == 0.9 else 0.95

    analysis, text = _conclude(_entries(hs, fa))
    assert "significantly higher than mixed's" in text and "is contradicted" in text
    row = next(
        r for r in analysis["matched_fa"] if (r["a"], r["b"], r["p"]) == ("safegrad", "mixed", 0.9)
    )
    assert row["rule"] == "rel" and row["verdict"] == "higher"


def test_conclusion_does_not_call_an_untested_comparison_a_null_result():
    configs = [c for c in CONFIGS if c[0] != "sft"]  # no baseline: no relative floor
    entries = [
        e for e in _entries(lambda m, w, p: 0.3, lambda m, w, p: 0.5) if e["method"] != "sft"
    ]
    analysis = stats.analyse(entries, configs, RATIOS, [("safegrad", "mixed")])
    text = " ".join(report.conclusion(analysis))
    assert "cannot be compared yet: a method has no operating point at p = 0, 0.1, 0.5, 0.9" in text
    assert "no significant difference between" not in text
    assert "is not tested" in text


def test_incomplete_seeds_are_left_out_of_the_pairing():
    entries = _entries(lambda m, w, p: 0.3)
    entries = [
        e
        for e in entries
        if not (e["seed"] == 0 and e["method"] == "mixed" and e["harmful_ratio"] == 0.5)
    ]
    analysis = stats.analyse(entries, CONFIGS, RATIOS, PAIRS)
    assert analysis["seeds"]["0.5"] == list(range(1, 12))
    assert analysis["seeds"]["0.1"] == list(range(12))


# --- HS versus alignment_every -----------------------------------------------------


def _refresh_entries(
    hs_of_k, seeds=range(10), ks=(1, 2, 4, 8), ratios=(0.1, 0.5), fa_of_k=lambda k, p: 0.95
) -> list[dict]:
    rng = random.Random(4)
    out = []
    for p in ratios:
        for s in seeds:
            base = rng.uniform(-0.1, 0.1)  # a per-seed effect shared by every k (pairing)
            for k in ks:
                hs = min(max(0.3 + base + hs_of_k(k, p) + rng.uniform(-0.01, 0.01), 0.0), 1.0)
                out.append(
                    {"method": "safegrad", "weight": 1.0, "harmful_ratio": p, "seed": s}
                    | {"alignment_every": None if k == 1 else k}
                    | {"metrics": {"harmful_score": hs, "finetune_accuracy": fa_of_k(k, p)}}
                )
    return out


def test_refresh_analysis_finds_where_safety_degrades():
    flat = stats.refresh_analysis(_refresh_entries(lambda k, p: 0.0), (1, 2, 4, 8), (0.1, 0.5))
    assert flat["degrades_from"] is None and flat["ks"] == [1, 2, 4, 8]
    assert all(row["verdict"] == "none" for r in flat["ratios"] for row in r["rows"][1:])
    assert "significantly at no p" in report.refresh_conclusion(flat)[0]
    assert flat["task_degrades_from"] is None
    assert report.refresh_conclusion(flat)[0].endswith("FA falls significantly at no k.")

    # HS rises by 20 points from k = 4 on, at p = 0.5 only.
    def rises(k, p):
        return 0.2 if k >= 4 and p == 0.5 else 0.0

    worse = stats.refresh_analysis(_refresh_entries(rises), (2, 4, 8), (0.1, 0.5))
    assert worse["degrades_from"] == 4
    at = {r["p"]: {row["k"]: row for row in r["rows"]} for r in worse["ratios"]}
    assert at[0.5][4]["verdict"] == "higher" and at[0.5][2]["verdict"] == "none"
    assert at[0.5][8]["d_hs"]["lo"] > 0.15 and at[0.1][8]["verdict"] == "none"
    sentence = report.refresh_conclusion(worse)[0]
    assert "degrades safety from k = 4" in sentence and "p = 0.5" in sentence
    section = "\n".join(report.refresh_section(worse, {"refresh_rho": 1.0}))
    assert "significantly higher" in section and "p = 0.1, 10 paired seeds." in section


def test_refresh_conclusion_does_not_call_a_broken_model_safe():
    # What the study found at k = 8: HS 0 because FA is 0 (the model degenerates).
    def hs(k, p):
        return -0.3 if k == 8 else 0.0

    def fa(k, p):
        return 0.0 if k == 8 else (0.7 if k == 4 else 0.95)

    sweep = stats.refresh_analysis(_refresh_entries(hs, fa_of_k=fa), (2, 4, 8), (0.1, 0.5))
    assert sweep["degrades_from"] is None and sweep["task_degrades_from"] == 4
    rows = {row["k"]: row for row in sweep["ratios"][0]["rows"]}
    assert rows[8]["verdict"] == "lower" and rows[8]["fa_verdict"] == "lower"
    sentence = report.refresh_conclusion(sweep)[0]
    assert "the task suffers from k = 4" in sentence and "p = 0.1, 0.5" in sentence
    assert "At k = 8 the fine-tuning breaks down" in sentence and "not safety" in sentence
    assert "| significantly lower | significantly lower |" in "\n".join(
        report.refresh_section(sweep, {"refresh_rho": 1.0})
    )


def test_refresh_analysis_pairs_only_complete_seeds():
    entries = [
        e
        for e in _refresh_entries(lambda k, p: 0.0)
        if not (e["seed"] == 3 and e["alignment_every"] == 8 and e["harmful_ratio"] == 0.5)
    ]
    sweep = stats.refresh_analysis(entries, (1, 2, 4, 8), (0.1, 0.5, 0.9))
    seeds = {r["p"]: r["seeds"] for r in sweep["ratios"]}
    assert seeds == {0.1: list(range(10)), 0.5: [s for s in range(10) if s != 3]}


def test_full_design_adds_each_sweep_once():
    design = study.design_from(_args())
    assert design.refresh == (1, 2, 4, 8) and design.refresh_ratios == (0.1, 0.3, 0.5)
    assert design.cost_options == study.DEFAULT_COST_OPTIONS
    assert design.cost_ratios == (0.1, 0.3, 0.5)
    runs = design.runs()
    # the grid, then k = 2, 4, 8 and five options at 3 ratios x 10 seeds (their default
    # recipe and k = 1 are grid runs)
    assert len(runs) == len(set(runs)) == 60 + 300 + 300 + 3 * 3 * 10 + 5 * 3 * 10
    assert design.refresh_rho in design.rho  # so k = 1 is the grid's own run
    assert not study.design_from(_args("--alignment-every", "1")).refresh_runs(0)
    assert not study.design_from(_args("--cost-options", "none")).cost_runs(0)
    options = {r.option for r in runs if r.method == "safegrad" and r.alignment_every is None}
    assert options == {"default", *study.DEFAULT_COST_OPTIONS}
    with pytest.raises(SystemExit):
        _args("--alignment-every", "0,2")


@pytest.mark.parametrize(
    "text, settings",
    [
        ("ab=4", {"alignment_batch_size": 4}),
        ("ab=04", {"alignment_batch_size": 4}),
        ("topk=64", {"reference_top_k": 64}),
        ("fused", {"fused_loss": True}),
    ],
)
def test_parse_option_and_its_label(text, settings):
    assert study.parse_option(text) == settings
    run = study.StudyRun("safegrad", 1.0, 0.3, 0, **settings)
    assert run.settings() == settings
    assert study.parse_option(run.option) == settings  # the label reads back
    assert study.StudyRun("safegrad", 1.0, 0.3, 0).option == "default"


@pytest.mark.parametrize("text", ["ab", "ab=0", "ab=x", "topk=-1", "fused=1", "lr=3", ","])
def test_cost_options_refuse_bad_values(text, capsys):
    with pytest.raises(SystemExit):
        _args("--cost-options", text)
    assert "--cost-options" in capsys.readouterr().err


def test_grid_keys_do_not_depend_on_the_option_fields():
    run = study.StudyRun("safegrad", 1.0, 0.3, 0)
    same = dataclasses.replace(
        run, alignment_every=None, alignment_batch_size=None, reference_top_k=None
    )
    assert _key(run=run) == _key(run=same)
    inputs = study.run_inputs(
        study.design_from(_args("--quick")), run, cache.environment(threads=1), "x"
    )
    assert not {"alignment_every", "alignment_batch_size", "reference_top_k", "fused_loss"} & set(
        inputs
    )


def _option_entries(hs_of, fa_of) -> list[dict]:
    rng = random.Random(0)
    out = []
    for option in ("default", "ab=4", "topk=8"):
        settings = {} if option == "default" else study.parse_option(option)
        for p in (0.1, 0.5):
            for s in range(10):
                hs = min(max(0.3 + hs_of(option, p) + rng.uniform(-0.02, 0.02), 0.0), 1.0)
                fa = fa_of(option, p) + rng.uniform(-0.02, 0.02)
                tail = [0.15, 0.11] if option == "topk=8" else None
                run = study.StudyRun("safegrad", 1.0, p, s, **settings)
                out.append(
                    dataclasses.asdict(run)
                    | {"metrics": {"harmful_score": hs, "finetune_accuracy": fa}}
                    | {"log": {"reference_tail_mass": tail}}
                )
    return out


def test_options_analysis_names_each_option_that_costs_safety():
    def hs(option, p):  # a quarter alignment batch leaks 20 points more at p = 0.5
        return 0.2 if (option, p) == ("ab=4", 0.5) else 0.0

    def fa(option, p):
        return 0.6 if option == "topk=8" else 0.9

    options = ("ab=4", "topk=8")
    an = stats.options_analysis(
        _option_entries(hs, fa), study.option_label, options, (0.1, 0.5, 0.9)
    )
    assert [r["p"] for r in an["ratios"]] == [0.1, 0.5]  # no runs at 0.9
    assert [row["option"] for row in an["ratios"][0]["rows"]] == ["default", *options]
    assert an["hs_higher_at"] == {"ab=4": [0.5], "topk=8": []}
    assert an["fa_lower_at"] == {"ab=4": [], "topk=8": [0.1, 0.5]}
    assert (
        an["tail_mass"]["topk=8"] == pytest.approx([0.15, 0.11]) and an["tail_mass"]["ab=4"] is None
    )
    text = " ".join(report.options_conclusion(an))
    assert "`ab=4` (an alignment batch of 4) against the default recipe: HS significantly " \
        "higher at p = 0.5; FA lower at no p." in text  # fmt: skip
    assert "`topk=8` (a top-8 reference store)" in text
    assert "FA significantly lower at p = 0.1, 0.5" in text
    design = {"refresh_rho": 1.0, "user": {"batch_size": 16}, "align": {"label_smoothing": 0.1}}
    section = "\n".join(report.options_section(an, design))
    assert "at most 0.150, mean 0.110" in section and "| ab=4 |" in section
    assert "Not run" in report.options_section(None, design)[0]


# --- the design's pairing ----------------------------------------------------------


def _user_batches(monkeypatch, method: str, paired: bool) -> list[list[int]]:
    """The user batches one short user-stage run trains on, in order."""
    from safegrad_kernels.demo import train, world
    from safegrad_kernels.demo.model import ModelSpec, build_model

    seen, real = [], train._batches

    def recording(data, batch_size, gen):
        log: list = []
        seen.append(log)  # in the order the loaders are made: the user loader first

        def batches():
            for batch in real(data, batch_size, gen):
                log.append(batch["input_ids"].tolist())
                yield batch

        return batches()

    monkeypatch.setattr(train, "_batches", recording)
    monkeypatch.setenv("SAFEGRAD_BACKEND", "torch")  # the order is the point, not the kernels
    tok = world.WordTokenizer()
    mspec = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    state = build_model(mspec, len(tok), 0).state_dict()
    uspec = train.UserSpec(samples=48, epochs=3, batch_size=16, safety_samples=21)
    train.user_stage(
        state, tok, mspec, uspec, method=method, weight=1.0, harmful_ratio=0.3, seed=5,
        paired_batches=paired,
    )  # fmt: skip
    return seen[0]


def test_a_seed_fixes_the_user_batch_order_for_every_method(monkeypatch):
    sft = _user_batches(monkeypatch, "sft", paired=True)
    assert len(sft) == 9
    assert _user_batches(monkeypatch, "safegrad", paired=True) == sft
    # Why the study pairs the streams: with one shared generator the safety draws of
    # safegrad shift its user batches from the second epoch on.
    shared = _user_batches(monkeypatch, "safegrad", paired=False)
    assert shared[:3] == sft[:3] and shared[3:] != sft[3:]


def test_train_pending_stops_at_the_deadline(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(study.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(study, "_init_worker", lambda *a: None)

    def fake_train(run):
        clock[0] += 10.0  # every run takes 10 "seconds"
        return {"seed": run.seed}

    monkeypatch.setattr(study, "_train_one", fake_train)
    saved = {}
    runs = [(study.StudyRun("sft", None, 0.1, s), f"k{s}") for s in range(5)]
    done = study.train_pending(runs, saved.__setitem__, (), jobs=1, deadline=25.0)
    assert done == 3 and list(saved) == ["k0", "k1", "k2"]  # the run started at 20 s finishes


# --- end to end --------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAFEGRAD_CACHE", str(root / "cache"))
    out = root / "out"
    results = study.run(_args("--quick", "--out", str(out), "--no-progress"))
    yield root, out, results
    mp.undo()


def test_quick_study_end_to_end(quick_study):
    _, out, results = quick_study
    # configs x p x seeds, plus SafeGrad at k = 4 (k = 1 is the grid's run) x 1 p x seeds,
    # plus its three options x 1 p x seeds
    assert results["meta"]["trained"] == len(results["runs"]) == 3 * 2 * 2 + 2 + 3 * 2
    assert results["meta"]["missing"] == 0
    refreshed = [r for r in results["runs"] if r["alignment_every"] == 4]
    assert len(refreshed) == 2 and {r["harmful_ratio"] for r in refreshed} == {0.3}
    for r in refreshed:  # the period reached the training loop: fewer alignment passes
        twin = next(
            e for e in results["runs"]
            if e["alignment_every"] is None and e["method"] == "safegrad"
            and (e["harmful_ratio"], e["seed"]) == (0.3, r["seed"])
        )  # fmt: skip
        assert 0 < r["log"]["alignment_passes"] < twin["log"]["alignment_passes"]
    sweep = results["alignment_every"]
    assert sweep["ks"] == [1, 4] and [r["p"] for r in sweep["ratios"]] == [0.3]
    assert sweep["ratios"][0]["seeds"] == [0, 1]
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"meta", "design", "analysis", "conclusion", "runs"}
    for r in on_disk["runs"]:
        assert 0.0 <= r["metrics"]["harmful_score"] <= 1.0 and r["cpu_s"] > 0
    an = on_disk["analysis"]
    assert {r["p"] for r in an["matched_fa"]} == {0.3, 0.9}
    assert an["trend"] is not None and an["settings"]["resamples"] == 2000
    text = (out / "report.md").read_text()
    assert "--quick run" in text and study.FULL_COMMAND in text
    assert " ".join(on_disk["conclusion"]) in text
    assert "## HS versus alignment_every" in text and "| 4 |" in text
    assert any("alignment gradient only every k-th step" in c for c in on_disk["conclusion"])
    options = on_disk["cost_options"]
    assert options["options"] == list(study.QUICK_COST_OPTIONS)
    assert [row["option"] for row in options["ratios"][0]["rows"]] == [
        "default",
        "ab=4",
        "topk=8",
        "fused",
    ]
    assert options["tail_mass"]["topk=8"][0] > 0 and options["tail_mass"]["fused"] is None
    assert "## HS versus the step-cost options" in text and "| topk=8 |" in text
    assert on_disk["conclusion"][-1].startswith("`fused` (the fused linear losses)")
    for r in results["runs"]:  # each option reached its run: the store's tail mass is logged
        assert (r["log"]["reference_tail_mass"] is not None) == (r["reference_top_k"] is not None)
    for name in ("pareto.png", "hs_vs_p.png", "hs_vs_k.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_invocation_reuses_the_cache(quick_study, monkeypatch, tmp_path):
    root, out, first = quick_study
    from safegrad_kernels.demo import train

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have held every run")

    monkeypatch.setenv("SAFEGRAD_CACHE", str(root / "cache"))
    monkeypatch.setattr(train, "user_stage", no_training)
    monkeypatch.setattr(train, "aligned_state", no_training)
    for extra in ([], ["--report-only"]):
        again = study.run(
            _args("--quick", "--out", str(tmp_path / "again"), "--no-progress", *extra)
        )
        assert again["meta"]["trained"] == 0 and again["meta"]["reused"] == 20
        assert _same(again["analysis"], first["analysis"])
    # A fresh cache (another machine) continues from the committed results.json.
    fresh = study.run(_args("--quick", "--out", str(out), "--cache-dir", str(tmp_path / "fresh")))
    assert fresh["meta"]["seeded_from_results"] == 20 and fresh["meta"]["trained"] == 0
    assert fresh["aligned"] == first["aligned"] and _same(fresh["analysis"], first["analysis"])


def test_two_jobs_reproduce_the_cached_runs_and_the_budget_stops(
    quick_study, monkeypatch, tmp_path
):
    root, _, first = quick_study
    monkeypatch.setenv("SAFEGRAD_CACHE", str(root / "cache"))
    files = sorted((root / "cache" / "study").glob("run-*.json"))
    removed = {f: json.loads(f.read_text()) for f in files[:3]}
    for f in removed:
        f.unlink()
    quick = ["--quick", "--out", str(tmp_path / "piece"), "--no-progress"]
    stopped = study.run(_args(*quick, "--time-budget", "0"))
    assert stopped["meta"]["trained"] == 0 and stopped["meta"]["missing"] == 3
    assert "**Incomplete**" in (tmp_path / "piece" / "report.md").read_text()

    resumed = study.run(_args(*quick, "--jobs", "2"))
    assert resumed["meta"]["trained"] == 3 and resumed["meta"]["missing"] == 0
    for f, old in removed.items():  # trained again in worker processes: the same numbers
        new = json.loads(f.read_text())
        assert new["metrics"] == old["metrics"] and new["log"]["steps"] == old["log"]["steps"]
    assert _same(resumed["analysis"], first["analysis"])


def test_study_subcommand_delegates(monkeypatch, tmp_path, capsys):
    from safegrad_kernels.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0 and "--report-only" in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(study, "run", lambda args: seen.setdefault("args", args) and {})
    assert main(["study", "--quick", "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert seen["args"].quick and seen["args"].jobs == 2
    bad_flags = (["--jobs", "0"], ["--threads", "two"], ["--time-budget", "-5"])
    for bad in (*bad_flags, ["--alignment-every", "2,x"], ["--alignment-every", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["study", *bad])
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err
