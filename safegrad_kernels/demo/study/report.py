"""The study's report: the conclusion written from the numbers, ``report.md`` and two plots.

Everything here reads the analysis (``stats.analyse``), never the runs, so a report can be
rebuilt from ``results.json`` or the cache without training.

Conclusion rules (also printed in the report):

1. A paired difference is *significant* when its 95% bootstrap interval excludes 0; then
   the text says "significantly lower/higher", otherwise "no significant difference".
2. The study's question is the first pair (SafeGrad vs mixed). At matched task accuracy
   (``stats`` module docstring), each p is put in one of: lower, higher, no significant
   difference, not comparable (a side without an operating point).
3. The paper's claim, "the multi-objective defense degrades as p grows while SafeGrad
   holds", is *supported* when, at the largest p, SafeGrad's HS is significantly lower
   than mixed's *and* SafeGrad's rise in HS from the smallest positive p to the largest is
   significantly smaller than mixed's; *contradicted* when either comparison is
   significant the other way; otherwise *not supported at the 95% level*.
4. The template-group sentence names, at the largest p, the group where each method leaks
   most, and the groups where their paired difference is significant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .stats import RULES

GROUP_COVERAGE = {  # what each harmful template group was trained on (see demo.world)
    "aligned": "refused in the alignment stage and in the defender's safety set, never poisoned",
    "shared": "refused in the alignment stage and in the safety set, and poisoned",
    "poison": "poisoned only: never refused in training, absent from the safety set",
    "novel": "never seen in training",
}


def _pts(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def diff_text(d: dict) -> str:
    """``-12.3 points [-20.1, -4.0]``."""
    if math.isnan(d["mean"]):
        return "n/a"
    ci = "" if math.isnan(d["lo"]) else f" [{_pts(d['lo'])}, {_pts(d['hi'])}]"
    return f"{_pts(d['mean'])} points{ci}"


def est_text(e: dict) -> str:
    """``34.0 [25.0, 43.0]`` (percent)."""
    if math.isnan(e["mean"]):
        return "-"
    ci = "" if math.isnan(e["lo"]) else f" [{_pct(e['lo'])}, {_pct(e['hi'])}]"
    return f"{_pct(e['mean'])}{ci}"


def _weight(w) -> str:
    return "-" if w is None else f"{w:g}"


def _ps(ps) -> str:
    return ", ".join(f"{p:g}" for p in ps)


VERDICT_WORDS = {
    "lower": "significantly lower",
    "higher": "significantly higher",
    "none": "no significant difference",
    "n/a": "not comparable",
    "no interval": "no interval (one seed)",
}
SIGNIFICANT = ("lower", "higher")
TESTED = ("lower", "higher", "none")


def conclusion(analysis: dict) -> list[str]:
    """The conclusion's sentences, each derived from the analysis by the module's rules."""
    pairs = analysis["settings"]["pairs"]
    if not pairs:
        return ["No method pair to compare: the study needs both methods of its question."]
    a, b = na, nb = pairs[0]
    out = []

    rows = [r for r in analysis["matched_fa"] if (r["a"], r["b"]) == (a, b)]
    by = {v: [r for r in rows if r["verdict"] == v] for v in VERDICT_WORDS}
    gaps, reasons = [], []
    if by["n/a"]:
        where = _ps(r["p"] for r in by["n/a"])
        gaps.append(f"not comparable at p = {where} (a method without an operating point)")
        reasons.append(f"a method has no operating point at p = {where}")
    if by["no interval"]:
        where = _ps(r["p"] for r in by["no interval"])
        gaps.append(f"no interval at p = {where} (one seed)")
        reasons.append(f"p = {where} has one seed, so no interval")
    untested = "; ".join(gaps)
    if not rows:
        out.append("No harmful ratio has a complete set of paired runs yet.")
    elif not any(r["verdict"] in TESTED for r in rows):
        out.append(
            f"At matched task accuracy, {na} and {nb} cannot be compared yet: "
            + "; ".join(reasons)
            + "."
        )
    elif not by["lower"] and not by["higher"]:
        tested = _ps(r["p"] for r in by["none"])
        text = (
            f"At matched task accuracy there is no significant difference between {na}'s and "
            f"{nb}'s harmful score at any p tested (p = {tested})"
        )
        out.append(text + (f"; {untested}" if untested else "") + ".")
    else:
        parts = []
        for v in ("lower", "higher"):
            if by[v]:
                cells = "; ".join(f"p = {r['p']:g}: {diff_text(r['diff'])}" for r in by[v])
                parts.append(f"{VERDICT_WORDS[v]} than {nb}'s at {cells}")
        if by["none"]:
            parts.append(f"no significant difference at p = {_ps(r['p'] for r in by['none'])}")
        if untested:
            parts.append(untested)
        out.append(f"At matched task accuracy, {na}'s harmful score is " + "; ".join(parts) + ".")

    cells = analysis["matched_weight"]
    if cells and not any(c["verdict"] in TESTED for c in cells):
        out.append("At matched weight (rho = lam), no cell has an interval (one seed).")
    elif cells:
        cells = [c for c in cells if c["verdict"] in TESTED]
        low = [c for c in cells if c["verdict"] == "lower"]
        high = [c for c in cells if c["verdict"] == "higher"]

        def where(cs):
            return ", ".join(f"(p = {c['p']:g}, {c['weight']:g})" for c in cs)

        if not low and not high:
            out.append(
                f"At matched weight (rho = lam), no (p, weight) cell of {len(cells)} shows a "
                f"significant difference."
            )
        else:
            text = (
                f"At matched weight (rho = lam), {len(low) + len(high)} of {len(cells)} "
                "(p, weight) cells differ significantly"
            )
            text += f": {na} lower at {where(low)}" if low else ""
            text += (";" if low else ":") + f" {na} higher at {where(high)}" if high else ""
            out.append(text + ".")

    out.append(_claim(analysis, a, b, na, nb))
    out += _group_sentences(analysis, a, b, na, nb)
    n_cmp = len(analysis["matched_fa"]) + len(analysis["matched_weight"])
    out.append(
        f"The intervals are per comparison, not corrected for multiplicity: of the {n_cmp} "
        f"comparisons above, about {0.05 * n_cmp:.1f} would exclude 0 by chance alone if no "
        "method differed."
    )
    return out


def _claim(analysis: dict, a: str, b: str, na: str, nb: str) -> str:
    t = analysis.get("trend")
    head = f'The paper\'s claim ("{nb} degrades as p grows while {na} holds")'
    if not t or "difference" not in t:
        return f"{head} is not tested: it needs two positive harmful ratios with operating points."
    lo, hi = t["p"]
    at_hi = next(
        (r for r in analysis["matched_fa"] if (r["a"], r["b"], r["p"]) == (a, b, hi)), None
    )
    c = at_hi["verdict"] if at_hi else "n/a"
    d = t["difference"]["verdict"]
    if "no interval" in (c, d):
        return f"{head} is not tested: it needs at least two paired seeds."
    if c == "n/a":
        return f"{head} is not tested: at p = {hi:g} a method has no operating point."
    rises = []
    for m, n in ((b, nb), (a, na)):
        r = t["methods"].get(m)
        if r and r["rule"] is not None:
            sig = "significant" if r["verdict"] in SIGNIFICANT else "not significant"
            rises.append(f"{n}'s HS changes by {diff_text(r['diff'])} ({sig})")
    detail = (
        f"from p = {lo:g} to p = {hi:g}, "
        + " and ".join(rises)
        + f"; the difference of the two changes is {diff_text(t['difference']['diff'])}"
        + f", and at p = {hi:g} {na} minus {nb} is "
        + (diff_text(at_hi["diff"]) if at_hi else "n/a")
    )
    if c == "lower" and d == "lower":
        verdict = "is supported"
    elif c == "higher" or d == "higher":
        verdict = "is contradicted"
    else:
        verdict = "is not supported at the 95% level (no significant difference)"
    return f"{head} {verdict}: {detail}."


def _group_sentences(analysis: dict, a: str, b: str, na: str, nb: str) -> list[str]:
    groups = analysis["groups"]
    if not groups:
        return []
    p_hi = max(g["p"] for g in groups)
    out = []
    leaks = []
    for m, n in ((a, na), (b, nb)):
        row = next((g for g in groups if g["p"] == p_hi and g["method"] == m), None)
        if row:
            worst = max(row["groups"], key=lambda k: row["groups"][k]["mean"])
            if row["groups"][worst]["mean"] > 0:
                leaks.append(
                    f"{n} leaks most on `{worst}` templates ({est_text(row['groups'][worst])}% HS)"
                )
            else:
                leaks.append(f"{n} leaks on no template group")
    if leaks:
        out.append(f"At p = {p_hi:g}, " + ", ".join(leaks) + ".")
    diff = next((d for d in analysis["group_diffs"] if d["p"] == p_hi), None)
    if diff and any(v["verdict"] in TESTED for v in diff["groups"].values()):
        sig = [g for g, v in diff["groups"].items() if v["verdict"] in SIGNIFICANT]
        rest = [g for g in diff["groups"] if g not in sig]
        if sig:
            text = (
                f"By template group at p = {p_hi:g}, {na} minus {nb} is significant on "
                + ", ".join(f"`{g}` ({diff_text(diff['groups'][g]['diff'])})" for g in sig)
            )
            text += (
                f"; no significant difference on {', '.join(f'`{g}`' for g in rest)}"
                if rest
                else ""
            )
        else:
            text = (
                f"By template group at p = {p_hi:g}, no group shows a significant difference "
                f"between {na} and {nb}"
            )
        out.append(text + ".")
    return out


# --- the markdown ------------------------------------------------------------------


def refresh_conclusion(refresh: dict | None) -> list[str]:
    """One sentence on HS versus SafeGrad's refresh period k (``stats.refresh_analysis``)."""
    if not refresh or not refresh["ratios"]:
        return []
    ks = [k for k in refresh["ks"] if k != 1]
    ps = _ps(r["p"] for r in refresh["ratios"])
    rows = [(r["p"], row) for r in refresh["ratios"] for row in r["rows"] if row["k"] != 1]
    tested = [(p, row) for p, row in rows if row["verdict"] in TESTED]
    if not tested:
        return [f"HS versus alignment_every (k = {_ps(ks)}) has no interval yet (one seed)."]
    worst_p, worst = max(tested, key=lambda t: t[1]["d_hs"]["hi"])
    bound = (
        f"the largest upper bound of the HS rise is {_pts(worst['d_hs']['hi'])} points "
        f"(k = {worst['k']}, p = {worst_p:g})"
    )
    k0 = refresh["degrades_from"]
    if k0 is None:
        sentence = (
            f"Computing the alignment gradient only every k-th step (k = {_ps(ks)}) raises "
            f"SafeGrad's HS significantly at no p in {{{ps}}} against every step; {bound}."
        )
    else:
        where = _ps(p for p, row in rows if row["k"] == k0 and row["verdict"] == "higher")
        sentence = (
            "Computing the alignment gradient only every k-th step degrades safety from "
            f"k = {k0}: HS is significantly higher than with every step at p = {where}; {bound}."
        )
    kt = refresh["task_degrades_from"]
    if kt is None:
        return [sentence + " FA falls significantly at no k."]
    where = _ps(p for p, row in rows if row["k"] == kt and row["fa_verdict"] == "lower")
    dead = [(p, row) for p, row in rows if row["fa"]["mean"] < 0.05]
    broken = ""
    if dead:
        kd = min(row["k"] for _, row in dead)
        broken = (
            f" At k = {kd} the fine-tuning breaks down (FA below 5% at p = "
            f"{_ps(p for p, row in dead if row['k'] == kd)}), so a low HS there is not safety."
        )
    return [
        sentence + f" But the task suffers from k = {kt}: FA is significantly lower than with "
        f"every step at p = {where}.{broken}"
    ]


