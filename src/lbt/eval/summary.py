"""Phase summaries of battery rows: mean stance per measure, per domain and per order, parse rates, and
the measure-validity table.

Means are aggregated with `StanceMetric`, a torchmetrics Metric whose states are fixed-shape sums and
counts (domains × orders) reduced with "sum": under DDP every rank scores its own shard of items, updates
its metric, and `compute()` adds the shards — the same numbers as one process scoring everything.

Measure validity (the study's reason to distrust `logprob`): for each continuous measure, the fraction
of items whose sign agrees with the model's own greedy forced choice. Both are first averaged over the
item's rows (both orders, and for `logprob` the 4 contrast templates); items where the forced choice is
undecided (unparsed, or one letter in both orders so the orders cancel) or the measure's mean is 0/NaN
are left out, and the number of items compared is reported beside the fraction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from lbt import wandb_keys as keys
from lbt.study import CONTINUOUS_MEASURES, ORDERS, PARSED_MEASURES


class StanceMetric(Metric):
    """Sum and count of stance per (domain, order) cell, plus row and parse counts; all states are sums."""

    full_state_update = False

    def __init__(self, domains: Sequence[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.domains = list(domains)
        self.domain_index = {d: k for k, d in enumerate(self.domains)}
        shape = (len(self.domains), len(ORDERS))
        for name in ("stance_sum", "scored", "parsed", "rows"):
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        unknown = sorted({r["domain"] for r in rows} - set(self.domain_index))
        if unknown:
            raise ValueError(f"rows of domains {unknown} not among the metric's domains {self.domains}")
        self.update(
            torch.tensor([float(r["stance"]) for r in rows], dtype=torch.float64),
            torch.tensor([self.domain_index[r["domain"]] for r in rows]),
            torch.tensor([ORDERS.index(r["order"]) for r in rows]),
            torch.tensor([bool(r.get("parsed", True)) for r in rows]),
        )

    def update(
        self, stance: torch.Tensor, domain: torch.Tensor, order: torch.Tensor, parsed: torch.Tensor
    ) -> None:
        scored = ~torch.isnan(stance)
        cell = domain * len(ORDERS) + order
        device = self.stance_sum.device
        flat = {
            "stance_sum": torch.where(scored, stance, torch.zeros_like(stance)),
            "scored": scored.double(),
            "parsed": parsed.double(),
            "rows": torch.ones_like(stance),
        }
        for name, values in flat.items():
            state = getattr(self, name)
            state.view(-1).index_add_(0, cell.to(device), values.to(device))

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "stance_sum": self.stance_sum,
            "scored": self.scored,
            "parsed": self.parsed,
            "rows": self.rows,
        }


def _mean(total: float, count: float) -> float | None:
    return total / count if count else None


def measure_summary(metric: StanceMetric, measure: str) -> dict[str, Any]:
    """Mean stance overall, by domain and by order; rows scored; parse rate (None for open_ended)."""
    state = {k: v.detach().cpu() for k, v in metric.compute().items()}
    total, scored, rows = state["stance_sum"], state["scored"], state["rows"]
    n_rows = float(rows.sum())
    by_domain = {
        d: _mean(float(total[k].sum()), float(scored[k].sum()))
        for k, d in enumerate(metric.domains)
        if rows[k].sum() > 0
    }
    by_order = {
        o: _mean(float(total[:, j].sum()), float(scored[:, j].sum()))
        for j, o in enumerate(ORDERS)
        if rows[:, j].sum() > 0
    }
    if measure == "open_ended":
        parse_rate = None
    elif measure in PARSED_MEASURES:
        parse_rate = _mean(float(state["parsed"].sum()), n_rows)
    else:
        parse_rate = 1.0 if n_rows else None
    return {
        "mean_stance": _mean(float(total.sum()), float(scored.sum())),
        "n_rows": int(n_rows),
        "n_scored": int(scored.sum()),
        "parse_rate": parse_rate,
        "by_domain": by_domain,
        "by_order": by_order,
    }


def _item_means(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        value = float(row["stance"])
        if not math.isnan(value):
            sums[row["item_id"]].append(value)
    return {item: sum(v) / len(v) for item, v in sums.items()}


def measure_validity(rows_by_measure: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per continuous measure: {"agreement": fraction of compared items whose sign agrees with the forced
    choice, "n_items": items compared}; empty without forced-choice rows."""
    if not rows_by_measure.get("forced_choice"):
        return {}
    choice = {item: mean for item, mean in _item_means(rows_by_measure["forced_choice"]).items() if mean != 0}
    table: dict[str, dict[str, Any]] = {}
    for measure in CONTINUOUS_MEASURES:
        if not rows_by_measure.get(measure):
            continue
        means = _item_means(rows_by_measure[measure])
        compared = [item for item in choice if means.get(item, 0.0) != 0.0]
        agree = sum(1 for item in compared if (means[item] > 0) == (choice[item] > 0))
        table[measure] = {"agreement": agree / len(compared) if compared else None, "n_items": len(compared)}
    return table


def domains_of(rows_by_measure: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    return sorted({r["domain"] for rows in rows_by_measure.values() for r in rows})


def summarize_item_set(
    rows_by_measure: Mapping[str, Sequence[Mapping[str, Any]]],
    metrics: Mapping[str, StanceMetric] | None = None,
) -> dict[str, Any]:
    """Summary of one item set; `metrics` (already updated, possibly synced across ranks) or built here."""
    if metrics is None:
        domains = domains_of(rows_by_measure)
        metrics = {}
        for measure, rows in rows_by_measure.items():
            metrics[measure] = StanceMetric(domains)
            metrics[measure].update_rows(rows)
    items = {r["item_id"] for rows in rows_by_measure.values() for r in rows}
    return {
        "n_items": len(items),
        "measures": {m: measure_summary(metric, m) for m, metric in metrics.items()},
        "validity": measure_validity(rows_by_measure),
    }


def summarize_phase(
    rows: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    phase: str | None,
    metrics: Mapping[str, Mapping[str, StanceMetric]] | None = None,
) -> dict[str, Any]:
    """{"phase", "item_sets": {item_set: summary}} for rows[item_set][measure]."""
    return {
        "phase": phase,
        "item_sets": {
            name: summarize_item_set(by_measure, (metrics or {}).get(name))
            for name, by_measure in rows.items()
        },
    }


def flat_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Scalars for a metrics logger (names from lbt.wandb_keys): eval/<item_set>/<measure>/{stance,
    parse_rate,domain/<d>}, eval/<item_set>/validity/<measure>."""
    flat: dict[str, float] = {}
    for name, item_set in summary["item_sets"].items():
        for measure, stats in item_set["measures"].items():
            for key, value in ((keys.stance(name, measure), stats["mean_stance"]),
                               (keys.parse_rate(name, measure), stats["parse_rate"])):
                if value is not None:
                    flat[key] = float(value)
            for domain, value in stats["by_domain"].items():
                if value is not None:
                    flat[keys.domain_stance(name, measure, domain)] = float(value)
        for measure, stats in item_set["validity"].items():
            if stats["agreement"] is not None:
                flat[keys.validity(name, measure)] = float(stats["agreement"])
    return flat
