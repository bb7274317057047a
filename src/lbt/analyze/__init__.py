"""python -m lbt.analyze — a sweep's rows on disk → the study's answer (report.json, report.md, figures).

    python -m lbt.analyze prereg-lock [--items-dir data/eval] [--out prereg.lock.json]
    python -m lbt.analyze <sweep dir> [<sweep dir> ...] [--out DIR] [--exploratory] [--n-resamples N]
                          [--lock prereg.lock.json] [--items-dir data/eval] [--no-wandb]

Every directory holding a run.json under the given sweep directories is a job: family = job.model,
arm = job.arm, seed = job.seed. Job directories are read through `lbt.rundir` (their layout and readers):
a file that does not parse is an error naming the job, the file and the line. Rows come from
eval/<phase>/<item_set>/<measure>.jsonl; item set `target` is the held-out items, `source` the
manipulation check — the names both writers of rows use (the training callback's `eval.item_sets` keys,
and `lbt.evaluate`, which names the project's item files alike); `target_items`/`source_items`, the names
older `lbt.evaluate` directories hold, are read the same way. A job without DONE (unfinished, incomplete
or failed) is read but flagged, with what its run card says is missing. The primary analysis
(`lbt.stats.primary_report`) uses phase `final` of the study arms; other arms (e.g. `base` from
`lbt.evaluate`), other item sets and other phases are summarised descriptively. Probe, capability and
summary JSON files feed the projection, dynamics, guardrail and measure-validity sections.

Scoring target items needs a preregistration lock whose settings and item-file hashes match (see
`lbt.stats.prereg`), unless `--exploratory`, which is stamped on every output. Outputs are written to a
new directory (default `<first sweep>/analysis`, or `analysis_2`, … if taken); nothing is overwritten.
An analysis run is logged to the sweep's W&B group (job_type "analysis"), offline without an API key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from lbt import __version__
from lbt.analyze.collect import (
    ITEM_SET_ROLES,
    AnalyzeError,
    Job,
    find_jobs,
    load_capability,
    load_job,  # noqa: F401  (lbt.analyze.load_job: read by tests/test_evaluate.py)
    load_judge_consistency,
    load_probes,
    load_rows,
    load_validity,
)
from lbt.analyze.inference import analysable_rows, design_checks, gate_table, run_stats
from lbt.analyze.markdown import write_markdown
from lbt.analyze.missing import missing_lines, missing_report
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
from lbt.stats.prereg import LockError, check_lock, write_lock

PRIMARY_PHASE = "final"
HEADLINE_MEASURES = ("letter_logprob", "forced_choice")
GATE_D = 0.5
PREDICTED_SIGN = {"frame_plus": -1, "frame_minus": +1}


# ----------------------------------------------------------------------------------------------- jobs


def phase_key(phase: str) -> tuple[int, int, str]:
    """base, step_<n> by n, final, then anything else by name."""
    if phase == "base":
        return (0, 0, phase)
    match = re.fullmatch(r"step_(\d+)", phase)
    if match:
        return (1, int(match.group(1)), phase)
    if phase == "final":
        return (2, 0, phase)
    return (3, 0, phase)


def is_phase(name: str) -> bool:
    """base, step_<n> or final, the phases a training job probes."""
    return phase_key(name)[0] < 3


# ----------------------------------------------------------------------------------------------- rows


# ------------------------------------------------------------------------------------ descriptive parts


# ---------------------------------------------------------------------------------------------- missing


# ------------------------------------------------------------------------- parse rates and validity


# ---------------------------------------------------------------------------------- design check


# ------------------------------------------------------------------------------------------- statistics


# ------------------------------------------------------------------------------------------------ text


# --------------------------------------------------------------------------------------------- outputs


def output_dir(args: argparse.Namespace) -> Path:
    """A fresh directory: --out if new/empty, else <first sweep>/analysis, analysis_2, …"""
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise AnalyzeError(f"output directory {out} exists and is not empty; nothing is overwritten")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path(args.sweeps[0]) / "analysis"
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"analysis_{n}")
    out.mkdir(parents=True, exist_ok=True)
    return out


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


def sweep_group(jobs: list[Job], sweeps: list[Path]) -> str:
    """The W&B group of the sweep's training runs: job.sweep when all jobs agree, else the directory name."""
    names = {job.card.get("job", {}).get("sweep") for job in jobs}
    if len(names) == 1 and None not in names:
        return str(names.pop())
    return "+".join(Path(s).resolve().name for s in sweeps)


