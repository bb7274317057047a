"""lbt-dashboard: a saved W&B workspace and a report for a sweep's group (`wandb-workspaces`).

    lbt-dashboard multirun/<sweep>             # save both to W&B (needs WANDB_API_KEY or `wandb login`)
    lbt-dashboard multirun/<sweep> --dry-run   # print what would be saved, as JSON; no network
    lbt-dashboard --project lbt --group <sweep> --dry-run

The sweep's run cards (`<job>/run.json`, read through lbt.analyze.collect) give the W&B project and entity
(`config.logger`), the group (`job.sweep`: W&B groups a sweep's runs under its name), the arms and model
families, and the stance battery's item sets and measures. What is built:

- the workspace: every run of the group, grouped by arm (and by model family when the sweep has several),
  each arm in its lbt.study colour; sections: the shift of mean stance from base per item set × headline
  measure, the probe at ℓ* over training, the raw mean stance, training and validation loss, and the
  analysis run's figures (the forest plot first). Curves are the mean over an arm's seeds with a min–max
  band (the seed band), on the one step axis `trainer/global_step`.
- the report: per model family, the shift curves and the probe panel of the training runs, then the
  analysis run's forest plot.

Every metric name comes from lbt.wandb_keys, which the loggers use as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbt import wandb_keys as keys
from lbt.study import HEADLINE_MEASURES, STUDY_ARMS, arm_colour

ITEM_SET_ORDER = ("target", "source")  # held-out items (H1) first, then the manipulation check
BAND = "minmax"  # the seed band: the range of an arm's seeds around their mean


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
    arms = {job.arm for job in jobs if job.arm}
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
    return (STUDY_ARMS.index(arm) if arm in STUDY_ARMS else len(STUDY_ARMS), arm)


def _item_set_order(name: str) -> tuple[int, str]:
    return (ITEM_SET_ORDER.index(name) if name in ITEM_SET_ORDER else len(ITEM_SET_ORDER), name)


# -- the panels -------------------------------------------------------------------------------------------

def arm_hex(arm: str) -> str:
    """An arm's lbt.study colour (a matplotlib name) as the hex code W&B takes."""
    from matplotlib.colors import to_hex

    return to_hex(arm_colour(arm))


def shift_keys(info: SweepInfo) -> list[tuple[str, str, str]]:
    """(item set, measure, key) of the shift_vs_base curves, held-out items first."""
    return [(s, m, keys.shift_vs_base(s, m)) for s in info.item_sets for m in info.measures]


def probe_keys(info: SweepInfo) -> list[str]:
    if not info.probe:
        return []
    return [keys.probe_at_l_star(p, q) for q in keys.PROBE_QUANTITIES for p in keys.PROBE_POSITIONS]


def line(title: str, y: Sequence[str], by_arm: bool = True, y_title: str | None = None) -> Any:
    """A line plot on the shared step axis: mean over an arm's seeds with the seed band. by_arm=False
    leaves the grouping to the runs table (arm and model family, where several families share a plot)."""
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(title=title, x=keys.STEP, y=list(y), title_x="optimizer step", title_y=y_title,
                       groupby=wr.Config(keys.ARM_CONFIG) if by_arm else None, aggregate=True,
                       groupby_aggfunc="mean", groupby_rangefunc=BAND)


def shift_panels(info: SweepInfo, by_arm: bool = True) -> list[Any]:
    return [line(f"{s} items · {m}: mean stance − base", [k], by_arm, "shift from base (+ = pro-change)")
            for s, m, k in shift_keys(info)]


def probe_panels(info: SweepInfo, by_arm: bool = True) -> list[Any]:
    return [line(f"probe at ℓ*: {k.split('/', 1)[1].removesuffix('_lstar').replace('_', ' ')}", [k], by_arm,
                 "projection on the cautious→eager direction") for k in probe_keys(info)]


def forest_panel(names: Sequence[str] = ("forest",)) -> Any:
    import wandb_workspaces.reports.v2 as wr

    return wr.MediaBrowser(title="analysis: " + ", ".join(names), num_columns=1,
                           media_keys=[keys.analysis_figure(n) for n in names])