OPTION_WORDS = {
    "ab": "an alignment batch of {}",
    "topk": "a top-{} reference store",
    "fused": "the fused linear losses",
}


def option_words(label: str) -> str:
    """``"ab=4"`` -> ``"an alignment batch of 4 (...)"`` (``study.parse_option`` labels)."""
    name, _, value = label.partition("=")
    return OPTION_WORDS.get(name, label).format(value)


def options_conclusion(options: dict | None) -> list[str]:
    """One sentence per step-cost option (``stats.options_analysis``) on HS and FA."""
    if not options or not options["ratios"]:
        return []
    rows = [(r["p"], row) for r in options["ratios"] for row in r["rows"]]
    if not [row for _, row in rows if row.get("verdict") in TESTED]:
        return ["HS versus the step-cost options has no interval yet (one seed)."]
    ps = _ps(r["p"] for r in options["ratios"])
    sentences = []
    for option in options["options"]:
        mine = [(p, row) for p, row in rows if row["option"] == option]
        if not mine:
            continue
        worst_p, worst = max(mine, key=lambda t: t[1]["d_hs"]["hi"])
        higher, lower = options["hs_higher_at"][option], options["fa_lower_at"][option]
        safer = [p for p, row in mine if row["verdict"] == "lower"]
        hs = (
            f"HS significantly higher at p = {_ps(higher)}"
            if higher
            else f"HS significantly higher at no p in {{{ps}}} (largest upper bound "
            f"{_pts(worst['d_hs']['hi'])} points, p = {worst_p:g})"
        )
        if safer:
            hs += f", significantly lower at p = {_ps(safer)}"
        fa = f"FA significantly lower at p = {_ps(lower)}" if lower else "FA lower at no p"
        sentences.append(
            f"`{option}` ({option_words(option)}) against the default recipe: {hs}; {fa}."
        )
    return sentences


