"""The study's statistics: paired bootstrap intervals, operating points, Pareto fronts.

Every interval is a bootstrap over seeds: the seeds of a harmful ratio p are resampled
with replacement, the same resample for every method (the design is paired: a seed fixes
the data draw, the LoRA initialisation and the batch order), ``RESAMPLES`` times from the
fixed ``BOOTSTRAP_SEED``; the interval is the expanded percentile one
(``tail_probability``), as wide as a t interval for few seeds. A difference is
*significant* when its 95% interval excludes 0.

Operating point of a method at p (the "matched task accuracy" comparison): among the
method's weights whose seed-mean fine-tune accuracy (FA) is at least the floor, the one with
the lowest seed-mean harmful score (HS); ties go to the higher FA, then the smaller weight.
Two floors, fixed before any result was seen:

* ``abs``: FA >= 90% (``FA_FLOOR``);
* ``rel``: FA >= 90% of plain fine-tuning's (sft's) seed-mean FA at the same p
  (``FA_FLOOR_REL``): it exists at every p, also where the poison crowds out the task.

A comparison uses ``abs`` when it gives every compared side an operating point on the full
data, ``rel`` otherwise. The weight is chosen on seed means, not per seed (a user picks
one weight, and a per-seed choice would reward noise), and chosen again inside every
bootstrap resample, so the intervals include the uncertainty of the choice. Resamples in
which a side has no operating point are dropped; their share is reported.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
BOOTSTRAP_SEED = 15
LEVEL = 0.95
FA_FLOOR = 0.90
FA_FLOOR_REL = 0.90
RULES = ("abs", "rel")
BASELINE = "sft"  # the method whose FA sets the relative floor
_EPS = 1e-9  # means of equal per-seed values may differ in the last bit

Config = tuple[str, float | None]  # (method, swept weight or None)


# --- bootstrap ---------------------------------------------------------------------


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[resamples, n]`` seed positions drawn with replacement (fixed generator)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5).

    Within 1e-3 of the exact value for df >= 4 (2.776 at df 4, 2.262 at df 9, q = 0.975);
    numpy has no t distribution and the package does not depend on scipy.
    """
    z = statistics.NormalDist().inv_cdf(q)
    g = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def tail_probability(n: int, level: float = LEVEL) -> float:
    """The bootstrap quantile that gives a ``level`` interval over ``n`` seeds.

    The plain percentile interval is too narrow for few seeds: over 1000 simulated paired
    data sets it covered the true mean 87% of the time at n = 7 and 91% at n = 10 (95%
    asked). The expanded percentile interval (Hesterberg, "What teachers should know
    about the bootstrap", 2015) widens it to the t interval's width with the bootstrap's
    shape: tail = Phi(-sqrt(n / (n - 1)) * t_{n-1}); it covered 94% and 95% there.
    """
    t = t_quantile(1 - (1 - level) / 2, n - 1)
    return statistics.NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)


def estimate(point: float, boot: np.ndarray, n: int, level: float = LEVEL) -> dict:
    """``{"mean", "lo", "hi", "feasible"}`` from a point value and bootstrap replicates.

    ``n``: the number of seeds resampled (the interval needs n >= 2). NaN replicates (no
    operating point in that resample) are dropped; ``feasible`` is the share kept.
    ``lo``/``hi`` are NaN when there is no interval.
    """
    boot = np.asarray(boot, dtype=float)
    kept = boot[~np.isnan(boot)]
    if math.isnan(point) or kept.size == 0 or n < 2:
        lo = hi = math.nan
    else:
        tail = tail_probability(n, level)
        lo, hi = (float(x) for x in np.quantile(kept, [tail, 1 - tail]))
    return {
        "mean": float(point),
        "lo": lo,
        "hi": hi,
        "feasible": kept.size / max(boot.size, 1),
    }


