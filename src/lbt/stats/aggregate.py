"""Rows → one stance per (arm, seed, base item): the unit every statistic in lbt.stats works on.

A *row* is one scored presentation (one paraphrase, one option order, one contrast template) of one
item; the analysis first averages rows to a *cell* value per (family, measure, arm, seed, base_item).
Rows whose stance is NaN (unparsed answer) are excluded from that mean and counted; a cell with no
finite stance at all stays NaN and is excluded from every later mean and SD (and counted too).

Cell means use `math.fsum`, which is correctly rounded and therefore independent of row order: any
other implementation of the same definition (e.g. the benchmark's plain loop) gets bit-identical
values.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lbt.study import FRAMED_ARMS, REFERENCE_ARM, STUDY_ARMS  # noqa: F401  (re-exported for the stats package)

REQUIRED_KEYS = ("family", "arm", "seed", "base_item", "domain", "measure", "stance")
IN_MEMORY = "<rows passed in memory>"


class StatsInputError(ValueError):
    """Rows the statistics cannot use; the message names the job directory / rows file when known."""


class StatsWarning(UserWarning):
    """A degenerate but usable input (single seed, seeds missing from an arm, empty cells)."""


def row_source(row: Mapping[str, Any]) -> str:
    """Where a row came from: its rows file or job directory, if the loader recorded one."""
    for key in ("source", "job_dir", "job"):
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return IN_MEMORY


def as_stance(value: Any) -> float:
    """Stance as float; None and NaN both mean 'unparsed'."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"stance must be a number or NaN, got {value!r}")
    return float(value)


@dataclass
class CellTable:
    """Cell values of one (family, measure): `values[arm, seed, item]`, NaN where a cell has no stance."""

    family: str
    measure: str
    arms: tuple[str, ...]
    seeds: tuple[Any, ...]
    items: tuple[Any, ...]
    values: np.ndarray
    n_rows: dict[str, int]
    n_nan_rows: dict[str, int]
    n_empty_cells: dict[str, int]
    sources: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def arm_values(self, arm: str) -> list[float]:
        """The arm's finite cell values, flattened over seeds and items."""
        flat = self.values[self.arms.index(arm)].ravel()
        return [float(v) for v in flat if math.isfinite(v)]


def _row_error(index: int, row: Any) -> StatsInputError:
    """The first problem of a row the fast path rejected, naming where it came from."""
    if not isinstance(row, Mapping):
        return StatsInputError(f"row {index} is a {type(row).__name__}, not a mapping")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        return StatsInputError(
            f"row {index} from {row_source(row)} lacks required key(s) {missing} "
            f"(required: {list(REQUIRED_KEYS)})"
        )
    if row["arm"] not in STUDY_ARMS:
        return StatsInputError(
            f"row {index} from {row_source(row)}: arm {row['arm']!r} is not a study arm {STUDY_ARMS}; "
            "filter non-study arms (e.g. 'base') out before the primary statistics"
        )
    try:
        as_stance(row["stance"])
    except TypeError as err:
        return StatsInputError(f"row {index} from {row_source(row)}: {err}")
    return StatsInputError(f"row {index} from {row_source(row)} cannot be used")


def collect_cells(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[tuple, list], dict[tuple, set]]:
    """One pass over the rows: check them, and group finite stances per (family, measure, arm, seed,
    base_item) as `[finite stances, NaN count]`; sources per (family, measure, arm)."""
    cells: dict[tuple, list] = {}
    sources: dict[tuple, set] = defaultdict(set)
    item_sets: set = set()
    phases: set = set()
    index = -1
    for index, row in enumerate(rows):
        try:
            family, measure, arm = row["family"], row["measure"], row["arm"]
            key = (family, measure, arm, row["seed"], row["base_item"])
            _ = row["domain"]  # required by the row format, though the statistics do not use it
            stance = row["stance"]
        except (KeyError, TypeError):
            raise _row_error(index, row) from None
        if arm not in STUDY_ARMS:
            raise _row_error(index, row)
        if type(stance) is not float:  # fast path for the usual float; everything else checked
            try:
                stance = as_stance(stance)
            except TypeError:
                raise _row_error(index, row) from None
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = [[], 0]
        if math.isfinite(stance):
            cell[0].append(stance)
        else:
            cell[1] += 1
        get = row.get
        sources[(family, measure, arm)].add(get("source") or get("job_dir") or get("job") or IN_MEMORY)
        item_sets.add(get("item_set"))
        phases.add(get("phase"))
    if index < 0:
        raise StatsInputError("no rows given")
    for tag, seen in (("item_set", item_sets), ("phase", phases)):
        seen.discard(None)
        if len(seen) > 1:
            raise StatsInputError(
                f"rows mix several {tag}s {sorted(map(str, seen))}; pass one {tag} at a time"
            )
    return cells, sources


