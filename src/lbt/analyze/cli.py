"""The two commands: `python -m lbt.analyze <sweep> ...` (the analysis) and `python -m lbt.analyze
prereg-lock` (lock the settings and item files before scoring target items)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lbt.analyze.collect import AnalyzeError
from lbt.analyze.markdown import write_markdown
from lbt.analyze.missing import missing_lines
from lbt.analyze.report import analyse, settings_from_args
from lbt.analyze.wandb_run import log_to_wandb
from lbt.stats.prereg import LockError, write_lock
from lbt.study import ALPHA, N_RESAMPLES, PRIMARY_PHASE, SESOI_D

DESCRIPTION = (
    "python -m lbt.analyze — a sweep's rows on disk → the study's answer (report.json, report.md, figures)."
)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings a preregistration lock fixes, shared by both commands."""
    parser.add_argument(
        "--n-resamples", type=int, default=N_RESAMPLES, help=f"bootstrap resamples (default {N_RESAMPLES})"
    )
    parser.add_argument(
        "--sesoi-d", type=float, default=SESOI_D, help="smallest effect size of interest in d units"
    )
    parser.add_argument("--alpha", type=float, default=ALPHA)
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
        "--phase", default=PRIMARY_PHASE, help=f"phase of the primary analysis (default {PRIMARY_PHASE})"
    )
    parser.add_argument(
        "--items-dir", default="data/eval", help="frozen item files (*.jsonl) the lock hashes"
    )


def lock_main(argv: list[str]) -> int:
    """`prereg-lock`: write the lock of the settings and the item files (never overwritten)."""
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
    parser = argparse.ArgumentParser(prog="python -m lbt.analyze", description=DESCRIPTION)
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


def main(argv: list[str] | None = None) -> int:
    """Both commands; 0 on success, 2 for input the analysis cannot use (the message says why)."""
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