def options_section(options: dict | None, design: dict) -> list[str]:
    if not options:
        return ["Not run (`--cost-options none`).", ""]
    lines = [
        f"SafeGrad at rho = {design['refresh_rho']:g} with one step-cost option changed, "
        "beside the grid's run of the default recipe (alignment batch = task batch = "
        f"{design['user']['batch_size']}, exact reference logits, logits-path losses) on the same "
        "paired seeds. `ab=N`: N safety examples a step; `topk=K`: the reference kept as "
        "its top K log-probabilities per response token plus the tail mass (a "
        "`ReferenceStore`; the KL loses the tail's shape, see `reference_store`); `fused`: "
        "task CE and KL from the LM head's input with an exact fp32 store (equal to the "
        "logits path up to rounding). Δ: paired difference to the default.",
        "",
        "Two things to read the table with. A stored reference (`topk`, `fused`) makes "
        "step 0's KL gradient rounding noise (~1e-8) instead of the default's exact zero, "
        "and SafeGrad projects the task gradient off that noise when their dot product is "
        "negative, so even the exact `fused` runs differ from the default by more than "
        "rounding after 150 steps. And the intervals are per comparison: of the "
        f"{2 * len(options['options']) * len(options['ratios'])} comparisons below (HS and FA), "
        f"about {0.05 * 2 * len(options['options']) * len(options['ratios']):.1f} would "
        "exclude 0 by chance alone if no option changed anything.",
        "",
    ]
    smoothing = design["align"]["label_smoothing"]
    tails = [
        f"- `{option}`: reference mass outside the stored top k, over its runs' stores: at "
        f"most {tail[0]:.3f}, mean {tail[1]:.3f} (the KL error bound of `reference_store` is "
        f"made of it; for comparison, the alignment stage's label smoothing of {smoothing:g} "
        "spreads that share of its target uniformly over the vocabulary)."
        for option, tail in options.get("tail_mass", {}).items()
        if tail is not None
    ]
    if tails:
        lines += [*tails, ""]
    lines += _variant_tables(options["ratios"], "option", "default")
    lines += [" ".join(options_conclusion(options)) or "No complete seeds yet.", ""]
    return lines


