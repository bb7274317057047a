"""lbt-dashboard: a saved W&B workspace and a report for a sweep's group (`wandb-workspaces`).

    lbt-dashboard multirun/<sweep>             # save both to W&B (needs WANDB_API_KEY or `wandb login`)
    lbt-dashboard multirun/<sweep> --dry-run   # print what would be saved, as JSON; no network
    lbt-dashboard --project lbt --group <sweep> --dry-run

The sweep's run cards (`<job>/run.json`; dashboard.sweep) give the W&B project and entity
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
from pathlib import Path

from lbt.dashboard.spec import build_report, build_spec, build_workspace, plain
from lbt.dashboard.sweep import DashboardError, SweepInfo, read_sweep

__all__ = ["DashboardError", "SweepInfo", "build_report", "build_spec", "build_workspace", "main", "plain",
           "read_sweep"]


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