def paired_difference(
    a: Sequence[float], b: Sequence[float], idx: np.ndarray | None = None, level: float = LEVEL
) -> dict:
    """Mean of ``a - b`` (paired by position) with its bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = resample_indices(d.size) if idx is None else idx
    return estimate(float(d.mean()), d[idx].mean(axis=1), d.size, level)


def mean_interval(x: Sequence[float], idx: np.ndarray | None = None, level: float = LEVEL) -> dict:
    x = np.asarray(x, dtype=float)
    idx = resample_indices(x.size) if idx is None else idx
    return estimate(float(x.mean()), x[idx].mean(axis=1), x.size, level)


def verdict(diff: dict) -> str:
    """``lower`` / ``higher`` (the interval excludes 0), ``none`` (it does not), ``n/a``
    (nothing to compare: no operating point) or ``no interval`` (fewer than 2 seeds)."""
    lo, hi = diff["lo"], diff["hi"]
    if math.isnan(diff["mean"]):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return "no interval"
    if hi < 0:
        return "lower"
    if lo > 0:
        return "higher"
    return "none"


# --- one harmful ratio's runs ------------------------------------------------------


@dataclass
class Block:
    """The runs at one p over the seeds that every config has: per-seed arrays per config."""

    p: float
    seeds: list[int]
    hs: dict[Config, np.ndarray]
    fa: dict[Config, np.ndarray]
    groups: dict[Config, dict[str, np.ndarray]]

    def configs_of(self, method: str) -> list[Config]:
        """The method's configs, weight ascending."""
        return sorted((c for c in self.hs if c[0] == method), key=lambda c: c[1] or 0.0)

    def subset(self, seeds: Iterable[int]) -> Block:
        pos = [self.seeds.index(s) for s in seeds]
        return Block(
            self.p,
            [self.seeds[i] for i in pos],
            {c: v[pos] for c, v in self.hs.items()},
            {c: v[pos] for c, v in self.fa.items()},
            {c: {g: v[pos] for g, v in gs.items()} for c, gs in self.groups.items()},
        )


def build_blocks(
    entries: Iterable[dict], configs: Sequence[Config], ratios: Sequence[float]
) -> dict[float, Block]:
    """One ``Block`` per p from run entries (``method, weight, harmful_ratio, seed, metrics``).

    A seed enters p's block only when every config has a run there (pairing needs all);
    a p without such a seed has no block.
    """
    table: dict[tuple, dict] = {}
    for e in entries:
        table[(e["method"], e["weight"], e["harmful_ratio"], e["seed"])] = e["metrics"]
    blocks = {}
    for p in ratios:
        per_config = [{k[3] for k in table if k[:3] == (*c, p)} for c in configs]
        seeds = sorted(set.intersection(*per_config)) if per_config else []
        if not seeds:
            continue
        rows = {c: [table[(*c, p, s)] for s in seeds] for c in configs}
        blocks[p] = Block(
            p,
            seeds,
            {c: np.array([m["harmful_score"] for m in ms]) for c, ms in rows.items()},
            {c: np.array([m["finetune_accuracy"] for m in ms]) for c, ms in rows.items()},
            {
                c: {
                    g: np.array([m["harmful_score_by_group"][g] for m in ms])
                    for g in ms[0]["harmful_score_by_group"]
                }
                for c, ms in rows.items()
            },
        )
    return blocks


# --- operating points --------------------------------------------------------------


