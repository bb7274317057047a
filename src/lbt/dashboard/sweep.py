"""A sweep as the dashboard sees it (SweepInfo): the W&B project, entity and group of its runs, its arms and
model families, the stance battery's item sets and headline measures, read from the jobs' run cards
(`<job>/run.json`, through lbt.analyze.collect). Flags given on the command line override the cards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbt import wandb_keys as keys
from lbt.study import HEADLINE_MEASURES, STUDY_ARMS, arm_name

ITEM_SET_ORDER = ("target", "source")  # held-out items (H1) first, then the manipulation check


class DashboardError(RuntimeError):
    """Input the dashboard cannot use; the message is printed as one line."""


@dataclass(frozen=True)
class SweepInfo:
    """What the dashboard needs to know about a sweep's W&B runs."""

    project: str
    entity: str | None
    group: str
    arms: tuple[str, ...] = STUDY_ARMS
    families: tuple[str, ...] = ()          # empty: unknown (built from flags alone)
    item_sets: tuple[str, ...] = ITEM_SET_ORDER
    measures: tuple[str, ...] = HEADLINE_MEASURES
    probe: bool = True
    n_runs: int = 0


# -- reading the sweep ------------------------------------------------------------------------------------

def battery_settings(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(item sets, measures) of the stance battery in a job's resolved config: the entry of the eval group
    that has `item_sets` (a mapping) and `measures` (a list), wherever the group's layout puts it."""
    stack: list[Any] = [config.get("eval") or {}]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("item_sets"), dict) and isinstance(node.get("measures"), list):
                return [str(s) for s in node["item_sets"]], [str(m) for m in node["measures"]]
            stack.extend(node.values())
    return [], []


def _one(values: set, what: str, sweep: Path, flag: str) -> Any:
    if len(values) > 1:
        raise DashboardError(f"sweep {sweep}: its jobs disagree on {what} ({', '.join(sorted(map(str, values)))});"
                             f" pick one with {flag}")
    return values.pop() if values else None


def read_sweep(sweep: Path, project: str | None = None, entity: str | None = None,
               group: str | None = None) -> SweepInfo:
    """SweepInfo from the run cards under a sweep directory; flags given override what the cards say."""
    from lbt.analyze.collect import AnalyzeError, find_jobs

    try:
        jobs = find_jobs([Path(sweep)])
    except AnalyzeError as err:
        raise DashboardError(str(err)) from None
    configs = [job.card.get("config") or {} for job in jobs]
    loggers = [c.get("logger") or {} for c in configs]
    wandb_loggers = [lg for lg in loggers if isinstance(lg, dict) and lg.get("kind") == "wandb"]
    if not wandb_loggers:
        kinds = sorted({str(lg.get("kind")) for lg in loggers if isinstance(lg, dict)} - {"None"}) or ["unknown"]
        raise DashboardError(f"sweep {sweep}: no job logged to W&B (logger.kind {', '.join(kinds)}); "
                             f"run the sweep with logger=wandb")
    project = project or _one({str(lg["project"]) for lg in wandb_loggers if lg.get("project")},
                              "the W&B project", sweep, "--project")
    if not project:
        raise DashboardError(f"sweep {sweep}: its run cards name no W&B project; pass --project")
    entity = entity or _one({str(lg["entity"]) for lg in wandb_loggers if lg.get("entity")},
                            "the W&B entity", sweep, "--entity") or os.environ.get("WANDB_ENTITY")
    if not group:
        sweeps = {job.card.get("job", {}).get("sweep") for job in jobs}
        if None in sweeps:
            raise DashboardError(f"sweep {sweep}: some jobs were not run as a sweep (run.json job.sweep is empty),"
                                 f" so they have no W&B group; pass --group")
        group = keys.run_group(_one(sweeps, "the sweep name (W&B group)", sweep, "--group"))
    batteries = [battery_settings(c) for c in configs]
    item_sets = {s for sets, _ in batteries for s in sets}
    measures = {m for _, ms in batteries for m in ms}
    # The names the runs logged to W&B (arm.name), which the panels filter on: a sweep trained before
    # issue 16 logged frame_plus/frame_minus, so its cards' own names, not the analysis's mapped ones.
    arms = {str(arm) for job in jobs if (arm := (job.card.get("job") or {}).get("arm"))}
    return SweepInfo(
        project=project, entity=entity, group=group,
        arms=tuple(sorted(arms, key=_arm_order)),
        families=tuple(sorted({job.family for job in jobs if job.family})),
        item_sets=tuple(sorted(item_sets, key=_item_set_order)),
        measures=tuple(m for m in HEADLINE_MEASURES if m in measures),
        probe=any(c.get("probe") != {} for c in configs),
        n_runs=len(jobs),
    )


def _arm_order(arm: str) -> tuple[int, str]:
    name = arm_name(arm)  # a legacy name sorts where today's does
    return (STUDY_ARMS.index(name) if name in STUDY_ARMS else len(STUDY_ARMS), arm)


def _item_set_order(name: str) -> tuple[int, str]:
    return (ITEM_SET_ORDER.index(name) if name in ITEM_SET_ORDER else len(ITEM_SET_ORDER), name)

