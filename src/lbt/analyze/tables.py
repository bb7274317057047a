"""The report's descriptive tables, built from the rows and probe records `collect` read: mean stance per
job, stance and projection dynamics, projection shift by layer, parse rates, measure validity."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from lbt.analyze.collect import ITEM_SET_ROLES
from lbt.study import CONTINUOUS_MEASURES, STUDY_ARMS, phase_key

NOT_SCORED = ("open_ended",)  # stance NaN until judged (the judge's rows are measure `judge`)


def table_order(family: Any, arm: Any, seed: Any, phase: str, *rest: str) -> tuple:
    """Sort key of a table's rows: family, arm, seed (none first), phase in order, then the rest."""
    return (str(family), str(arm), seed if isinstance(seed, int) else -1, phase_key(phase), *rest)


def describe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean stance per (family, arm, seed, phase, item set, measure): the descriptive table."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    sources: dict[tuple, str] = {}
    for row in rows:
        key = (row["family"], row["arm"], row["seed"], row["phase"], row["item_set"], row["measure"])
        groups[key].append(row["stance"])
        sources[key] = row["source"]
    table = []
    for key, stances in sorted(groups.items(), key=lambda kv: table_order(*kv[0])):
        finite = [s for s in stances if math.isfinite(s)]
        table.append(
            dict(
                zip(("family", "arm", "seed", "phase", "item_set", "measure"), key),
                n_rows=len(stances),
                n_nan=len(stances) - len(finite),
                mean_stance=(math.fsum(finite) / len(finite)) if finite else None,
                source=sources[key],
            )
        )
    return table


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(values) / len(values) if values else None


def phase_means(phases: dict[str, list[float]]) -> dict[str, float | None]:
    """Phase → mean of its finite values, phases in order."""
    return {ph: mean(v) for ph, v in sorted(phases.items(), key=lambda kv: phase_key(kv[0]))}


