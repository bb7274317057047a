"""The analysis run in the sweep's W&B group (job_type "analysis"): tables, figures, headline numbers.

Named wandb_run, not wandb, so that `import wandb` inside the package still finds W&B itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lbt import wandb_keys as keys
from lbt.analyze.collect import Job
from lbt.study import FRAMED_ARMS


def sweep_group(jobs: list[Job], sweeps: list[Path]) -> str:
    """The W&B group of the sweep's training runs: job.sweep when all jobs agree, else the directory name."""
    names = {job.card.get("job", {}).get("sweep") for job in jobs}
    if len(names) == 1 and None not in names:
        return str(names.pop())
    return "+".join(Path(s).resolve().name for s in sweeps)


def wandb_project(jobs: list[Job], args: argparse.Namespace) -> str:
    """--wandb-project, else the jobs' logger.project, else $WANDB_PROJECT, else lbt."""
    if args.wandb_project:
        return args.wandb_project
    for job in jobs:
        logger = (job.card.get("config") or {}).get("logger") or {}
        if isinstance(logger, dict) and logger.get("project"):
            return str(logger["project"])
    return os.environ.get("WANDB_PROJECT", "lbt")


def log_to_wandb(
    report: dict, figures: dict[str, Path], out_dir: Path, jobs: list[Job], args: argparse.Namespace
) -> str | None:
    """One analysis run in the sweep's W&B group: tables, figures, headline numbers. Returns its dir."""
    import wandb

    from lbt.loggers import requested_mode, wandb_mode

    mode, reason = wandb_mode(requested_mode())
    if reason:
        print(
            f"W&B offline ({reason}): analysis run logged under {out_dir}/wandb; upload later with "
            f"`wandb sync {out_dir}/wandb/offline-run-*`",
            file=sys.stderr,
        )
    group = sweep_group(jobs, [Path(s) for s in args.sweeps])
    tags = [keys.JOB_TYPE_ANALYSIS] + (["exploratory"] if report["exploratory"] else [])
    try:
        run = wandb.init(
            project=wandb_project(jobs, args),
            group=group,
            job_type=keys.JOB_TYPE_ANALYSIS,
            name=f"analysis-{group}" + ("-exploratory" if report["exploratory"] else ""),
            dir=str(out_dir),
            mode=mode,
            tags=tags,
            config={
                "settings": report["settings"],
                "exploratory": report["exploratory"],
                "sweeps": report["sweeps"],
                "out_dir": str(out_dir),
            },
        )
        payload: dict[str, Any] = {}
        for name, (columns, rows) in wandb_tables(report).items():
            payload[f"tables/{name}"] = wandb.Table(columns=columns, data=rows)
        for name, path in figures.items():
            payload[f"figures/{name}"] = wandb.Image(str(path), caption=name)
        run.log(payload)
        for (family, measure), value in headline_numbers(report).items():
            run.summary[f"combined_d/{family}/{measure}"] = value
        run.summary["exploratory"] = report["exploratory"]
        return str(run.dir)
    finally:
        wandb.finish()


def wandb_tables(report: dict) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report's tables for W&B: name → (columns, rows)."""
    exploratory = report["exploratory"]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    for name, stats in (("primary", report["primary"]), ("manipulation_check", report["manipulation_check"])):
        if not stats:
            continue
        rows = []
        for family, measures in sorted(stats["families"].items()):
            for measure, e in sorted(measures.items()):
                comb = e["combined_directional"] or {}
                holm = stats["holm"].get(measure, {}).get(family, {})
                arm = {a: (e[a] or {}) for a in FRAMED_ARMS}
                rows.append(
                    [
                        family,
                        measure,
                        *(arm[a].get("d") for a in FRAMED_ARMS),
                        comb.get("d"),
                        *(comb.get("ci") or [None, None]),
                        comb.get("p_one_sided"),
                        holm.get("reject"),
                        e["n_items"],
                        e["n_seeds"],
                        exploratory,
                    ]
                )
        tables[name] = (
            [
                "family",
                "measure",
                *(f"d_{a}" for a in FRAMED_ARMS),
                "combined_d",
                "ci_low",
                "ci_high",
                "p_one_sided",
                "holm_reject",
                "n_items",
                "n_seeds",
                "exploratory",
            ],
            rows,
        )
    tables["gate"] = (
        ["family", "measure", "arm", "d", "passes"],
        [[g["family"], g["measure"], g["arm"], g["d"], g["passes"]] for g in report["manipulation_gate"]],
    )
    tables["capability"] = (
        ["family", "arm", "seed", "phase", "perplexity", "perplexity_rise", "mmlu_drop"],
        [
            [
                c["family"],
                c["arm"],
                c["seed"],
                c["phase"],
                c["perplexity"],
                c["perplexity_rise"],
                c["mmlu_drop"],
            ]
            for c in report["capability"]
        ],
    )
    tables["validity"] = (
        ["family", "arm", "seed", "phase", "item_set", "measure", "agreement", "n_items"],
        [
            [
                v["family"],
                v["arm"],
                v["seed"],
                v["phase"],
                v["item_set"],
                v["measure"],
                v["agreement"],
                v["n_items"],
            ]
            for v in report["validity"]
        ],
    )
    return tables


def headline_numbers(report: dict) -> dict[tuple[str, str], float]:
    """(family, measure) → combined directional d of the primary analysis."""
    out = {}
    for family, measures in (report["primary"] or {}).get("families", {}).items():
        for measure, e in measures.items():
            if e["combined_directional"]:
                out[(family, measure)] = e["combined_directional"]["d"]
    return out