def select(hs: np.ndarray, fa: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Per row, the column with the lowest HS among those with FA >= floor (-1: none).

    ``hs``, ``fa``: ``[R, k]`` means, columns in ascending weight; ``floor``: ``[R]``.
    Ties: higher FA, then the smaller weight (the earlier column).
    """
    rows = hs.shape[0]
    best = np.full(rows, -1)
    best_hs = np.full(rows, np.inf)
    best_fa = np.full(rows, -np.inf)
    for j in range(hs.shape[1]):
        ok = fa[:, j] >= floor - _EPS
        lower = hs[:, j] < best_hs - _EPS
        tie = np.abs(hs[:, j] - best_hs) <= _EPS
        better = ok & (lower | (tie & (fa[:, j] > best_fa + _EPS)))
        best = np.where(better, j, best)
        best_hs = np.where(better, hs[:, j], best_hs)
        best_fa = np.where(better, fa[:, j], best_fa)
    return best


def floor_for(block: Block, rule: str, idx: np.ndarray) -> np.ndarray | None:
    """The FA floor per resample row (``None``: ``rel`` without the baseline's runs)."""
    if rule == "abs":
        return np.full(idx.shape[0], FA_FLOOR)
    if rule == "rel":
        base = (BASELINE, None)
        if base not in block.fa:
            return None
        return FA_FLOOR_REL * block.fa[base][idx].mean(axis=1)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def operating(block: Block, method: str, rule: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The operating point per resample row: ``hs``, ``fa`` (NaN where none), ``choice``."""
    configs = block.configs_of(method)
    rows = idx.shape[0]
    floor = floor_for(block, rule, idx)
    if not configs or floor is None:
        nan = np.full(rows, np.nan)
        return {"hs": nan, "fa": nan.copy(), "choice": np.full(rows, -1), "configs": configs}
    hs = np.stack([block.hs[c][idx].mean(axis=1) for c in configs], axis=1)
    fa = np.stack([block.fa[c][idx].mean(axis=1) for c in configs], axis=1)
    choice = select(hs, fa, floor)
    r = np.arange(rows)
    safe = np.maximum(choice, 0)
    return {
        "hs": np.where(choice >= 0, hs[r, safe], np.nan),
        "fa": np.where(choice >= 0, fa[r, safe], np.nan),
        "choice": choice,
        "configs": configs,
    }


def full_index(n: int) -> np.ndarray:
    """The one 'resample' that is the data itself."""
    return np.arange(n)[None, :]


def chosen_config(block: Block, method: str, rule: str) -> Config | None:
    """The method's operating config on the full data (``None``: no weight reaches the floor)."""
    op = operating(block, method, rule, full_index(len(block.seeds)))
    return None if op["choice"][0] < 0 else op["configs"][op["choice"][0]]


def rule_for(sides: Iterable[tuple[Block, str]]) -> str | None:
    """``abs`` if it gives every (block, method) an operating point, else ``rel`` if that
    does, else ``None``."""
    sides = list(sides)
    for rule in RULES:
        if all(chosen_config(b, m, rule) is not None for b, m in sides):
            return rule
    return None


def operating_estimate(block: Block, method: str, rule: str, idx: np.ndarray) -> dict:
    """HS and FA at the method's operating point, with intervals (choice redone per resample)."""
    point = operating(block, method, rule, full_index(len(block.seeds)))
    boot = operating(block, method, rule, idx)
    config = chosen_config(block, method, rule)
    return {
        "rule": rule,
        "weight": None if config is None else config[1],
        "hs": estimate(float(point["hs"][0]), boot["hs"], len(block.seeds)),
        "fa": estimate(float(point["fa"][0]), boot["fa"], len(block.seeds)),
    }


def matched_fa_difference(block: Block, a: str, b: str, idx: np.ndarray) -> dict:
    """HS(a) - HS(b) at each method's operating point, under ``rule_for`` both."""
    rule = rule_for([(block, a), (block, b)])
    if rule is None:
        return {"rule": None, "diff": estimate(math.nan, np.array([]), 0), "verdict": "n/a"}
    full = full_index(len(block.seeds))
    pa, pb = operating(block, a, rule, full), operating(block, b, rule, full)
    ba, bb = operating(block, a, rule, idx), operating(block, b, rule, idx)
    diff = estimate(float(pa["hs"][0] - pb["hs"][0]), ba["hs"] - bb["hs"], len(block.seeds))
    return {
        "rule": rule,
        "weights": [chosen_config(block, a, rule)[1], chosen_config(block, b, rule)[1]],
        "fa": [float(pa["fa"][0]), float(pb["fa"][0])],
        "diff": diff,
        "verdict": verdict(diff),
    }


def trend(
    low: Block, high: Block, methods: Sequence[str], idx_for: Callable[[int], np.ndarray]
) -> dict | None:
    """HS at ``high.p`` minus HS at ``low.p`` at the operating points, per method, and the
    first method's rise minus the second's (paired over the seeds both blocks have)."""
    seeds = sorted(set(low.seeds) & set(high.seeds))
    if not seeds:
        return None
    low, high = low.subset(seeds), high.subset(seeds)
    idx, full = idx_for(len(seeds)), full_index(len(seeds))
    out: dict = {"p": [low.p, high.p], "seeds": len(seeds), "methods": {}}
    for m in methods:
        rule = rule_for([(low, m), (high, m)])
        if rule is None:
            out["methods"][m] = {"rule": None, "diff": estimate(math.nan, np.array([]), 0)}
            continue
        point = operating(high, m, rule, full)["hs"] - operating(low, m, rule, full)["hs"]
        boot = operating(high, m, rule, idx)["hs"] - operating(low, m, rule, idx)["hs"]
        diff = estimate(float(point[0]), boot, len(seeds))
        out["methods"][m] = {"rule": rule, "diff": diff, "verdict": verdict(diff)}
    if len(methods) >= 2:
        a, b = methods[:2]
        sides = [(blk, m) for blk in (low, high) for m in (a, b)]
        rule = rule_for(sides)
        if rule is not None:

            def rise(m: str, ix: np.ndarray) -> np.ndarray:
                return operating(high, m, rule, ix)["hs"] - operating(low, m, rule, ix)["hs"]

            point = (rise(a, full) - rise(b, full))[0]
            diff = estimate(float(point), rise(a, idx) - rise(b, idx), len(seeds))
            out["difference"] = {"rule": rule, "diff": diff, "verdict": verdict(diff)}
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (FA, HS) points no other point dominates (FA >= and HS <=, one strictly)."""
    out = []
    for i, (fa, hs) in enumerate(points):
        dominated = any(
            f >= fa and h <= hs and (f > fa or h < hs) for j, (f, h) in enumerate(points) if j != i
        )
        out.append(not dominated)
    return out


# --- the whole analysis ------------------------------------------------------------


def analyse(
    entries: Iterable[dict],
    configs: Sequence[Config],
    ratios: Sequence[float],
    pairs: Sequence[tuple[str, str]],
) -> dict:
    """Every number of the report, JSON-ready (see the module docstring for the rules).

    ``pairs``: (a, b) method pairs compared as HS(a) - HS(b); the first is the study's
    question (matched-weight comparison, group differences and the trend test).
    """
    from ..report import label

    blocks = build_blocks(entries, configs, ratios)
    methods = list(dict.fromkeys(c[0] for c in configs))
    out: dict = {
        "settings": {
            "resamples": RESAMPLES,
            "bootstrap_seed": BOOTSTRAP_SEED,
            "level": LEVEL,
            "fa_floor": FA_FLOOR,
            "fa_floor_rel": FA_FLOOR_REL,
            "baseline": BASELINE,
            "pairs": [list(p) for p in pairs],
        },
        "seeds": {f"{p:g}": blocks[p].seeds for p in blocks},
        "points": [],
        "operating": [],
        "matched_fa": [],
        "matched_weight": [],
        "groups": [],
        "group_diffs": [],
        "trend": None,
    }
    primary = pairs[0] if pairs else None
    for p, block in sorted(blocks.items()):
        idx = resample_indices(len(block.seeds))
        for m in methods:
            cs = block.configs_of(m)
            front = pareto_front([(block.fa[c].mean(), block.hs[c].mean()) for c in cs])
            for c, on_front in zip(cs, front):
                out["points"].append(
                    {"p": p, "method": m, "weight": c[1], "label": label(*c)}
                    | {"hs": mean_interval(block.hs[c], idx), "fa": mean_interval(block.fa[c], idx)}
                    | {"front": on_front}
                )
            for rule in RULES:
                if floor_for(block, rule, idx) is not None:
                    out["operating"].append(
                        {"p": p, "method": m, **operating_estimate(block, m, rule, idx)}
                    )
            rule = rule_for([(block, m)])
            if rule is not None:
                config = chosen_config(block, m, rule)
                out["groups"].append(
                    {"p": p, "method": m, "rule": rule, "weight": config[1]}
                    | {
                        "groups": {
                            g: mean_interval(v, idx) for g, v in block.groups[config].items()
                        }
                    }
                )
        for a, b in pairs:
            out["matched_fa"].append(
                {"p": p, "a": a, "b": b, **matched_fa_difference(block, a, b, idx)}
            )
        if primary is None:
            continue
        a, b = primary
        wa = {c[1] for c in block.configs_of(a)}
        for c in block.configs_of(b):
            if c[1] is not None and c[1] in wa:
                diff = paired_difference(block.hs[(a, c[1])], block.hs[c], idx)
                out["matched_weight"].append(
                    {"p": p, "a": a, "b": b, "weight": c[1], "diff": diff, "verdict": verdict(diff)}
                )
        rule = rule_for([(block, a), (block, b)])
        if rule is not None:
            ca, cb = chosen_config(block, a, rule), chosen_config(block, b, rule)
            diffs = {}
            for g in block.groups[ca]:
                d = paired_difference(block.groups[ca][g], block.groups[cb][g], idx)
                diffs[g] = {"diff": d, "verdict": verdict(d)}
            out["group_diffs"].append(
                {"p": p, "a": a, "b": b, "rule": rule, "weights": [ca[1], cb[1]], "groups": diffs}
            )
    positive = sorted(p for p in blocks if p > 0)
    if primary is not None and len(positive) >= 2:
        order = [*primary, *(m for m in methods if m not in primary)]
        out["trend"] = trend(blocks[positive[0]], blocks[positive[-1]], order, resample_indices)
    return out


# --- HS versus SafeGrad's step-cost options ---------------------------------------


def variant_analysis(
    entries: Iterable[dict],
    variant_of: Callable[[dict], Hashable],
    variants: Sequence[Hashable],
    base: Hashable,
    ratios: Sequence[float],
    name: str,
) -> list[dict]:
    """One method at one weight in several variants (``variant_of(entry)``), per p: HS and
    FA with intervals, and each variant's paired differences to ``base``.

    Per p the seeds are those with a run of every variant (the pairing needs all). Returns
    ``[{"p", "seeds", "rows": [{name: variant, "hs", "fa"[, "d_hs", "d_fa", "verdict",
    "fa_verdict"]}]}]``, the base first.
    """
    table: dict[tuple[float, Hashable, int], dict] = {}
    for e in entries:
        table[(e["harmful_ratio"], variant_of(e), e["seed"])] = e["metrics"]
    keys = [base, *(v for v in variants if v != base)]
    out = []
    for p in ratios:
        per_key = [{s for (q, v, s) in table if (q, v) == (p, key)} for key in keys]
        seeds = sorted(set.intersection(*per_key))
        if not seeds:
            continue
        idx = resample_indices(len(seeds))
        hs, fa = (
            {key: np.array([table[(p, key, s)][field] for s in seeds]) for key in keys}
            for field in ("harmful_score", "finetune_accuracy")
        )
        rows = []
        for key in keys:
            row = {name: key, "hs": mean_interval(hs[key], idx), "fa": mean_interval(fa[key], idx)}
            if key != base:
                row["d_hs"] = paired_difference(hs[key], hs[base], idx)
                row["d_fa"] = paired_difference(fa[key], fa[base], idx)
                row["verdict"] = verdict(row["d_hs"])
                row["fa_verdict"] = verdict(row["d_fa"])
            rows.append(row)
        out.append({"p": p, "seeds": seeds, "rows": rows})
    return out


def refresh_analysis(
    entries: Iterable[dict], refresh: Sequence[int], ratios: Sequence[float]
) -> dict:
    """``variant_analysis`` over SafeGrad's refresh period k (an entry's ``alignment_every``
    None means k = 1), against k = 1.

    ``degrades_from``: the smallest k whose HS is significantly higher than k = 1's at some
    p (None if none); ``task_degrades_from``: the same for FA significantly lower (a lower
    HS there may only mean the fine-tuning broke down, not a safer model).
    """
    ks = sorted(set(refresh) | {1})
    per_p = variant_analysis(entries, lambda e: e.get("alignment_every") or 1, ks, 1, ratios, "k")
    rows = [row for r in per_p for row in r["rows"] if row["k"] != 1]
    higher = [row["k"] for row in rows if row["verdict"] == "higher"]
    lower = [row["k"] for row in rows if row["fa_verdict"] == "lower"]
    return {
        "ks": ks,
        "ratios": per_p,
        "degrades_from": min(higher, default=None),
        "task_degrades_from": min(lower, default=None),
    }


def options_analysis(
    entries: Iterable[dict],
    option_of: Callable[[dict], str],
    options: Sequence[str],
    ratios: Sequence[float],
) -> dict:
    """``variant_analysis`` over SafeGrad's other step-cost options, each against the
    default recipe (``"default"``), with the ratios where each raised HS or lowered FA
    significantly; ``tail_mass``: a top-k store's reference mass outside the top k over
    its runs (largest, mean of the runs' means; from each run's log), None for the others."""
    entries = list(entries)
    per_p = variant_analysis(entries, option_of, options, "default", ratios, "option")
    out: dict = {
        "options": list(options),
        "ratios": per_p,
        "hs_higher_at": {},
        "fa_lower_at": {},
        "tail_mass": {},
    }
    for option in options:
        tails = [
            e["log"]["reference_tail_mass"]
            for e in entries
            if option_of(e) == option and e.get("log", {}).get("reference_tail_mass")
        ]
        out["tail_mass"][option] = (
            [max(t[0] for t in tails), statistics.fmean(t[1] for t in tails)] if tails else None
        )
        rows = [(r["p"], row) for r in per_p for row in r["rows"] if row["option"] == option]
        out["hs_higher_at"][option] = [p for p, row in rows if row["verdict"] == "higher"]
        out["fa_lower_at"][option] = [p for p, row in rows if row["fa_verdict"] == "lower"]
    return out
