"""The analysis itself: a sweep's job directories → the report dict that report.json holds and from which
report.md, the figures and the W&B run are drawn."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from lbt import __version__
from lbt.analyze.collect import (
    ITEM_SET_ROLES,
    Job,
    find_jobs,
    load_capability,
    load_judge_consistency,
    load_probes,
    load_rows,
    load_validity,
)
from lbt.analyze.inference import analysable_rows, design_checks, gate_table, run_stats
from lbt.analyze.missing import missing_report
from lbt.analyze.tables import (
    describe,
    not_interpretable,
    parse_rates,
    projection_dynamics,
    projection_summary,
    stance_dynamics,
    validity_from_rows,
)
from lbt.analyze.text import EXPLORATORY_STAMP
from lbt.stats.prereg import LockError, check_lock
from lbt.study import GATE_D, HEADLINE_MEASURES


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The analysis settings a preregistration lock fixes."""
    return {
        "n_resamples": args.n_resamples,
        "sesoi_d": args.sesoi_d,
        "alpha": args.alpha,
        "seed": args.seed,
        "welch_df": args.welch_df,
        "item_draw": args.item_draw,
        "phase": args.phase,
        "headline_measures": list(HEADLINE_MEASURES),
        "gate_d": GATE_D,
    }


def analyse(args: argparse.Namespace) -> tuple[dict, list[Job]]:
    """report.json's contents (its figures listed once drawn) and the jobs read; AnalyzeError or LockError
    for input the analysis cannot use."""
    sweeps = [Path(s) for s in args.sweeps]
    base = Path(os.path.commonpath([s.resolve().parent for s in sweeps]))

    def display(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), base)

    jobs = find_jobs(sweeps)
    rows = [row for job in jobs for row in load_rows(job, display)]
    lock_info = None
    settings = settings_from_args(args)
    if any(ITEM_SET_ROLES.get(r["item_set"]) == "target" for r in rows) and not args.exploratory:
        try:
            lock = check_lock(Path(args.lock), settings, Path(args.items_dir))
        except LockError as err:
            raise LockError(
                f"refusing to score target items: {err}. Run `python -m lbt.analyze prereg-lock` "
                "before scoring target items, or pass --exploratory (stamped on every output)."
            ) from None
        lock_info = {
            "path": str(args.lock),
            "settings_sha256": lock["settings_sha256"],
            "items_sha256": lock["items_sha256"],
            "created": lock.get("created"),
        }
    notes: list[str] = []
    rates = parse_rates(rows)
    primary = run_stats(analysable_rows(rows, "target", args.phase, notes), args, notes)
    manipulation = run_stats(analysable_rows(rows, "source", args.phase, notes), args, notes)
    uninterpretable: dict[str, dict[str, str]] = {}
    for stats, role in ((primary, "target"), (manipulation, "source")):
        reasons = not_interpretable(rates, role, args.phase, args.min_parse_rate)
        uninterpretable[role] = {
            f"{family}/{measure}": reason for (family, measure), reason in reasons.items()
        }
        for (family, measure), reason in reasons.items():
            entry = (stats or {}).get("families", {}).get(family, {}).get(measure)
            if entry is not None:
                entry["not_interpretable"] = reason
    checks = design_checks(primary, args)
    descriptive = describe(rows)
    probes = load_probes(jobs, display)
    report = {
        "lbt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exploratory": bool(args.exploratory),
        "exploratory_note": EXPLORATORY_STAMP if args.exploratory else None,
        "sweeps": [str(s) for s in args.sweeps],
        "paths_relative_to": str(base),
        "settings": settings,
        "lock": lock_info,
        "jobs": [
            {
                "path": display(j.path),
                "family": j.family,
                "arm": j.arm,
                "seed": j.seed,
                "status": j.status,
                "done": j.done,
                "phases": j.phases,
            }
            for j in jobs
        ],
        "primary": primary,
        "manipulation_check": manipulation,
        "manipulation_gate": gate_table(manipulation),
        "design_check": checks,
        "not_interpretable": uninterpretable,
        "parse_rates": rates,
        "report_settings": {  # not part of the preregistration lock
            "min_parse_rate": args.min_parse_rate,
            "design_studies": args.design_studies,
            "design_resamples": args.design_resamples,
        },
        "projection_shift": projection_summary(probes, args.phase),
        "dynamics": {
            "stance": stance_dynamics(descriptive),
            "projection_at_l_star": projection_dynamics(probes),
        },
        "capability": load_capability(jobs, display),
        "validity": validity_from_rows(rows),
        "validity_summaries": load_validity(jobs, display),
        "judge_consistency": load_judge_consistency(sweeps, display),
        "descriptive": descriptive,
        "missing": missing_report(jobs, descriptive, probes),
        "notes": notes,
        "warnings": [f"target items: {w}" for w in (primary or {}).get("warnings", [])]
        + [f"source items: {w}" for w in (manipulation or {}).get("warnings", [])],
        "figures": [],
    }
    return report, jobs