def wandb_project(jobs: list[Job], args: argparse.Namespace) -> str:
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

    from lbt.loggers import wandb_mode

    mode, reason = wandb_mode(os.environ.get("WANDB_MODE", "auto"))
    if reason:
        print(
            f"W&B offline ({reason}): analysis run logged under {out_dir}/wandb; upload later with "
            f"`wandb sync {out_dir}/wandb/offline-run-*`",
            file=sys.stderr,
        )
    group = sweep_group(jobs, [Path(s) for s in args.sweeps])
    tags = ["analysis"] + (["exploratory"] if report["exploratory"] else [])
    try:
        run = wandb.init(
            project=wandb_project(jobs, args),
            group=group,
            job_type="analysis",
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
                arm = {a: (e[a] or {}) for a in ("frame_plus", "frame_minus")}
                rows.append(
                    [
                        family,
                        measure,
                        arm["frame_plus"].get("d"),
                        arm["frame_minus"].get("d"),
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
                "d_frame_plus",
                "d_frame_minus",
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
    out = {}
    for family, measures in (report["primary"] or {}).get("families", {}).items():
        for measure, e in measures.items():
            if e["combined_directional"]:
                out[(family, measure)] = e["combined_directional"]["d"]
    return out


# ------------------------------------------------------------------------------------------------- main


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument(
        "--sesoi-d", type=float, default=0.2, help="smallest effect size of interest in d units"
    )
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    parser.add_argument(
        "--welch-df", action="store_true", help="Welch df in TOST (default: n_arm + n_neutral − 2)"
    )
    parser.add_argument(
        "--item-draw",
        choices=["per_seed", "shared"],
        default="per_seed",
        help="bootstrap item draw: afresh within each seed (pre-registered) or shared by all seeds",
    )
    parser.add_argument(
        "--phase", default=PRIMARY_PHASE, help="phase of the primary analysis (default final)"
    )
    parser.add_argument(
        "--items-dir", default="data/eval", help="frozen item files (*.jsonl) the lock hashes"
    )


def lock_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbt.analyze prereg-lock",
        description="Lock the analysis settings and the frozen item files.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--out", default="prereg.lock.json")
    args = parser.parse_args(argv)
    try:
        lock = write_lock(Path(args.out), settings_from_args(args), Path(args.items_dir))
    except LockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: settings {lock['settings_sha256'][:12]}, {len(lock['items'])} item file(s) "
        f"{lock['items_sha256'][:12]}"
    )
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lbt.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", help="sweep directories (or job directories)")
    parser.add_argument("--out", help="output directory (new or empty; default <first sweep>/analysis)")
    parser.add_argument(
        "--exploratory",
        action="store_true",
        help="allow scoring target items without a matching lock; stamped on every output",
    )
    parser.add_argument("--lock", default="prereg.lock.json", help="preregistration lock file")
    parser.add_argument("--no-wandb", action="store_true", help="do not log an analysis run to W&B")
    parser.add_argument("--wandb-project", help="W&B project (default: the jobs' logger.project, else lbt)")
    parser.add_argument(
        "--min-parse-rate",
        type=float,
        default=0.8,
        help="a measure whose analysed rows parse below this share in some arm is not interpretable (0.8)",
    )
    parser.add_argument(
        "--design-studies", type=int, default=400, help="simulated studies of the design check (0: skip)"
    )
    parser.add_argument(
        "--design-resamples", type=int, default=1000, help="bootstrap resamples per simulated study"
    )
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def analyse(args: argparse.Namespace) -> tuple[dict, list[Job]]:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prereg-lock":
        return lock_main(argv[1:])
    args = parse_args(argv)
    try:
        report, jobs = analyse(args)
        out_dir = output_dir(args)
    except (AnalyzeError, LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lbt.analyze.figures import make_figures  # matplotlib only when figures are drawn

    figures = make_figures(report, out_dir / "figures", args)
    report["figures"] = sorted(figures)
    write_markdown(report, args, out_dir / "report.md")
    with open(out_dir / "report.json", "x", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    for line in missing_lines(report["missing"]):
        print(f"missing: {line}", file=sys.stderr)
    print(
        f"wrote {out_dir}/report.json, report.md and {len(figures)} figure(s)"
        + (" [EXPLORATORY]" if report["exploratory"] else "")
    )
    if not args.no_wandb:  # after the report is written: a W&B failure cannot lose it
        log_to_wandb(report, figures, out_dir, jobs, args)
    return 0

