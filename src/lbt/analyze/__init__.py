"""python -m lbt.analyze — a sweep's rows on disk → the study's answer (report.json, report.md, figures).

    python -m lbt.analyze prereg-lock [--items-dir data/eval] [--out prereg.lock.json]
    python -m lbt.analyze <sweep dir> [<sweep dir> ...] [--out DIR] [--exploratory] [--n-resamples N]
                          [--lock prereg.lock.json] [--items-dir data/eval] [--no-wandb]

Every directory holding a run.json under the given sweep directories is a job: family = job.model,
arm = job.arm, seed = job.seed. Job directories are read through `lbt.rundir` (their layout and readers):
a file that does not parse is an error naming the job, the file and the line. Rows come from
eval/<phase>/<item_set>/<measure>.jsonl; item set `target` is the held-out items, `source` the
manipulation check — the names both writers of rows use (the training callback's `eval.item_sets` keys,
and `lbt.evaluate`, which names the project's item files alike); `target_items`/`source_items`, the names
older `lbt.evaluate` directories hold, are read the same way. A job without DONE (unfinished, incomplete
or failed) is read but flagged, with what its run card says is missing. The primary analysis
(`lbt.stats.primary_report`) uses phase `final` of the study arms; other arms (e.g. `base` from
`lbt.evaluate`), other item sets and other phases are summarised descriptively. Probe, capability and
summary JSON files feed the projection, dynamics, guardrail and measure-validity sections.

Scoring target items needs a preregistration lock whose settings and item-file hashes match (see
`lbt.stats.prereg`), unless `--exploratory`, which is stamped on every output. Outputs are written to a
new directory (default `<first sweep>/analysis`, or `analysis_2`, … if taken); nothing is overwritten.
An analysis run is logged to the sweep's W&B group (job_type "analysis"), offline without an API key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from lbt import __version__
from lbt.analyze.collect import (
    ITEM_SET_ROLES,
    AnalyzeError,
    Job,
    find_jobs,
    load_capability,
    load_job,  # noqa: F401  (lbt.analyze.load_job: read by tests/test_evaluate.py)
    load_judge_consistency,
    load_probes,
    load_rows,
    load_validity,
)
from lbt.analyze.inference import analysable_rows, design_checks, gate_table, run_stats
from lbt.analyze.missing import missing_lines, missing_report
from lbt.analyze.tables import (
    NOT_SCORED,
    describe,
    not_interpretable,
    parse_rates,
    projection_dynamics,
    projection_summary,
    stance_dynamics,
    validity_from_rows,
)
from lbt.stats.prereg import LockError, check_lock, write_lock

PRIMARY_PHASE = "final"
HEADLINE_MEASURES = ("letter_logprob", "forced_choice")
GATE_D = 0.5
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
EXPLORATORY_STAMP = "EXPLORATORY — not the preregistered analysis (no matching preregistration lock required)"
PREDICTED_SIGN = {"frame_plus": -1, "frame_minus": +1}


# ----------------------------------------------------------------------------------------------- jobs


def phase_key(phase: str) -> tuple[int, int, str]:
    """base, step_<n> by n, final, then anything else by name."""
    if phase == "base":
        return (0, 0, phase)
    match = re.fullmatch(r"step_(\d+)", phase)
    if match:
        return (1, int(match.group(1)), phase)
    if phase == "final":
        return (2, 0, phase)
    return (3, 0, phase)


def is_phase(name: str) -> bool:
    """base, step_<n> or final, the phases a training job probes."""
    return phase_key(name)[0] < 3


# ----------------------------------------------------------------------------------------------- rows


# ------------------------------------------------------------------------------------ descriptive parts


# ---------------------------------------------------------------------------------------------- missing


# ------------------------------------------------------------------------- parse rates and validity


def validity_reason(v: dict[str, Any]) -> str:
    if v["n_choice_decided"] == 0:
        return "no item has a decided forced choice (none parsed, or the two orders cancel)"
    return f"no {v['measure']} value on the {v['n_choice_decided']} decided item(s)"


# ---------------------------------------------------------------------------------- design check


# ------------------------------------------------------------------------------------------- statistics


# ------------------------------------------------------------------------------------------------ text


def fmt(x: Any, digits: int = 2, why: str = "no value") -> str:
    """A number as text; a missing or non-finite one as its reason in words (`why`), never a blank."""
    if x is None:
        return f"({why})"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return f"({why})"
        return f"{x:+.{digits}f}" if digits == 2 else f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: list[float] | None, why: str = "no interval") -> str:
    if not ci or not all(isinstance(x, float) and math.isfinite(x) for x in ci):
        return f"({why})"
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_p(p: float | None, n_resamples: int, why: str = "no p-value") -> str:
    if p is None or not math.isfinite(p):
        return f"({why})"
    return f"< {1 / n_resamples:.0e}" if p == 0 else f"{p:.4f}"


def fmt_seed(seed: Any) -> str:
    return "(no seed: not a training job)" if seed is None else str(seed)


def d_reason(entry: dict) -> str:
    """Why a d of a statistics entry is not a number."""
    sd = entry.get("neutral_sd")
    if sd is not None and (not math.isfinite(sd) or sd == 0):
        return "neutral SD is 0: every neutral cell has the same stance, d is undefined"
    return "no parsed stance in an arm"


class SourceIndex:
    """Numbers in report.md cite [S<n>]; the Sources section lists the rows files behind each key."""

    def __init__(self) -> None:
        self.entries: dict[str, list[str]] = {}
        self.labels: dict[str, str] = {}

    def cite(self, label: str, paths: list[str]) -> str:
        key = tuple(sorted(paths))
        for ref, existing in self.entries.items():
            if tuple(existing) == key:
                return ref
        ref = f"S{len(self.entries) + 1}"
        self.entries[ref] = list(key)
        self.labels[ref] = label
        return ref


def entry_sources(entry: dict) -> list[str]:
    return sorted({p for paths in entry.get("sources", {}).values() for p in paths})


def verdicts(stats: dict, family: str, measure: str, sesoi: float) -> dict[str, bool]:
    """Supported (combined d > 0 and Holm-significant) by each line; `meets_sesoi` on the primary."""
    entry = stats["families"][family][measure]
    comb = entry["combined_directional"] or {}
    cal = (entry.get("calibrated") or {}).get("combined_directional") or {}
    primary = bool(stats["holm"][measure][family]["reject"] and (comb.get("d") or 0) > 0)
    calibrated = bool(
        stats.get("calibrated_holm", {}).get(measure, {}).get(family, {}).get("reject")
        and (cal.get("d") or 0) > 0
    )
    return {
        "primary": primary,
        "calibrated": calibrated,
        "meets_sesoi": primary and comb.get("d", 0) >= sesoi,
    }


def disagreement_lines(stats: dict | None, role: str, args: argparse.Namespace) -> list[str]:
    """In words: where the pre-registered and the calibrated line reach different conclusions."""
    if not stats:
        return []
    lines = []
    for family, measures in sorted(stats["families"].items()):
        for measure, entry in sorted(measures.items()):
            if entry.get("not_interpretable"):
                continue
            cal = entry.get("calibrated") or {}
            if entry["combined_directional"] and cal.get("combined_directional") and role == "target":
                v = verdicts(stats, family, measure, args.sesoi_d)
                if v["primary"] != v["calibrated"]:
                    p_pre = entry["combined_directional"]["p_one_sided"]
                    p_cal = cal["combined_directional"]["p_one_sided"]
                    which = "the pre-registered bootstrap" if v["primary"] else "the calibrated test"
                    other = "the calibrated test" if v["primary"] else "the pre-registered bootstrap"
                    lines.append(
                        f"{family}, {measure}: {which} finds the predicted shift significant after Holm "
                        f"(one-sided p {fmt_p(p_pre if v['primary'] else p_cal, args.n_resamples)}), "
                        f"{other} does not (p {fmt_p(p_cal if v['primary'] else p_pre, args.n_resamples)})"
                        + (
                            "; with few seeds the bootstrap is over-confident (see the design check): "
                            "treat the shift as not established."
                            if v["primary"]
                            else "; the bootstrap is the pre-registered line and stays the headline."
                        )
                    )
            for key, label in (
                ("frame_plus", "d frame_plus"),
                ("frame_minus", "d frame_minus"),
                ("combined_directional", "combined d"),
            ):
                pre, calk = entry.get(key), cal.get(key)
                if not pre or not calk:
                    continue
                excl = [
                    all(math.isfinite(x) for x in ci) and (ci[0] > 0 or ci[1] < 0)
                    for ci in (pre["ci"], calk["ci"])
                ]
                if excl[0] != excl[1]:
                    lines.append(
                        f"{family}, {measure} ({role} items), {label}: the pre-registered 95 % CI "
                        f"{fmt_ci(pre['ci'])} {'excludes' if excl[0] else 'includes'} 0, the calibrated "
                        f"{fmt_ci(calk['ci'])} {'excludes' if excl[1] else 'includes'} 0."
                    )
    return lines


def headline_text(report: dict, sources: SourceIndex, args: argparse.Namespace) -> list[str]:
    primary = report["primary"]
    if not primary:
        phase = args.phase
        return [
            f"No target-item rows of the study arms at phase `{phase}`: no primary analysis (see Missing)."
        ]
    lines = []
    supported: dict[tuple[str, str], bool] = {}
    for key, reason in sorted((report.get("not_interpretable") or {}).get("target", {}).items()):
        family, measure = key.split("/", 1)
        if measure in HEADLINE_MEASURES and measure not in primary["families"].get(family, {}):
            supported[(family, measure)] = False  # no stance at all: left out of the statistics
            lines.append(f"- **{family}, {measure}**: {reason}; no statistics (see Parse rates).")
    for family, measures in sorted(primary["families"].items()):
        for measure in [m for m in HEADLINE_MEASURES if m in measures] or sorted(measures)[:1]:
            entry = measures[measure]
            comb = entry["combined_directional"]
            ref = sources.cite(f"{family} · {measure} · target", entry_sources(entry))
            if entry.get("not_interpretable"):
                supported[(family, measure)] = False
                lines.append(
                    f"- **{family}, {measure}**: {entry['not_interpretable']}; no d is reported [{ref}]."
                )
                continue
            if comb is None:
                lines.append(f"- **{family}, {measure}**: one framed arm only; no combined estimate [{ref}].")
                continue
            v = verdicts(primary, family, measure, args.sesoi_d)
            supported[(family, measure)] = v["meets_sesoi"]
            verdict = (
                "shift in the predicted direction (FRAME− above FRAME+), significant after Holm"
                if v["primary"]
                else "no reliable shift in the predicted direction"
            )
            cal = (entry.get("calibrated") or {}).get("combined_directional")
            beside = (
                f"; calibrated {fmt_ci(cal['ci'])}, p {fmt_p(cal['p_one_sided'], args.n_resamples)}, "
                f"{'significant' if v['calibrated'] else 'not significant'} after Holm"
                if cal
                else "; no calibrated interval (fewer than 2 complete items)"
            )
            lines.append(
                f"- **{family}, {measure}**: combined d = {fmt(comb['d'], why=d_reason(entry))} "
                f"{fmt_ci(comb['ci'], 'no finite bootstrap draw')}, one-sided p "
                f"{fmt_p(comb['p_one_sided'], args.n_resamples, 'no finite bootstrap draw')} → {verdict}"
                f"{beside} [{ref}]."
            )
            for arm in ("frame_plus", "frame_minus"):
                if entry.get(arm) and entry[arm]["tost"]["equivalent"]:
                    lines.append(f"  - {arm} vs neutral: equivalent within ±{args.sesoi_d} d (TOST) [{ref}].")
    flagged = (report.get("not_interpretable") or {}).get("target", {})
    headline = [
        m
        for m in HEADLINE_MEASURES
        if any(m in ms for ms in primary["families"].values()) or any(k.endswith(f"/{m}") for k in flagged)
    ]
    if supported and headline:
        every = all(supported.get((fam, m), False) for fam in primary["families"] for m in headline)
        lines.append(
            f"- **H1 (behavioural)**: {'supported' if every else 'not supported'} — criterion: in every "
            f"family, combined d ≥ {args.sesoi_d} and Holm-significant on "
            f"{' and '.join(headline)} (pre-registered line; a measure that is not interpretable counts as "
            "not significant)."
        )
    disagree = disagreement_lines(primary, "target", args)
    if disagree:
        lines.append("- **Where the pre-registered and the calibrated lines disagree**:")
        lines += [f"  - {line}" for line in disagree]
    else:
        lines.append("- **Pre-registered vs calibrated**: both lines reach the same conclusions.")
    return lines


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


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
                    *arm_cells(e, "frame_plus"),
                    *arm_cells(e, "frame_minus"),
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
            "d frame_plus [95% CI]",
            "calibrated CI plus",
            "TOST plus",
            "d frame_minus [95% CI]",
            "calibrated CI minus",
            "TOST minus",
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


# --------------------------------------------------------------------------------------------- outputs


def output_dir(args: argparse.Namespace) -> Path:
    """A fresh directory: --out if new/empty, else <first sweep>/analysis, analysis_2, …"""
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise AnalyzeError(f"output directory {out} exists and is not empty; nothing is overwritten")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path(args.sweeps[0]) / "analysis"
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"analysis_{n}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The analysis settings a preregistration lock fixes."""
    return {
        "n_resamples": args.n_resamples,
        "sesoi_d": args.sesoi_d,
        "alpha": args.alpha,
        "seed": args.seed,
        "welch_df": args.welch_df,
        "item_draw": args.item_draw,
        "phase": args.phase,
        "headline_measures": list(HEADLINE_MEASURES),
        "gate_d": GATE_D,
    }