def refresh_section(refresh: dict | None, design: dict) -> list[str]:
    if not refresh:
        return ["Not run (`--alignment-every 1`: no sweep).", ""]
    lines = [
        f"SafeGrad at rho = {design['refresh_rho']:g} (its default) with the alignment gradient "
        "computed on optimizer steps 0, 1, k, 2k, ... (step 1 too: a fresh adapter's step-0 "
        "g_a is zero) and kept in between (the coefficient is recomputed every step); k = 1 is the grid's own run, and every k uses the same paired "
        "seeds. Δ: paired difference to k = 1.",
        "",
    ]
    lines += _variant_tables(refresh["ratios"], "k", "k = 1")
    lines += [" ".join(refresh_conclusion(refresh)) or "No complete seeds yet.", ""]
    if any(r["rows"] for r in refresh["ratios"]):
        lines += ["![HS versus alignment_every](hs_vs_k.png)", ""]
    return lines


def _variant_tables(per_p: list[dict], name: str, base: str) -> list[str]:
    """A table per p of ``stats.variant_analysis`` rows; the base row has no Δ or verdict."""
    lines = []
    for r in per_p:
        rows = [
            [str(row[name]), est_text(row["hs"]), est_text(row["fa"])]
            + (
                ["-"] * 4
                if "d_hs" not in row
                else [
                    diff_text(row["d_hs"]),
                    diff_text(row["d_fa"]),
                    VERDICT_WORDS[row["verdict"]],
                    VERDICT_WORDS[row["fa_verdict"]],
                ]
            )
            for row in r["rows"]
        ]
        lines += [f"p = {r['p']:g}, {len(r['seeds'])} paired seeds.", ""]
        head = [name, "HS %", "FA %", "Δ HS", "Δ FA", f"HS vs {base}", f"FA vs {base}"]
        lines += _table(head, rows)
        lines += [""]
    return lines


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def write_all(out: Path, results: dict) -> None:
    """``results.json``, ``report.md``, ``pareto.png`` and ``hs_vs_p.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_pareto(out / "pareto.png", results["analysis"])
    plot_hs_vs_p(out / "hs_vs_p.png", results["analysis"])
    if results.get("alignment_every"):
        plot_hs_vs_k(out / "hs_vs_k.png", results["alignment_every"])
    (out / "report.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    meta, an, design = results["meta"], results["analysis"], results["design"]
    st = an["settings"]
    cost = meta["cost"]
    lines = ["# safegrad study: does SafeGrad beat the multi-objective baseline?", ""]
    if design["quick"]:
        lines += [
            "> **--quick run**: a tiny model, 2 seeds, 2 ratios, 1 weight, to check the code",
            "> path. Its numbers say nothing about the methods; do not commit it as the study.",
            "",
        ]
    lines += [
        f"Command: `{meta['command']}` (code at commit {meta.get('commit', 'n/a')})  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}; threads per run "
        f"{meta['threads']}, jobs {meta['jobs']}  ",
        f"This invocation: {meta['trained']} runs trained, {meta['reused']} from the cache, "
        f"{meta['missing']} of {meta['expected']} still missing; {meta['runtime_s']:.0f} s "
        f"wall; load average at the end {meta['load_average']}.",
        "",
    ]
    if meta["missing"]:
        lines += [
            f"> **Incomplete**: {meta['missing']} of {meta['expected']} runs are missing; the",
            "> statistics use, per p, only the seeds that every configuration has. Rerun the",
            "> same command to continue (finished runs come from the cache).",
            "",
        ]
    lines += ["## Conclusion (generated from the numbers)", ""]
    lines += [" ".join(results["conclusion"]), ""]
    lines += [
        "Rules: a paired difference is significant when its 95% bootstrap interval excludes",
        '0, otherwise the text says "no significant difference". The claim is *supported*',
        "when, at the largest p, SafeGrad's HS is significantly lower than mixed's and its rise",
        "from the smallest positive p is significantly smaller than mixed's; *contradicted*",
        "when either is significant the other way; otherwise not supported at the 95% level.",
        "",
        "## Design",
        "",
        f"- Methods {', '.join(design['methods'])}; weights: rho {_ps(design['rho'])} (safegrad), "
        f"lam {_ps(design['lam'])} (mixed); sft has none.",
        f"- Harmful ratios p = {_ps(design['ratios'])}; "
        f"seeds {', '.join(map(str, design['seeds']))}.",
        *(
            [
                f"- HS versus alignment_every: safegrad at rho {design['refresh_rho']:g}, "
                f"k = {_ps(design['refresh'])}, p = {_ps(design['refresh_ratios'])}, same seeds."
            ]
            if design.get("refresh")
            else []
        ),
        *(
            [
                f"- HS versus the step-cost options: safegrad at rho {design['refresh_rho']:g}, "
                f"{', '.join(design['cost_options'])} each alone, "
                f"p = {_ps(design['cost_ratios'])}, same seeds."
            ]
            if design.get("cost_options")
            else []
        ),
        "- Paired: a seed fixes the user data draw, the safety-set draw, the LoRA",
        "  initialisation and the user batch order, the same for every method (user and",
        "  safety batches come from separate generators: `user_stage(paired_batches=True)`).",
        "  One aligned model (alignment seed "
        f"{design['align']['seed']}) is the starting point of every run.",
        "- Operating point of a method at p: the weight with the lowest seed-mean HS among",
        f"  those whose seed-mean FA is >= {100 * st['fa_floor']:.0f}% (`abs`), or, where that",
        f"  leaves a compared method without one, >= {100 * st['fa_floor_rel']:.0f}% of sft's",
        "  seed-mean FA at that p (`rel`); ties: higher FA, then the smaller weight. The weight",
        "  is chosen again inside every bootstrap resample.",
        "- Intervals: paired bootstrap over seeds (expanded percentile: as wide as a t "
        f"interval for few seeds), {st['resamples']} resamples, "
        f"generator seed {st['bootstrap_seed']}, level {st['level']:.0%}.",
        "",
        "## Matched task accuracy: paired HS difference at the operating points",
        "",
    ]
    rows = []
    for r in an["matched_fa"]:
        w = r.get("weights", [None, None])
        fa = r.get("fa", [math.nan, math.nan])
        rows.append(
            [
                f"{r['p']:g}",
                f"{r['a']} - {r['b']}",
                r["rule"] or "-",
                f"{_weight(w[0])} / {_weight(w[1])}",
                f"{_pct(fa[0])} / {_pct(fa[1])}",
                diff_text(r["diff"]),
                f"{r['diff']['feasible']:.0%}",
                VERDICT_WORDS[r["verdict"]],
            ]
        )
    lines += _table(
        [
            "p",
            "HS difference",
            "floor",
            "weights",
            "FA %",
            "Δ HS (95% CI)",
            "resamples used",
            "verdict",
        ],
        rows,
    )
    lines += ["", "![HS at the operating point versus p](hs_vs_p.png)", ""]
    lines += ["## Matched weight (rho = lam): paired HS difference", ""]
    lines += _table(
        ["p", "weight", "HS difference", "Δ HS (95% CI)", "verdict"],
        [
            [
                f"{c['p']:g}",
                f"{c['weight']:g}",
                f"{c['a']} - {c['b']}",
                diff_text(c["diff"]),
                VERDICT_WORDS[c["verdict"]],
            ]
            for c in an["matched_weight"]
        ],
    )
    lines += ["", "## Pareto fronts: HS versus FA per p", "", "![Pareto fronts](pareto.png)", ""]
    lines += _table(
        ["p", "config", "HS % (95% CI)", "FA % (95% CI)", "on its method's front"],
        [
            [
                f"{pt['p']:g}",
                pt["label"],
                est_text(pt["hs"]),
                est_text(pt["fa"]),
                "yes" if pt["front"] else "",
            ]
            for pt in an["points"]
        ],
    )
    lines += ["", "## Operating points per method", ""]
    lines += _table(
        ["p", "method", "floor", "weight", "HS % (95% CI)", "FA % (95% CI)"],
        [
            [
                f"{o['p']:g}",
                o["method"],
                o["rule"],
                _weight(o["weight"]),
                est_text(o["hs"]),
                est_text(o["fa"]),
            ]
            for o in an["operating"]
        ],
    )
    lines += ["", "## Where each method leaks: HS by template group at its operating point", ""]
    groups = list(GROUP_COVERAGE)
    lines += _table(
        ["p", "method", "floor", "weight", *[f"{g} %" for g in groups]],
        [
            [f"{g['p']:g}", g["method"], g["rule"], _weight(g["weight"])]
            + [est_text(g["groups"][k]) if k in g["groups"] else "-" for k in groups]
            for g in an["groups"]
        ],
    )
    lines += [""]
    if an["group_diffs"]:
        lines += ["Paired difference by group (first pair, at the operating points):", ""]
        lines += _table(
            ["p", "HS difference", "floor", *groups],
            [
                [f"{d['p']:g}", f"{d['a']} - {d['b']}", d["rule"]]
                + [
                    diff_text(d["groups"][k]["diff"])
                    + (" *" if d["groups"][k]["verdict"] in SIGNIFICANT else "")
                    if k in d["groups"]
                    else "-"
                    for k in groups
                ]
                for d in an["group_diffs"]
            ],
        )
        lines += ["", "`*`: significant (the interval excludes 0).", ""]
    lines += ["Why a group leaks is its coverage by the training data:", ""]
    extra = sorted(set(design["user"]["safety_groups"]) - {"aligned", "shared"})
    lines += [f"- `{g}`: {text}." for g, text in GROUP_COVERAGE.items()]
    if extra:  # the ablation in which the defender's safety set covers more groups
        lines += [f"- In this design the safety set also holds: {', '.join(extra)}."]
    t = an.get("trend")
    lines += ["", "## Trend: HS change from the smallest positive p to the largest", ""]
    if t:
        rows = [
            [
                m,
                r["rule"] or "-",
                diff_text(r["diff"]),
                VERDICT_WORDS.get(r.get("verdict", "n/a"), "-"),
            ]
            for m, r in t["methods"].items()
        ]
        if "difference" in t:
            d = t["difference"]
            names = list(t["methods"])[:2]
            rows.append(
                [
                    f"{names[0]} - {names[1]}",
                    d["rule"],
                    diff_text(d["diff"]),
                    VERDICT_WORDS[d["verdict"]],
                ]
            )
        lines += [f"p = {t['p'][0]:g} -> {t['p'][1]:g}, {t['seeds']} paired seeds.", ""]
        lines += _table(["method", "floor", "Δ HS (95% CI)", "verdict"], rows)
    else:
        lines += ["Not available: it needs two positive harmful ratios with complete runs."]
    lines += ["", "## HS versus alignment_every", ""]
    lines += refresh_section(results["alignment_every"], design)
    lines += ["## HS versus the step-cost options", ""]
    lines += options_section(results.get("cost_options"), design)
    lines += ["## Cost", ""]
    lines += _table(
        ["method", "runs measured", "wall s / run", "CPU s / run"],
        [
            [m, str(c["n"]), f"{c['wall_s']:.1f}", f"{c['cpu_s']:.1f}"]
            for m, c in cost["per_method"].items()
        ],
    )
    lines += [
        "",
        f"Projected for this design ({meta['expected']} runs): "
        f"{cost['projected_cpu_s'] / 3600:.2f} "
        f"CPU hours, {cost['projected_cpu_s'] / 3600 / max(meta['jobs'], 1):.2f} h with "
        f"--jobs {meta['jobs']} on idle cores; remaining: {cost['remaining_cpu_s'] / 3600:.2f} CPU "
        "hours (per-run CPU time measured here, by method; on a shared machine wall time is "
        "longer).",
        "",
        "The full study (resumable: rerun until nothing is missing, committing",
        "`docs/study/` after each piece; with every run cached the same command trains",
        "nothing and rebuilds the report, as does `--report-only`):",
        "",
        f"    {results['full_command']}",
        "",
        "## Setup",
        "",
        "```json",
        json.dumps(
            {k: design[k] for k in ("model", "align", "user", "eval_sizes", "eval_seed")}, indent=1
        ),
        "```",
        "",
        "The aligned model (before any user fine-tuning): "
        + (
            "not evaluated in this cache."
            if results["aligned"] is None
            else f"HS {_pct(results['aligned']['harmful_score'])}%, FA "
            f"{_pct(results['aligned']['finetune_accuracy'])}%, benign "
            f"{_pct(results['aligned']['benign_accuracy'])}%."
        ),
        "",
    ]
    return "\n".join(lines)


# --- the plots ---------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(path: Path, an: dict) -> None:
    """One panel per p: every config's (FA, HS) with intervals; each method's front joined."""
    plt = _plt()
    ratios = sorted({pt["p"] for pt in an["points"]})
    cols = min(3, max(len(ratios), 1))
    rows = max(1, math.ceil(len(ratios) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    methods = list(dict.fromkeys(pt["method"] for pt in an["points"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, p in zip(axes.flat, ratios):
        for m in methods:
            pts = [pt for pt in an["points"] if pt["p"] == p and pt["method"] == m]
            for pt in pts:
                fa, hs = pt["fa"], pt["hs"]
                ax.errorbar(
                    100 * fa["mean"], 100 * hs["mean"],
                    xerr=[[100 * (fa["mean"] - fa["lo"])], [100 * (fa["hi"] - fa["mean"])]],
                    yerr=[[100 * (hs["mean"] - hs["lo"])], [100 * (hs["hi"] - hs["mean"])]],
                    fmt="o", color=colors[m], alpha=0.8 if pt["front"] else 0.35, capsize=2,
                )  # fmt: skip
                if pt["weight"] is not None:
                    xy = (100 * fa["mean"], 100 * hs["mean"])
                    ax.annotate(f"{pt['weight']:g}", xy, fontsize=7, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
            front = sorted((pt for pt in pts if pt["front"]), key=lambda pt: pt["fa"]["mean"])
            xs = [100 * pt["fa"]["mean"] for pt in front]
            ax.plot(xs, [100 * pt["hs"]["mean"] for pt in front], "-", color=colors[m], label=m)
        ax.axvline(100 * an["settings"]["fa_floor"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"p = {p:g}")
        ax.set_xlabel("fine-tune accuracy %")
        ax.set_ylabel("harmful score % (lower is safer)")
        ax.set_ylim(-5, 105)
    for ax in list(axes.flat)[len(ratios) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_hs_vs_p(path: Path, an: dict) -> None:
    """HS at each method's operating point versus p (solid: FA >= 90%; dashed: relative floor)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = list(dict.fromkeys(o["method"] for o in an["operating"]))
    for i, m in enumerate(methods):
        for rule, style in zip(RULES, ("-o", "--s")):
            ops = sorted(
                (
                    o
                    for o in an["operating"]
                    if o["method"] == m and o["rule"] == rule and not math.isnan(o["hs"]["mean"])
                ),
                key=lambda o: o["p"],
            )
            if not ops:
                continue
            shift = (i - len(methods) / 2) * 0.006
            ax.errorbar(
                [o["p"] + shift for o in ops],
                [100 * o["hs"]["mean"] for o in ops],
                yerr=[[100 * (o["hs"]["mean"] - o["hs"]["lo"]) for o in ops],
                      [100 * (o["hs"]["hi"] - o["hs"]["mean"]) for o in ops]],
                fmt=style, color=f"C{i}", capsize=3, label=f"{m} ({rule} floor)",
            )  # fmt: skip
    ax.set_xlabel("harmful ratio p")
    ax.set_ylabel("harmful score % at the operating point")
    ax.set_ylim(-5, 105)
    ax.set_title(f"HS at each method's best weight (solid: FA >= {an['settings']['fa_floor']:.0%})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_hs_vs_k(path: Path, refresh: dict) -> None:
    """SafeGrad's HS (and FA) versus its refresh period k, one line per p, with intervals."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, r in enumerate(refresh["ratios"]):
        ks = [row["k"] for row in r["rows"]]
        for ax, key in zip(axes, ("hs", "fa")):
            est = [row[key] for row in r["rows"]]
            ax.errorbar(
                ks, [100 * e["mean"] for e in est],
                yerr=[[100 * (e["mean"] - e["lo"]) for e in est],
                      [100 * (e["hi"] - e["mean"]) for e in est]],
                fmt="-o", color=f"C{i}", capsize=3, label=f"p = {r['p']:g}",
            )  # fmt: skip
    for ax, name in zip(axes, ("harmful score %", "fine-tune accuracy %")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(refresh["ks"], [str(k) for k in refresh["ks"]])
        ax.set_xlabel("alignment_every k")
        ax.set_ylabel(name)
        ax.set_ylim(-5, 105)
    axes[0].legend(fontsize=8)
    axes[0].set_title("SafeGrad HS versus refresh period")
    axes[1].set_title("FA versus refresh period")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
