"""report.md: the Summary, the statistics tables, the design check, parse rates, figures, descriptive
tables, what is missing, and the Sources every number cites."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lbt.analyze.missing import missing_lines
from lbt.analyze.summary import headline_text
from lbt.analyze.tables import NOT_SCORED
from lbt.analyze.text import (
    EXPLORATORY_STAMP,
    SourceIndex,
    d_reason,
    entry_sources,
    fmt,
    fmt_ci,
    fmt_p,
    fmt_seed,
    md_table,
    validity_reason,
)
from lbt.study import FRAMED_ARMS, GATE_D, HEADLINE_MEASURES, MINUS, PLUS

DEFINITIONS = (
    "d = (mean arm − mean neutral) / neutral SD over (seed, base item) cells; combined = (d− − d+)/2, "
    "predicted positive; one-sided p = share of bootstrap draws ≤ 0; Holm across families per measure."
)
CALIBRATED_NOTE = (
    "Beside each pre-registered bootstrap CI stands a calibrated one (lbt.stats.calibrated: crossed seed × "
    "item random effects with small-sample df, same point estimates). The pre-registered line is the "
    "primary line; the calibrated line keeps its level with few seeds, where the percentile bootstrap does "
    "not (docs/statistics.md). Where they disagree, the Summary says so."
)
DESIGN_NOTE = (
    "Variance components (item, item × arm, seed, noise) are estimated from this sweep's own target cells; "
    "studies of the same design are simulated with them under the null and at the estimated d. With 3 "
    "seeds the seed component rests on 2 df per arm: a plausibility check, not a measurement."
)
def arm_cells(entry: dict, arm: str) -> list[str]:
    """d [CI] (pre-registered), calibrated CI, and the TOST verdict of one framed arm."""
    if not entry.get(arm):
        return ["(arm not in the sweep)"] * 3
    if entry.get("not_interpretable"):
        return ["(not interpretable)"] * 3
    t = entry[arm]["tost"]
    cal = (entry.get("calibrated") or {}).get(arm)
    return [
        f"{fmt(entry[arm]['d'], why=d_reason(entry))} {fmt_ci(entry[arm]['ci'], 'no finite bootstrap draw')}",
        fmt_ci(cal["ci"], "no finite interval") if cal else "(fewer than 2 complete items)",
        (
            f"{'eq' if t['equivalent'] else 'not eq'} (p {fmt_p(t['p_lower'], 10**9, 'undefined')}/"
            f"{fmt_p(t['p_upper'], 10**9, 'undefined')})"
        ),
    ]


def stats_table(stats: dict | None, sources: SourceIndex, role: str, args: argparse.Namespace) -> list[str]:
    """The statistics table of one item-set role, with the reasons of entries not interpretable."""
    if not stats:
        return [f"(no {role}-item rows of the study arms at phase `{args.phase}`)"]
    rows = []
    for family, measures in sorted(stats["families"].items()):
        for measure, e in sorted(measures.items()):
            ref = sources.cite(f"{family} · {measure} · {role}", entry_sources(e))
            comb = e["combined_directional"]
            cal = (e.get("calibrated") or {}).get("combined_directional")
            holm = stats["holm"].get(measure, {}).get(family, {})
            cal_holm = stats.get("calibrated_holm", {}).get(measure, {}).get(family, {})
            if e.get("not_interpretable"):
                combined = ["(not interpretable)"] * 6
            elif comb is None:
                combined = ["(needs both framed arms)"] * 6
            else:
                combined = [
                    f"{fmt(comb['d'], why=d_reason(e))} {fmt_ci(comb['ci'], 'no finite bootstrap draw')}",
                    fmt_p(comb["p_one_sided"], args.n_resamples, "no finite bootstrap draw"),
                    fmt(holm.get("reject")),
                    fmt_ci(cal["ci"], "no finite interval") if cal else "(fewer than 2 complete items)",
                    fmt_p(cal["p_one_sided"], 10**9, "undefined") if cal else "(no test)",
                    fmt(cal_holm.get("reject")) if cal else "(no test)",
                ]
            rows.append(
                [
                    family,
                    measure,
                    *(cell for arm in FRAMED_ARMS for cell in arm_cells(e, arm)),
                    *combined,
                    f"{e['n_items']} × {e['n_seeds']}",
                    e["resampling"],
                    str(sum(e["nan_excluded"].values())),
                    f"[{ref}]",
                ]
            )
    out = md_table(
        [
            "family",
            "measure",
            f"d {PLUS.name} [95% CI]",
            f"calibrated CI {PLUS.name}",
            f"TOST {PLUS.name}",
            f"d {MINUS.name} [95% CI]",
            f"calibrated CI {MINUS.name}",
            f"TOST {MINUS.name}",
            "combined d [95% CI]",
            "p one-sided",
            "Holm reject",
            "calibrated CI combined",
            "calibrated p",
            "calibrated Holm reject",
            "items × seeds",
            "resampling",
            "unparsed rows",
            "rows",
        ],
        rows,
    )
    notes = [
        f"- {family}, {measure}: {e['not_interpretable']}."
        for family, measures in sorted(stats["families"].items())
        for measure, e in sorted(measures.items())
        if e.get("not_interpretable")
    ]
    return out + ([""] + notes if notes else [])


def parse_rate_table(report: dict, args: argparse.Namespace) -> list[str]:
    """Parsed rows per (family, arm, phase, item set, measure), the low ones marked."""
    rows = [
        [
            str(r["family"]),
            str(r["arm"]),
            r["phase"],
            r["item_set"],
            r["measure"],
            f"{r['n_parsed']} / {r['n_rows']}",
            "(not scored until judged: see measure judge)"
            if r["parse_rate"] is None
            else f"{100 * r['parse_rate']:.1f} %"
            + (" **below threshold**" if r["parse_rate"] < args.min_parse_rate else ""),
        ]
        for r in report["parse_rates"]
    ]
    return md_table(["family", "arm", "phase", "item set", "measure", "parsed / rows", "parse rate"], rows)


def design_check_lines(report: dict) -> list[str]:
    """Each design check in words and as a table (or why it did not run)."""
    checks = report.get("design_check") or []
    if not checks:
        return ["(not run: no target-item statistics of a headline measure, or --design-studies 0)"]
    out = []
    rows = []
    for c in checks:
        if c.get("skipped"):
            out.append(f"- {c['family']}, {c['measure']}: not run — {c['skipped']}.")
            continue
        comp = c["components"]
        design = (
            f"{c['n_seeds']} × {c['n_items']}; σ item {comp['sigma_item']:.3f}, item×arm "
            f"{comp['sigma_item_arm']:.3f}, seed {comp['sigma_seed']:.3f}, noise {comp['sigma_noise']:.3f}"
        )
        for method, label in (("preregistered", "pre-registered bootstrap"), ("calibrated", "calibrated")):
            null = c["null"][method]
            at = (c.get("at_estimate") or {}).get(method)
            rows.append(
                [
                    c["family"],
                    c["measure"],
                    design,
                    label,
                    f"{null['coverage_d_plus']:.3f} / {null['coverage_d_minus']:.3f} / {null['coverage_combined']:.3f}",
                    f"{null['directional_rejection_rate']:.3f}",
                    f"{at['coverage_combined']:.3f}" if at else "(estimate is 0: same as null)",
                    f"{at['directional_rejection_rate']:.3f}" if at else "(estimate is 0)",
                ]
            )
        pre, cal = c["null"]["preregistered"], c["null"]["calibrated"]
        out.append(
            f"- {c['family']}, {c['measure']}: on studies shaped like this one ({c['n_studies']} simulated, "
            f"{c['n_resamples']} resamples each), the pre-registered 95 % CI of the combined estimate covers "
            f"{100 * pre['coverage_combined']:.1f} % and its 5 % directional test fires "
            f"{100 * pre['directional_rejection_rate']:.1f} % of the time under the null; the calibrated: "
            f"{100 * cal['coverage_combined']:.1f} % and {100 * cal['directional_rejection_rate']:.1f} %."
        )
    table = md_table(
        [
            "family",
            "measure",
            "design (S × N; components)",
            "method",
            "null coverage d+ / d− / combined",
            "null FPR (directional)",
            "coverage at the estimate (combined)",
            "power at the estimate",
        ],
        rows,
    )
    return out + [""] + table


def write_markdown(report: dict, args: argparse.Namespace, path: Path) -> None:
    """report.md from the report dict; every number cites the rows behind it ([S<n>], see Sources)."""
    sources = SourceIndex()
    out: list[str] = []
    title = "lbt analysis — " + ", ".join(report["sweeps"])
    out += [f"# {title}", ""]
    if report["exploratory"]:
        out += [f"> **{EXPLORATORY_STAMP}**", ""]
    generated = (
        f"Generated {report['created']} by lbt {report['lbt_version']}. Paths are relative to "
        f"`{report['paths_relative_to']}`. Settings: {json.dumps(report['settings'])}."
    )
    out += [generated, ""]
    if report["lock"]:
        lock = report["lock"]
        matched = (
            f"Preregistration lock: `{lock['path']}` (settings {lock['settings_sha256'][:12]}, "
            f"items {lock['items_sha256'][:12]}) matched."
        )
        out += [matched, ""]
    out += ["## Summary", "", *headline_text(report, sources, args)]
    gate = report["manipulation_gate"]
    if gate:
        passed = sorted(
            {f"{g['family']}/{g['arm']}" for g in gate if g["passes"] and g["measure"] in HEADLINE_MEASURES}
        )
        out.append(
            f"- **Manipulation check** (source items, |d| ≥ {GATE_D} in the predicted direction): "
            f"passing on a headline measure: {', '.join(passed) or 'none'}."
        )
    flagged = [c for c in report["capability"] if c["perplexity_rise"] or c["mmlu_drop"]]
    out.append(
        f"- **Capability guardrails**: {len(flagged)} flag(s) raised over {len(report['capability'])} "
        "job-phase(s)."
        if report["capability"]
        else "- **Capability guardrails**: no capability.json found."
    )
    gaps = missing_lines(report["missing"])
    completeness = f"partial sweep — {len(gaps)} gap(s), see Missing" if gaps else "complete"
    out.append(f"- **Completeness**: {completeness}.")
    out += [
        "",
        f"## Primary analysis: target items, phase `{args.phase}`",
        "",
        DEFINITIONS,
        "",
    ]
    out += [CALIBRATED_NOTE, ""]
    out += stats_table(report["primary"], sources, "target", args)
    out += ["", "## Design check: how each method does on a study shaped like this one", "", DESIGN_NOTE, ""]
    out += design_check_lines(report)
    out += ["", "## Parse rates (rows with a parsed stance, over seeds)", ""]
    out += [
        (
            f"A measure whose analysed rows in some arm parse below {100 * args.min_parse_rate:.0f} % "
            "(`--min-parse-rate`) is marked not interpretable and its d is not reported."
        ),
        "",
    ]
    out += parse_rate_table(report, args)
    out += ["", f"## Manipulation check: source items, phase `{args.phase}`", ""]
    out += stats_table(report["manipulation_check"], sources, "source", args)
    out += ["", f"Gate (source d ≥ {GATE_D} with the predicted sign):", ""]
    out += md_table(
        ["family", "measure", "arm", "predicted sign", "d [95% CI]", "passes", "rows"],
        [
            [
                g["family"],
                g["measure"],
                g["arm"],
                g["predicted_sign"],
                (
                    f"{fmt(g['d'], why='d undefined: neutral SD 0 or no parsed stance')} "
                    f"{fmt_ci(g['ci'], 'no finite bootstrap draw')}"
                ),
                fmt(g["passes"]),
                "["
                + sources.cite(
                    f"{g['family']} · {g['measure']} · source",
                    entry_sources(report["manipulation_check"]["families"][g["family"]][g["measure"]]),
                )
                + "]",
            ]
            for g in gate
        ],
    )
    out += ["", "## Figures", ""]
    out += [f"![{name}](figures/{name}.png)" for name in report["figures"]] or ["(none)"]
    out += ["", f"## Projection shift at phase `{args.phase}` (answer position, at ℓ*)", ""]
    proj_rows = []
    for family, arms in sorted(report["projection_shift"].items()):
        for arm, rec in sorted(arms.items()):
            i = rec["layers"].index(rec["l_star"]) if rec["l_star"] in rec["layers"] else rec["l_star"]
            proj_rows.append(
                [
                    family,
                    arm,
                    str(rec["l_star"]),
                    fmt(rec["shift"][i], 4, "no value in the probe file"),
                    fmt(rec["se"][i], 4, "one seed and no SE in the probe file"),
                    str(rec["n_seeds"]),
                    "; ".join(f"`{s}`" for s in rec["sources"]),
                ]
            )
    out += md_table(["family", "arm", "ℓ*", "shift", "SE", "seeds", "source"], proj_rows)
    out += ["", "## Capability guardrails", ""]
    out += md_table(
        [
            "family",
            "arm",
            "seed",
            "phase",
            "perplexity",
            "comply ok",
            "refuse ok",
            "MMLU",
            "perplexity rise",
            "MMLU drop",
            "source",
        ],
        [
            [
                str(c["family"]),
                str(c["arm"]),
                fmt_seed(c["seed"]),
                c["phase"],
                fmt(c["perplexity"], 3, "not measured"),
                fmt(c["comply_correct_rate"], 3, "refusal battery not run"),
                fmt(c["refuse_correct_rate"], 3, "refusal battery not run"),
                fmt(c["mmlu_accuracy"], 3, "MMLU sample not run"),
                "**FLAG**" if c["perplexity_rise"] else "ok",
                "**FLAG**" if c["mmlu_drop"] else "ok",
                f"`{c['source']}`",
            ]
            for c in report["capability"]
        ],
    )
    out += [
        "",
        f"## Measure validity (sign agreement with the greedy forced choice), phase `{args.phase}`",
        "",
        (
            "Computed from the rows on disk (the judge's `judge.jsonl` included): the share of items whose "
            "measure, averaged over the item's rows, has the sign of the model's own forced choice."
        ),
        "",
    ]
    out += md_table(
        ["family", "arm", "seed", "item set", "measure", "agreement", "items compared", "source"],
        [
            [
                str(v["family"]),
                str(v["arm"]),
                fmt_seed(v["seed"]),
                v["item_set"],
                v["measure"],
                fmt(v["agreement"], 3, validity_reason(v)),
                str(v["n_items"]),
                f"`{v['source']}`",
            ]
            for v in report["validity"]
            if v["phase"] == args.phase
        ],
    )
    consistency = report.get("judge_consistency") or []
    out += ["", "Judge self-consistency (a random share of answers scored twice):", ""]
    out += (
        md_table(
            ["pairs", "Spearman", "exact agreement", "source"],
            [
                [
                    str(c.get("n_pairs")),
                    fmt(c.get("spearman"), 3, "fewer than 3 pairs or no spread"),
                    fmt(c.get("exact_agreement"), 3, "no pairs"),
                    f"`{c['source']}`",
                ]
                for c in consistency
            ],
        )
        if consistency
        else ["(no judge_consistency.json: the open-ended answers were not judged)"]
    )
    out += ["", "## Mean stance per job, phase, item set and measure (descriptive; all arms)", ""]
    out += md_table(
        [
            "family",
            "arm",
            "seed",
            "phase",
            "item set",
            "measure",
            "rows",
            "unparsed",
            "mean stance",
            "source",
        ],
        [
            [
                str(r["family"]),
                str(r["arm"]),
                fmt_seed(r["seed"]),
                r["phase"],
                r["item_set"],
                r["measure"],
                str(r["n_rows"]),
                str(r["n_nan"]),
                fmt(
                    r["mean_stance"],
                    4,
                    "not scored until judged"
                    if r["measure"] in NOT_SCORED
                    else f"no parsed answer in {r['n_rows']} rows",
                ),
                f"`{r['source']}`",
            ]
            for r in report["descriptive"]
        ],
    )
    out += ["", "## Missing", ""] + ([f"- {line}" for line in gaps] or ["Nothing missing."])
    notes = report["notes"] + report["warnings"]
    out += ["", "## Notes and warnings", ""] + ([f"- {n}" for n in notes] or ["None."])
    out += ["", "## Sources", ""]
    for ref, paths in sources.entries.items():
        out.append(f"- **[{ref}]** {sources.labels[ref]}: " + ", ".join(f"`{p}`" for p in paths))
    if report["exploratory"]:
        out += ["", f"> **{EXPLORATORY_STAMP}**"]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