def sweep_group(jobs: list[Job], sweeps: list[Path]) -> str:
    """The W&B group of the sweep's training runs: job.sweep when all jobs agree, else the directory name."""
    names = {job.card.get("job", {}).get("sweep") for job in jobs}
    if len(names) == 1 and None not in names:
        return str(names.pop())
    return "+".join(Path(s).resolve().name for s in sweeps)


def wandb_project(jobs: list[Job], args: argparse.Namespace) -> str:
    if args.wandb_project:
        return args.wandb_project
    for job in jobs:
        logger = (job.card.get("config") or {}).get("logger") or {}
        if isinstance(logger, dict) and logger.get("project"):
            return str(logger["project"])
    return os.environ.get("WANDB_PROJECT", "lbt")


def log_to_wandb(
    report: dict, figures: dict[str, Path], out_dir: Path, jobs: list[Job], args: argparse.Namespace
) -> str | None:
    """One analysis run in the sweep's W&B group: tables, figures, headline numbers. Returns its dir."""
    import wandb

    from lbt.loggers import wandb_mode

    mode, reason = wandb_mode(os.environ.get("WANDB_MODE", "auto"))
    if reason:
        print(
            f"W&B offline ({reason}): analysis run logged under {out_dir}/wandb; upload later with "
            f"`wandb sync {out_dir}/wandb/offline-run-*`",
            file=sys.stderr,
        )
    group = sweep_group(jobs, [Path(s) for s in args.sweeps])
    tags = ["analysis"] + (["exploratory"] if report["exploratory"] else [])
    try:
        run = wandb.init(
            project=wandb_project(jobs, args),
            group=group,
            job_type="analysis",
            name=f"analysis-{group}" + ("-exploratory" if report["exploratory"] else ""),
            dir=str(out_dir),
            mode=mode,
            tags=tags,
            config={
                "settings": report["settings"],
                "exploratory": report["exploratory"],
                "sweeps": report["sweeps"],
                "out_dir": str(out_dir),
            },
        )
        payload: dict[str, Any] = {}
        for name, (columns, rows) in wandb_tables(report).items():
            payload[f"tables/{name}"] = wandb.Table(columns=columns, data=rows)
        for name, path in figures.items():
            payload[f"figures/{name}"] = wandb.Image(str(path), caption=name)
        run.log(payload)
        for (family, measure), value in headline_numbers(report).items():
            run.summary[f"combined_d/{family}/{measure}"] = value
        run.summary["exploratory"] = report["exploratory"]
        return str(run.dir)
    finally:
        wandb.finish()


