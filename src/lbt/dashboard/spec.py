"""The workspace and the report of a sweep, as wandb-workspaces objects, and as JSON (`plain`).

Curves are an arm's mean over its seeds with a min–max band (the seed band) on the one step axis; every
metric name comes from lbt.wandb_keys. Building them needs no network; saving them does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lbt import wandb_keys as keys
from lbt.dashboard.sweep import SweepInfo
from lbt.study import arm_colour

BAND = "minmax"  # the seed band: the range of an arm's seeds around their mean


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
    training = [line(title, [key], not nested) for title, key in (
        ("training loss", keys.TRAIN_LOSS), ("validation loss", keys.VAL_LOSS), ("tokens/s", keys.TRAIN_TOKENS_PER_S))]
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

