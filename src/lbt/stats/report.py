"""The pre-registered primary analysis: `primary_report(rows)`.

Pipeline per (family, measure):
1. rows → cells, one stance per (arm, seed, base item), averaging templates, orders and paraphrases;
   NaN stances excluded and counted (`aggregate`);
2. point estimates d(plus), d(minus) and combined = (d_minus − d_plus)/2, standardised by
   the neutral arm's cell-level SD, ddof=1 (`effect_size`);
3. hierarchical bootstrap (seeds, then items within each drawn seed, one draw shared by all arms):
   percentile CIs at level 1 − alpha, one-sided p of the combined estimate = share of draws ≤ 0
   (`bootstrap`); p = 0 means "below 1 / n_resamples";
4. TOST of each framed arm against neutral at ±sesoi_d (`tost`);
5. per measure, Holm across families of the combined estimate's one-sided p (`holm`).

Each (family, measure) bootstraps with its own random stream derived from (seed, family, measure), so
its numbers do not depend on which other families or measures are in `rows`.
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lbt.stats.aggregate import FRAMED_ARMS, CellTable, StatsWarning, aggregate_cells
from lbt.stats.bootstrap import ItemDraw, bootstrap_effects, percentile_ci, share_at_or_below_zero
from lbt.stats.calibrated import calibrated_table
from lbt.stats.effect_size import combined_directional, effect_size, sample_sd
from lbt.stats.holm import holm
from lbt.stats.tost import tost
from lbt.stats.variance import table_components
from lbt.study import MINUS, PLUS, REFERENCE_ARM


def stream_for(seed: int, family: str, measure: str) -> np.random.Generator:
    """A random stream per (seed, family, measure), stable across runs and Python processes."""
    return np.random.default_rng([seed, zlib.crc32(f"{family}\x00{measure}".encode())])


def _arm_entry(
    table: CellTable,
    arm: str,
    d: float,
    draws: np.ndarray,
    level: float,
    sesoi_d: float,
    alpha: float,
    welch_df: bool,
) -> dict:
    result = tost(table.arm_values(arm), table.arm_values(REFERENCE_ARM), sesoi_d, alpha, welch_df)
    lo, hi = percentile_ci(draws, level)
    return {
        "d": d,
        "ci": [float(lo), float(hi)],
        "tost": {"p_lower": result.p_lower, "p_upper": result.p_upper, "equivalent": result.equivalent},
    }


def analyse_table(
    table: CellTable,
    n_resamples: int,
    sesoi_d: float,
    alpha: float,
    seed: int,
    welch_df: bool = False,
    item_draw: ItemDraw = "per_seed",
) -> dict:
    """All estimates for one (family, measure)."""
    notes = list(table.notes)
    seed_level = len(table.seeds) > 1
    if not seed_level:
        message = (
            f"family {table.family!r}, measure {table.measure!r}: a single seed ({table.seeds[0]!r}) — "
            "seed-level resampling is degenerate; falling back to item-level resampling (CIs ignore "
            "seed-to-seed variation)"
        )
        warnings.warn(message, StatsWarning, stacklevel=2)
        notes.append(message)
    level = 1 - alpha
    neutral = table.arm_values(REFERENCE_ARM)
    point = {arm: effect_size(table.arm_values(arm), neutral) for arm in FRAMED_ARMS if arm in table.arms}
    draws = bootstrap_effects(
        table.values,
        table.arms,
        n_resamples,
        stream_for(seed, table.family, table.measure),
        seed_level=seed_level,
        item_draw=item_draw,
    )
    entry: dict[str, Any] = {arm: None for arm in FRAMED_ARMS}
    for arm, d in point.items():
        entry[arm] = _arm_entry(table, arm, d, draws[arm], level, sesoi_d, alpha, welch_df)
    if "combined" in draws:
        lo, hi = percentile_ci(draws["combined"], level)
        entry["combined_directional"] = {
            "d": combined_directional(point[PLUS.name], point[MINUS.name]),
            "ci": [float(lo), float(hi)],
            "p_one_sided": float(share_at_or_below_zero(draws["combined"])),
        }
    else:
        entry["combined_directional"] = None
        notes.append(
            f"family {table.family!r}, measure {table.measure!r}: combined estimate needs both "
            f"framed arms (present: {list(table.arms)})"
        )
    components, component_info = table_components(table)
    entry.update(
        calibrated=calibrated_table(table, alpha, seed),
        variance_components={
            "components": components.as_dict() if components else None,
            "sigma_total": components.sigma_total if components else None,
            **component_info,
        },
        n_items=len(table.items),
        n_seeds=len(table.seeds),
        seeds=list(table.seeds),
        resampling="seed_then_item" if seed_level else "item_only",
        means={arm: float(np.nanmean(table.values[i])) for i, arm in enumerate(table.arms)},
        neutral_sd=sample_sd(neutral),
        n_rows=table.n_rows,
        nan_excluded=table.n_nan_rows,
        empty_cells=table.n_empty_cells,
        sources=table.sources,
        notes=notes,
    )
    return entry


def primary_report(
    rows: Iterable[Mapping[str, Any]],
    n_resamples: int = 10000,
    sesoi_d: float = 0.2,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    welch_df: bool = False,
    item_draw: ItemDraw = "per_seed",
) -> dict:
    """The pre-registered statistics for rows of one item set and phase.

    Each row needs `family, arm (plus|minus|neutral), seed, base_item, domain, measure,
    stance`; an optional `source` (rows file or job directory) is quoted in errors and in the output.
    `welch_df=True` uses Welch's df in TOST; `item_draw="shared"` applies one item draw to every seed
    slot as well as every arm (a sensitivity analysis, see docs/statistics.md; the pre-registered
    default redraws items within each seed).

    Returns `{"settings", "families": {family: {measure: {...}}}, "holm": {measure: {family: {p,
    threshold, reject}}}, "nan_counts", "warnings"}`; each family × measure entry holds `plus`
    and `minus` (`{d, ci, tost: {p_lower, p_upper, equivalent}}`, None when the arm is absent),
    `combined_directional` (`{d, ci, p_one_sided}`, None unless both framed arms are present),
    `n_items`, `n_seeds`, and bookkeeping: seeds, resampling, means, neutral_sd, n_rows, nan_excluded,
    empty_cells, sources, notes; and beside the pre-registered line, `calibrated` (per framed arm and
    combined: `{d, ci, df, p_one_sided, p_two_sided, n_seeds, n_items, ...}`, lbt.stats.calibrated)
    and `variance_components` (lbt.stats.variance). `calibrated_holm` is Holm on the calibrated
    combined p-values.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StatsWarning)
        tables = aggregate_cells(rows)
        families: dict[str, dict] = defaultdict(dict)
        for (family, measure), table in tables.items():
            families[family][measure] = analyse_table(
                table, n_resamples, sesoi_d, alpha, seed, welch_df, item_draw
            )
    messages = [str(w.message) for w in caught if issubclass(w.category, StatsWarning)]
    for message in messages:  # re-emit so callers see them even though we recorded them
        warnings.warn(message, StatsWarning, stacklevel=2)
    measures = sorted({measure for per_family in families.values() for measure in per_family})
    holm_by_measure = {}
    for measure in measures:
        pvalues = {
            family: (per_family[measure]["combined_directional"] or {}).get("p_one_sided")
            for family, per_family in families.items()
            if measure in per_family
        }
        holm_by_measure[measure] = holm(pvalues, alpha)
    calibrated_holm = {}
    for measure in measures:
        pvalues = {
            family: ((per_family[measure]["calibrated"] or {}).get("combined_directional") or {}).get(
                "p_one_sided"
            )
            for family, per_family in families.items()
            if measure in per_family
        }
        calibrated_holm[measure] = holm(pvalues, alpha)
    return {
        "settings": {
            "n_resamples": n_resamples,
            "sesoi_d": sesoi_d,
            "alpha": alpha,
            "ci_level": 1 - alpha,
            "seed": seed,
            "tost_df": "welch" if welch_df else "pooled",
            "standardiser": "neutral cell-level SD (ddof=1) over (seed, base item) cells",
            "bootstrap": "seeds with replacement, then base items within each drawn seed; "
            "one draw for all arms",
            "item_draw": item_draw,
            "calibrated": "beside the pre-registered line, not instead of it: "
            "crossed seed × item random effects, small-sample df (lbt.stats.calibrated)",
        },
        "families": dict(families),
        "holm": holm_by_measure,
        "calibrated_holm": calibrated_holm,
        "nan_counts": {
            family: {measure: entry["nan_excluded"] for measure, entry in per_family.items()}
            for family, per_family in families.items()
        },
        "warnings": messages,
    }