def wandb_tables(report: dict) -> dict[str, tuple[list[str], list[list[Any]]]]:
    exploratory = report["exploratory"]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    for name, stats in (("primary", report["primary"]), ("manipulation_check", report["manipulation_check"])):
        if not stats:
            continue
        rows = []
        for family, measures in sorted(stats["families"].items()):
            for measure, e in sorted(measures.items()):
                comb = e["combined_directional"] or {}
                holm = stats["holm"].get(measure, {}).get(family, {})
                arm = {a: (e[a] or {}) for a in ("frame_plus", "frame_minus")}
                rows.append(
                    [
                        family,
                        measure,
                        arm["frame_plus"].get("d"),
                        arm["frame_minus"].get("d"),
                        comb.get("d"),
                        *(comb.get("ci") or [None, None]),
                        comb.get("p_one_sided"),
                        holm.get("reject"),
                        e["n_items"],
                        e["n_seeds"],
                        exploratory,
                    ]
                )
        tables[name] = (
            [
                "family",
                "measure",
                "d_frame_plus",
                "d_frame_minus",
                "combined_d",
                "ci_low",
                "ci_high",
                "p_one_sided",
                "holm_reject",
                "n_items",
                "n_seeds",
                "exploratory",
            ],
            rows,
        )
    tables["gate"] = (
        ["family", "measure", "arm", "d", "passes"],
        [[g["family"], g["measure"], g["arm"], g["d"], g["passes"]] for g in report["manipulation_gate"]],
    )
    tables["capability"] = (
        ["family", "arm", "seed", "phase", "perplexity", "perplexity_rise", "mmlu_drop"],
        [
            [
                c["family"],
                c["arm"],
                c["seed"],
                c["phase"],
                c["perplexity"],
                c["perplexity_rise"],
                c["mmlu_drop"],
            ]
            for c in report["capability"]
        ],
    )
    tables["validity"] = (
        ["family", "arm", "seed", "phase", "item_set", "measure", "agreement", "n_items"],
        [
            [
                v["family"],
                v["arm"],
                v["seed"],
                v["phase"],
                v["item_set"],
                v["measure"],
                v["agreement"],
                v["n_items"],
            ]
            for v in report["validity"]
        ],
    )
    return tables