def stance_dynamics(descriptive: list[dict[str, Any]]) -> dict[str, dict]:
    """Target stance per family → measure → arm → phase, mean over seeds of each job's mean."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for row in descriptive:
        if row["arm"] in STUDY_ARMS and ITEM_SET_ROLES.get(row["item_set"]) == "target":
            acc[row["family"]][row["measure"]][row["arm"]][row["phase"]].append(row["mean_stance"])
    return {
        fam: {
            m: {
                arm: phase_means(phases)
                for arm, phases in arms.items()
            }
            for m, arms in measures.items()
        }
        for fam, measures in acc.items()
    }


def projection_summary(probes: list[dict[str, Any]], phase: str) -> dict[str, dict]:
    """Per family → arm: per-layer shift at `phase`, mean over seeds, with SE across seeds (or the
    probe's own SE when there is one seed), and the sources."""
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for rec in probes:
        if rec["phase"] == phase:
            grouped[rec["family"]][rec["arm"]].append(rec)
    out: dict = {}
    for family, arms in grouped.items():
        out[family] = {}
        for arm, recs in arms.items():
            n_layers = min(len(r["shift"]) for r in recs)
            shift = [mean([r["shift"][i] for r in recs]) for i in range(n_layers)]
            if len(recs) > 1:
                se = [
                    math.sqrt(
                        sum((r["shift"][i] - shift[i]) ** 2 for r in recs) / (len(recs) - 1) / len(recs)
                    )
                    for i in range(n_layers)
                ]
            else:
                se = recs[0]["shift_se"][:n_layers]
            out[family][arm] = {
                "layers": recs[0]["layers"][:n_layers],
                "shift": shift,
                "se": se,
                "l_star": recs[0]["l_star"],
                "n_seeds": len(recs),
                "sources": sorted(r["source"] for r in recs),
            }
    return out


def projection_dynamics(probes: list[dict[str, Any]]) -> dict[str, dict]:
    """Per family → arm → phase: projection of the answer position at ℓ*, mean over seeds."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for rec in probes:
        if rec["arm"] in STUDY_ARMS and 0 <= rec["l_star"] < len(rec["projection"]):
            acc[rec["family"]][rec["arm"]][rec["phase"]].append(rec["projection"][rec["l_star"]])
    return {
        fam: {
            arm: phase_means(phases)
            for arm, phases in arms.items()
        }
        for fam, arms in acc.items()
    }


def parse_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Share of rows with a parsed (finite) stance per (family, arm, phase, item set, measure), over
    seeds; open_ended is not scored until judged and has no parse rate."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        key = (row["family"], row["arm"], row["phase"], row["item_set"], row["measure"])
        counts[key][0] += 1
        counts[key][1] += math.isfinite(row["stance"])
    table = []
    for (family, arm, phase, item_set, measure), (n_rows, n_parsed) in sorted(
        counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), phase_key(kv[0][2]), kv[0][3], kv[0][4])
    ):
        table.append(
            {
                "family": family,
                "arm": arm,
                "phase": phase,
                "item_set": item_set,
                "measure": measure,
                "n_rows": n_rows,
                "n_parsed": n_parsed,
                "parse_rate": None if measure in NOT_SCORED else n_parsed / n_rows,
            }
        )
    return table


def not_interpretable(
    rates: list[dict[str, Any]], role: str, phase: str, min_rate: float
) -> dict[tuple[str, str], str]:
    """(family, measure) → the reason its statistics are not interpretable: an arm of the analysis
    parsed fewer than `min_rate` of its rows."""
    out: dict[tuple[str, str], str] = {}
    for r in rates:
        if (
            r["arm"] in STUDY_ARMS
            and r["phase"] == phase
            and ITEM_SET_ROLES.get(r["item_set"]) == role
            and r["parse_rate"] is not None
            and r["parse_rate"] < min_rate
        ):
            key = (r["family"], r["measure"])
            low = f"{r['arm']} parsed {r['n_parsed']} of {r['n_rows']} rows ({100 * r['parse_rate']:.0f} %)"
            out[key] = f"{out[key]}; {low}" if key in out else low
    return {
        key: f"not interpretable: {why}, below the {100 * min_rate:.0f} % parse rate required"
        for key, why in out.items()
    }


def _item_means(rows: list[dict[str, Any]]) -> dict[Any, float]:
    values: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        if math.isfinite(row["stance"]):
            values[row["item_id"]].append(row["stance"])
    return {item: math.fsum(v) / len(v) for item, v in values.items()}


def validity_from_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure validity per job, phase and item set from the rows on disk (the judge's included):
    the share of items whose continuous measure's sign agrees with the model's own greedy forced
    choice, both averaged over the item's rows; items whose forced choice is undecided (no parsed
    answer, or the orders cancel) or whose measure is 0/missing are left out and the number compared
    is reported (the definition of lbt.eval.summary.measure_validity)."""
    grouped: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        key = (row["family"], row["arm"], row["seed"], row["phase"], row["item_set"])
        grouped[key][row["measure"]].append(row)
    table = []
    for (family, arm, seed, phase, item_set), by_measure in grouped.items():
        if not by_measure.get("forced_choice"):
            continue
        choice = {i: m for i, m in _item_means(by_measure["forced_choice"]).items() if m != 0}
        for measure in CONTINUOUS_MEASURES:
            if not by_measure.get(measure):
                continue
            means = _item_means(by_measure[measure])
            compared = [i for i in choice if means.get(i, 0.0) != 0.0]
            agree = sum((means[i] > 0) == (choice[i] > 0) for i in compared)
            sources = sorted({r["source"] for r in by_measure[measure] + by_measure["forced_choice"]})
            table.append(
                {
                    "family": family,
                    "arm": arm,
                    "seed": seed,
                    "phase": phase,
                    "item_set": item_set,
                    "measure": measure,
                    "agreement": agree / len(compared) if compared else None,
                    "n_items": len(compared),
                    "n_choice_decided": len(choice),
                    "source": "; ".join(sources),
                }
            )
    return sorted(
        table,
        key=lambda v: table_order(v["family"], v["arm"], v["seed"], v["phase"], v["item_set"], v["measure"]),
    )