def build_workspace(info: SweepInfo) -> Any:
    """The saved workspace of the sweep's group."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    nested = len(info.families) != 1  # several (or unknown) families: never average across them
    groupby = [expr.Config(keys.ARM_CONFIG)] + ([expr.Config(keys.MODEL_CONFIG)] if nested else [])
    colours: dict[Any, str] = {arm: arm_hex(arm) for arm in info.arms}
    colours.update({ws.GroupPath(arm, family): arm_hex(arm) for arm in info.arms for family in info.families
                    if nested})
    stance = [line(f"{s} items · {m}: mean stance", [keys.stance(s, m)], not nested)
              for s in info.item_sets for m in info.measures]
    training = [line("training loss", [keys.TRAIN_LOSS], not nested), line("validation loss", [keys.VAL_LOSS],
                not nested), line("tokens/s", [keys.TRAIN_TOKENS_PER_S], not nested)]
    sections = [
        ws.Section(name="shift from base", panels=shift_panels(info, not nested), is_open=True),
        ws.Section(name="probe at ℓ*", panels=probe_panels(info, not nested), is_open=True),
        ws.Section(name="analysis", panels=[forest_panel(keys.ANALYSIS_FIGURES)], is_open=True),
        ws.Section(name="stance", panels=stance),
        ws.Section(name="training", panels=training),
    ]
    return ws.Workspace(
        entity=info.entity or "", project=info.project, name=f"lbt sweep {info.group}",
        sections=[s for s in sections if s.panels],
        settings=ws.WorkspaceSettings(x_axis=keys.STEP, max_runs=max(10, info.n_runs + 2)),
        runset_settings=ws.RunsetSettings(filters=expr.And(expr.Metric("Group") == info.group), groupby=groupby,
                                          group_colors=colours),
    )


def build_report(info: SweepInfo) -> Any:
    """The report: per model family the shift curves and the probe over training, then the forest plot."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    entity = info.entity or ""
    blocks: list[Any] = [wr.P(
        f"Sweep {info.group}: each curve is an arm's mean over its seeds, the band their min–max, on "
        f"{keys.STEP} (optimizer steps). Shift from base = mean stance at the phase − at base, same items "
        f"and measure; positive = pro-change. FRAME+ (cautious) is predicted below neutral, FRAME− above.")]
    for family in info.families or (None,):
        name = f"{family or 'all families'}: training runs"
        filters = [expr.Metric("Group") == info.group, expr.Config(keys.ARM_CONFIG).isin(list(info.arms))]
        groupby = [f"config.{keys.ARM_CONFIG}"]
        if family is None:  # families unknown: keep them apart in the runs table
            groupby.append(f"config.{keys.MODEL_CONFIG}")
        else:
            filters.append(expr.Config(keys.MODEL_CONFIG) == family)
        runset = wr.Runset(entity=entity, project=info.project, name=name, filters=expr.And(*filters), groupby=groupby)
        colours = {wr.RunsetGroup(runset_name=name, keys=(wr.RunsetGroupKey(wr.Config(keys.ARM_CONFIG), arm),)):
                   arm_hex(arm) for arm in info.arms}
        blocks += [wr.H2(family or "all families"),
                   wr.PanelGrid(runsets=[runset], custom_run_colors=colours,
                                panels=shift_panels(info, family is not None)
                                + probe_panels(info, family is not None))]
    analysis = wr.Runset(entity=entity, project=info.project, name="analysis run",
                         filters=expr.And(expr.Metric("Group") == info.group,
                                          expr.Metric("JobType") == keys.JOB_TYPE_ANALYSIS))
    blocks += [wr.H2("forest plot"),
               wr.P("Combined directional d per family and measure with its 95 % CI and the SESOI band, "
                    "from the analysis run (`lbt-analyze`)."),
               wr.PanelGrid(runsets=[analysis], panels=[forest_panel()])]
    return wr.Report(entity=entity, project=info.project, title=f"lbt sweep {info.group}"[:128],
                     description="shift from base by arm, probe over training, forest plot", blocks=blocks)


# -- the spec as JSON -------------------------------------------------------------------------------------

def plain(obj: Any) -> Any:
    """A wandb-workspaces object as JSON-able data: its public, non-empty fields, with its type's name.
    (The library's own serialisation of a report looks up the project on the server.)"""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            # Compared by type, not with ==: the library's metric objects turn == into a filter expression.
            empty = value is None or (isinstance(value, (str, list, tuple, dict)) and not value)
            if not field.name.startswith("_") and field.name != "layout" and not empty:
                out[field.name] = plain(value)
        return out
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else repr(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def build_spec(info: SweepInfo) -> dict[str, Any]:
    return {"sweep": dataclasses.asdict(info), "workspace": plain(build_workspace(info)),
            "report": plain(build_report(info))}


# -- the command ------------------------------------------------------------------------------------------

def has_wandb_key() -> bool:
    from lbt.loggers import wandb_key_in_netrc

    return bool(os.environ.get("WANDB_API_KEY")) or wandb_key_in_netrc()


def save(info: SweepInfo) -> tuple[str, str]:
    """Save the workspace and the report to W&B; their URLs."""
    import wandb

    if not info.entity:  # the workspace and the report belong to an entity: the key's default one
        info = dataclasses.replace(info, entity=wandb.Api().default_entity)
    workspace = build_workspace(info).save()
    report = build_report(info)
    report.save()
    return workspace.url, report.url


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lbt-dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", type=Path, help="a sweep's multirun directory (run cards below it)")
    parser.add_argument("--project", help="W&B project (default: the run cards' logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the run cards', WANDB_ENTITY, your default)")
    parser.add_argument("--group", help="W&B group = the sweep's name (default: the run cards' job.sweep)")
    parser.add_argument("--dry-run", action="store_true", help="print the workspace and report as JSON; no network")
    parser.add_argument("--traceback", action="store_true", help="show the traceback when saving fails")
    return parser.parse_args(argv)


def sweep_info(args: argparse.Namespace) -> SweepInfo:
    if args.sweep is not None:
        return read_sweep(args.sweep, args.project, args.entity, args.group)
    if not (args.project and args.group):
        raise DashboardError("give a sweep directory, or --project and --group")
    return SweepInfo(project=args.project, entity=args.entity or os.environ.get("WANDB_ENTITY"), group=args.group)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = sweep_info(args)
        try:
            import wandb_workspaces  # noqa: F401
        except ImportError:
            raise DashboardError("wandb-workspaces is not installed: pip install 'lbt[dashboard]'") from None
        if args.dry_run:
            print(json.dumps(build_spec(info), indent=2, ensure_ascii=False))
            return 0
        if not has_wandb_key():
            raise DashboardError("no W&B key: set WANDB_API_KEY or run `wandb login` (or use --dry-run)")
    except DashboardError as err:
        print(f"lbt-dashboard: {err}", file=sys.stderr)
        return 2
    try:
        workspace_url, report_url = save(info)
    except Exception as err:  # network, permissions, server: one line, the traceback only on request
        if args.traceback:
            raise
        print(f"lbt-dashboard: saving to W&B failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"workspace: {workspace_url}\nreport: {report_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