def headline_numbers(report: dict) -> dict[tuple[str, str], float]:
    out = {}
    for family, measures in (report["primary"] or {}).get("families", {}).items():
        for measure, e in measures.items():
            if e["combined_directional"]:
                out[(family, measure)] = e["combined_directional"]["d"]
    return out


# ------------------------------------------------------------------------------------------------- main


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument(
        "--sesoi-d", type=float, default=0.2, help="smallest effect size of interest in d units"
    )
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    parser.add_argument(
        "--welch-df", action="store_true", help="Welch df in TOST (default: n_arm + n_neutral − 2)"
    )
    parser.add_argument(
        "--item-draw",
        choices=["per_seed", "shared"],
        default="per_seed",
        help="bootstrap item draw: afresh within each seed (pre-registered) or shared by all seeds",
    )
    parser.add_argument(
        "--phase", default=PRIMARY_PHASE, help="phase of the primary analysis (default final)"
    )
    parser.add_argument(
        "--items-dir", default="data/eval", help="frozen item files (*.jsonl) the lock hashes"
    )


def lock_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbt.analyze prereg-lock",
        description="Lock the analysis settings and the frozen item files.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--out", default="prereg.lock.json")
    args = parser.parse_args(argv)
    try:
        lock = write_lock(Path(args.out), settings_from_args(args), Path(args.items_dir))
    except LockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: settings {lock['settings_sha256'][:12]}, {len(lock['items'])} item file(s) "
        f"{lock['items_sha256'][:12]}"
    )
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lbt.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", help="sweep directories (or job directories)")
    parser.add_argument("--out", help="output directory (new or empty; default <first sweep>/analysis)")
    parser.add_argument(
        "--exploratory",
        action="store_true",
        help="allow scoring target items without a matching lock; stamped on every output",
    )
    parser.add_argument("--lock", default="prereg.lock.json", help="preregistration lock file")
    parser.add_argument("--no-wandb", action="store_true", help="do not log an analysis run to W&B")
    parser.add_argument("--wandb-project", help="W&B project (default: the jobs' logger.project, else lbt)")
    parser.add_argument(
        "--min-parse-rate",
        type=float,
        default=0.8,
        help="a measure whose analysed rows parse below this share in some arm is not interpretable (0.8)",
    )
    parser.add_argument(
        "--design-studies", type=int, default=400, help="simulated studies of the design check (0: skip)"
    )
    parser.add_argument(
        "--design-resamples", type=int, default=1000, help="bootstrap resamples per simulated study"
    )
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def analyse(args: argparse.Namespace) -> tuple[dict, list[Job]]:
    sweeps = [Path(s) for s in args.sweeps]
    base = Path(os.path.commonpath([s.resolve().parent for s in sweeps]))

    def display(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), base)

    jobs = find_jobs(sweeps)
    rows = [row for job in jobs for row in load_rows(job, display)]
    lock_info = None
    settings = settings_from_args(args)
    if any(ITEM_SET_ROLES.get(r["item_set"]) == "target" for r in rows) and not args.exploratory:
        try:
            lock = check_lock(Path(args.lock), settings, Path(args.items_dir))
        except LockError as err:
            raise LockError(
                f"refusing to score target items: {err}. Run `python -m lbt.analyze prereg-lock` "
                "before scoring target items, or pass --exploratory (stamped on every output)."
            ) from None
        lock_info = {
            "path": str(args.lock),
            "settings_sha256": lock["settings_sha256"],
            "items_sha256": lock["items_sha256"],
            "created": lock.get("created"),
        }
    notes: list[str] = []
    rates = parse_rates(rows)
    primary = run_stats(analysable_rows(rows, "target", args.phase, notes), args, notes)
    manipulation = run_stats(analysable_rows(rows, "source", args.phase, notes), args, notes)
    uninterpretable: dict[str, dict[str, str]] = {}
    for stats, role in ((primary, "target"), (manipulation, "source")):
        reasons = not_interpretable(rates, role, args.phase, args.min_parse_rate)
        uninterpretable[role] = {
            f"{family}/{measure}": reason for (family, measure), reason in reasons.items()
        }
        for (family, measure), reason in reasons.items():
            entry = (stats or {}).get("families", {}).get(family, {}).get(measure)
            if entry is not None:
                entry["not_interpretable"] = reason
    checks = design_checks(primary, args)
    descriptive = describe(rows)
    probes = load_probes(jobs, display)
    report = {
        "lbt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exploratory": bool(args.exploratory),
        "exploratory_note": EXPLORATORY_STAMP if args.exploratory else None,
        "sweeps": [str(s) for s in args.sweeps],
        "paths_relative_to": str(base),
        "settings": settings,
        "lock": lock_info,
        "jobs": [
            {
                "path": display(j.path),
                "family": j.family,
                "arm": j.arm,
                "seed": j.seed,
                "status": j.status,
                "done": j.done,
                "phases": j.phases,
            }
            for j in jobs
        ],
        "primary": primary,
        "manipulation_check": manipulation,
        "manipulation_gate": gate_table(manipulation),
        "design_check": checks,
        "not_interpretable": uninterpretable,
        "parse_rates": rates,
        "report_settings": {  # not part of the preregistration lock
            "min_parse_rate": args.min_parse_rate,
            "design_studies": args.design_studies,
            "design_resamples": args.design_resamples,
        },
        "projection_shift": projection_summary(probes, args.phase),
        "dynamics": {
            "stance": stance_dynamics(descriptive),
            "projection_at_l_star": projection_dynamics(probes),
        },
        "capability": load_capability(jobs, display),
        "validity": validity_from_rows(rows),
        "validity_summaries": load_validity(jobs, display),
        "judge_consistency": load_judge_consistency(sweeps, display),
        "descriptive": descriptive,
        "missing": missing_report(jobs, descriptive, probes),
        "notes": notes,
        "warnings": [f"target items: {w}" for w in (primary or {}).get("warnings", [])]
        + [f"source items: {w}" for w in (manipulation or {}).get("warnings", [])],
        "figures": [],
    }
    return report, jobs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prereg-lock":
        return lock_main(argv[1:])
    args = parse_args(argv)
    try:
        report, jobs = analyse(args)
        out_dir = output_dir(args)
    except (AnalyzeError, LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lbt.analyze.figures import make_figures  # matplotlib only when figures are drawn

    figures = make_figures(report, out_dir / "figures", args)
    report["figures"] = sorted(figures)
    write_markdown(report, args, out_dir / "report.md")
    with open(out_dir / "report.json", "x", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    for line in missing_lines(report["missing"]):
        print(f"missing: {line}", file=sys.stderr)
    print(
        f"wrote {out_dir}/report.json, report.md and {len(figures)} figure(s)"
        + (" [EXPLORATORY]" if report["exploratory"] else "")
    )
    if not args.no_wandb:  # after the report is written: a W&B failure cannot lose it
        log_to_wandb(report, figures, out_dir, jobs, args)
    return 0

