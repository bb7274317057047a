"""The Summary of report.md: each headline measure's verdict, H1, and where the pre-registered and the
calibrated lines disagree."""

from __future__ import annotations

import argparse
import math

from lbt.analyze.text import SourceIndex, d_reason, entry_sources, fmt, fmt_ci, fmt_p
from lbt.study import FRAMED_ARMS, HEADLINE_MEASURES


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
                *((arm, f"d {arm}") for arm in FRAMED_ARMS),
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
    """The Summary's lines: each family's headline measures, H1, and the two lines compared."""
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
            for arm in FRAMED_ARMS:
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
