"""The statistics of the report: which rows enter `lbt.stats.primary_report`, the manipulation gate and the
design check (studies simulated with this sweep's own variance components)."""

from __future__ import annotations

import argparse
import math
import warnings
from collections import defaultdict
from typing import Any

from lbt.analyze.collect import ITEM_SET_ROLES, AnalyzeError
from lbt.stats import StatsInputError, StatsWarning, primary_report
from lbt.study import FRAMED_ARMS, GATE_D, HEADLINE_MEASURES, PREDICTED_SIGN, REFERENCE_ARM, STUDY_ARMS


def analysable_rows(
    rows: list[dict[str, Any]], role: str, phase: str, notes: list[str]
) -> list[dict[str, Any]]:
    """Study-arm rows of one item-set role at one phase, without (family, measure) groups the statistics
    cannot use: no neutral arm, no framed arm, or an arm without any numeric stance."""
    selected = [
        r
        for r in rows
        if r["arm"] in STUDY_ARMS
        and isinstance(r["seed"], int)
        and ITEM_SET_ROLES.get(r["item_set"]) == role
        and r["phase"] == phase
    ]
    arms_by_group: dict[tuple, set] = defaultdict(set)
    finite: dict[tuple, bool] = defaultdict(bool)
    for r in selected:
        arms_by_group[(r["family"], r["measure"])].add(r["arm"])
        finite[(r["family"], r["measure"], r["arm"])] |= math.isfinite(r["stance"])
    keep = set()
    for (family, measure), arms in sorted(arms_by_group.items()):
        no_stance = sorted(arm for arm in arms if not finite[(family, measure, arm)])
        if REFERENCE_ARM not in arms or len(arms) < 2:
            notes.append(
                f"{role} items, family {family!r}, measure {measure!r}: arms {sorted(arms)} — the statistics "
                "need neutral and at least one framed arm; left out"
            )
        elif no_stance:
            notes.append(
                f"{role} items, family {family!r}, measure {measure!r}: arm(s) {no_stance} have no numeric "
                "stance (e.g. open_ended before judging); left out"
            )
        else:
            keep.add((family, measure))
    return [r for r in selected if (r["family"], r["measure"]) in keep]


def run_stats(rows: list[dict[str, Any]], args: argparse.Namespace, notes: list[str]) -> dict | None:
    """lbt.stats.primary_report on the rows (None without rows); its warnings stay in the result."""
    if not rows:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StatsWarning)  # primary_report returns them in "warnings"
        try:
            return primary_report(
                rows,
                n_resamples=args.n_resamples,
                sesoi_d=args.sesoi_d,
                alpha=args.alpha,
                seed=args.seed,
                welch_df=args.welch_df,
                item_draw=args.item_draw,
            )
        except StatsInputError as err:
            raise AnalyzeError(str(err)) from None


def gate_table(manipulation: dict | None) -> list[dict[str, Any]]:
    """Manipulation check: source-item d of each framed arm, passing at |d| ≥ 0.5 with the predicted sign."""
    if not manipulation:
        return []
    table = []
    for family, measures in sorted(manipulation["families"].items()):
        for measure, entry in sorted(measures.items()):
            for arm, sign in PREDICTED_SIGN.items():
                if entry.get(arm) is None:
                    continue
                d = entry[arm]["d"]
                if entry.get("not_interpretable"):
                    d = math.nan
                table.append(
                    {
                        "family": family,
                        "measure": measure,
                        "arm": arm,
                        "d": d,
                        "ci": entry[arm]["ci"],
                        "predicted_sign": "−" if sign < 0 else "+",
                        "passes": bool(math.isfinite(d) and sign * d >= GATE_D),
                    }
                )
    return table


def design_checks(stats: dict | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per family × headline measure: simulate studies of this sweep's design with its own variance
    components; each method's coverage and false-positive rate (lbt.stats.variance.design_check)."""
    from lbt.stats.variance import Components, design_check

    if not stats or args.design_studies <= 0:
        return []
    checks = []
    for family, measures in sorted(stats["families"].items()):
        for measure in [m for m in HEADLINE_MEASURES if m in measures]:
            entry = measures[measure]
            info = entry.get("variance_components") or {}
            check: dict[str, Any] = {
                "family": family,
                "measure": measure,
                "components": info.get("components"),
            }
            if entry.get("not_interpretable"):
                check["skipped"] = entry["not_interpretable"]
            elif not info.get("components"):
                check["skipped"] = "; ".join(info.get("notes") or ["variance components not estimable"])
            elif info["n_seeds"] < 2:
                check["skipped"] = "one seed: the seed variance cannot be estimated"
            else:
                effect = tuple(
                    float(entry[arm]["d"]) if entry.get(arm) and math.isfinite(entry[arm]["d"]) else 0.0
                    for arm in FRAMED_ARMS
                )
                check.update(
                    design_check(
                        Components(**info["components"]),
                        info["n_seeds"],
                        info["n_items"],
                        effect,  # type: ignore[arg-type]
                        n_studies=args.design_studies,
                        n_resamples=args.design_resamples,
                        alpha=args.alpha,
                        seed=args.seed,
                        item_draw=args.item_draw,
                    )
                )
            checks.append(check)
    return checks