def _sort_key(value: Any) -> tuple:
    """Numbers in numeric order, everything else by its text (seeds and base items may be either)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def _seed_union(family: str, measure: str, seeds_by_arm: dict[str, set], notes: list[str]) -> list:
    """All seeds of any arm. An arm without some seed (a partial sweep) has empty cells there: its mean
    uses the seeds it has, and bootstrap resamples simply draw nothing for it from those seed slots."""
    union = set().union(*seeds_by_arm.values())
    lacking = {arm: sorted(union - s, key=_sort_key) for arm, s in seeds_by_arm.items() if union - s}
    if lacking:
        message = (
            f"family {family!r}, measure {measure!r}: seeds missing from some arms {lacking}; "
            "those cells are empty, seed pairing across arms is partial"
        )
        warnings.warn(message, StatsWarning, stacklevel=3)
        notes.append(message)
    return sorted(union, key=_sort_key)


def _check_item_sets(family: str, measure: str, items_by_arm_seed: dict, sources: dict) -> list:
    union = set().union(*items_by_arm_seed.values())
    for (arm, seed), items in sorted(items_by_arm_seed.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if items != union:
            missing = sorted(map(str, union - items))
            raise StatsInputError(
                f"family {family!r}, measure {measure!r}: mismatched item sets between arms — "
                f"arm {arm!r} seed {seed!r} lacks base items {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''} (rows from {', '.join(sorted(sources[arm])[:3])})"
            )
    return sorted(union, key=_sort_key)


def aggregate_cells(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], CellTable]:
    """Average rows to cells and arrange them per (family, measure) as arm × seed × item arrays."""
    cells, sources = collect_cells(rows)
    groups: dict[tuple[str, str], dict[tuple, list]] = defaultdict(dict)
    for (family, measure, arm, seed, item), cell in cells.items():
        groups[(family, measure)][(arm, seed, item)] = cell
    return {
        key: _table(key[0], key[1], group, {arm: sources[(*key, arm)] for arm in STUDY_ARMS})
        for key, group in sorted(groups.items())
    }


def _table(family: str, measure: str, group: dict[tuple, list], sources: dict[str, set]) -> CellTable:
    notes: list[str] = []
    arms = tuple(arm for arm in STUDY_ARMS if any(key[0] == arm for key in group))
    seeds_by_arm: dict[str, set] = defaultdict(set)
    items_by_arm_seed: dict[tuple, set] = defaultdict(set)
    for arm, seed, item in group:
        seeds_by_arm[arm].add(seed)
        items_by_arm_seed[(arm, seed)].add(item)
    if REFERENCE_ARM not in arms:
        raise StatsInputError(
            f"family {family!r}, measure {measure!r}: no neutral arm (arms present: {list(arms)}; "
            f"rows from {', '.join(sorted(set().union(*sources.values()))[:3])})"
        )
    if len(arms) < 2:
        raise StatsInputError(
            f"family {family!r}, measure {measure!r}: only one arm ({arms[0]}) — nothing to compare "
            f"(rows from {', '.join(sorted(sources[arms[0]])[:3])})"
        )
    items = _check_item_sets(family, measure, items_by_arm_seed, sources)
    seeds = _seed_union(family, measure, dict(seeds_by_arm), notes)
    values = np.full((len(arms), len(seeds), len(items)), np.nan)
    n_rows = dict.fromkeys(arms, 0)
    n_nan = dict.fromkeys(arms, 0)
    seed_pos = {seed: i for i, seed in enumerate(seeds)}
    item_pos = {item: i for i, item in enumerate(items)}
    for (arm, seed, item), (finite, n_nan_rows) in group.items():
        n_rows[arm] += len(finite) + n_nan_rows
        n_nan[arm] += n_nan_rows
        if finite:
            values[arms.index(arm), seed_pos[seed], item_pos[item]] = math.fsum(finite) / len(finite)
    n_empty = {
        arm: int(np.isnan(values[i][[seed_pos[sd] for sd in seeds_by_arm[arm]]]).sum())
        for i, arm in enumerate(arms)
    }
    for arm, count in n_empty.items():
        if count:
            message = (
                f"family {family!r}, measure {measure!r}, arm {arm!r}: {count} (seed, base item) cell(s) "
                "have no parsed stance and are excluded"
            )
            warnings.warn(message, StatsWarning, stacklevel=3)
            notes.append(message)
        if np.isnan(values[arms.index(arm)]).all():
            raise StatsInputError(
                f"family {family!r}, measure {measure!r}, arm {arm!r}: no parsed stance at all "
                f"(rows from {', '.join(sorted(sources[arm])[:3])})"
            )
    return CellTable(
        family=family,
        measure=measure,
        arms=arms,
        seeds=tuple(seeds),
        items=tuple(items),
        values=values,
        n_rows=n_rows,
        n_nan_rows=n_nan,
        n_empty_cells=n_empty,
        sources={arm: sorted(sources[arm]) for arm in arms},
        notes=notes,
    )
