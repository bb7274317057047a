"""`python -m lbt.check <sweep or job folder> ...`: is every job complete, as its DONE says?

A job writes DONE only after the completeness check (`lbt.rundir.completeness`) passes. This command runs
the same check again from outside, on folders that may since have been copied, synced or pruned:

- a job folder is one holding `run.json`; a folder given that holds none is a sweep (or a folder of
  sweeps), and its job folders are the folders below it that hold one, at any depth, as lbt.analyze finds them;
- for a job with DONE, the job's plan is rebuilt from its run card (the resolved config, the planned steps):
  its evaluators, read from the config's item files, say which phase files must exist and how many rows
  each holds. Every planned step must have run, `adapter/` and each step adapter must load, and every
  planned file must exist, parse and hold its rows;
- nothing is written, moved or set aside.

One line per job: `complete`; `unfinished` (no DONE: the card's status and what it lists as missing);
`DONE BUT INCOMPLETE` with what is missing; or `cannot check`, with why the plan could not be rebuilt here
(an item file or tokenizer not found, a card of an older lbt). Exit code 0 only when every job is complete;
1 otherwise; 2 for a folder that holds no job. Relative item paths in a card resolve from the working
directory, so run it from the folder the sweep was started in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbt.console import user_errors
from lbt.rundir import job_folders_under


class NoJobs(ValueError):
    """A folder given to lbt.check that holds no job folder."""


@dataclass
class JobCheck:
    """The outcome for one job folder."""

    path: Path
    outcome: str  # complete | unfinished | incomplete | unchecked
    status: str | None = None
    missing: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = {"complete": "complete",
                "unfinished": f"unfinished: no DONE (run.json status {self.status!r})",
                "incomplete": "DONE BUT INCOMPLETE", "unchecked": "cannot check"}[self.outcome]
        return f"{head}: {self.path}" + "".join(f"\n    - {m}" for m in self.missing)


def job_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The job folders of the given job or sweep folders, in order, each once."""
    jobs: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise NoJobs(f"{given}: no such folder")
        found = job_folders_under(given)
        if not found:
            raise NoJobs(f"{given}: no run.json in it or in its sub-folders (not a job or sweep folder)")
        jobs += [p for p in found if p not in jobs]
    return jobs


def planned_check(folder: Path, card: dict[str, Any], chats: dict[str, Any]) -> list[str]:
    """What the completeness check behind DONE finds missing in this folder now (the job's plan rebuilt
    from its card). chats caches one chat format per model section."""
    from omegaconf import OmegaConf

    from lbt.data.chat import ChatFormat
    from lbt.model.load import load_tokenizer
    from lbt.phases import CheckpointPhases
    from lbt.train import job_evaluators

    cfg = OmegaConf.create(card["config"])
    planned = int(card["data"]["total_steps"])
    model_key = json.dumps(card["config"].get("model"), sort_keys=True)
    if model_key not in chats:
        chats[model_key] = ChatFormat.of(load_tokenizer(cfg.model), cfg.model)
    evaluators = job_evaluators(cfg, chats[model_key])
    phases = CheckpointPhases(folder, planned, list(cfg.train.checkpoint_fractions), 0, evaluators)
    trained = card.get("trained_steps")
    return phases.completeness(-1 if trained is None else int(trained)).missing


def check_job(folder: Path, chats: dict[str, Any] | None = None) -> JobCheck:
    from lbt.rundir import CorruptFile, RunDir, read_json

    run = RunDir(folder)
    done = run.is_done()
    try:
        card = read_json(run.card)
        if not isinstance(card, dict):
            raise CorruptFile(f"{run.card}: not a JSON object")
    except CorruptFile as err:
        return JobCheck(folder, "incomplete" if done else "unfinished", missing=[str(err)])
    status = card.get("status")
    if not done:
        return JobCheck(folder, "unfinished", status, list(card.get("missing") or []))
    lacking = [key for key, present in (("config", isinstance(card.get("config"), dict)),
                                        ("data.total_steps", "total_steps" in (card.get("data") or {})))
               if not present]
    if lacking:
        return JobCheck(folder, "incomplete", status, [f"run.json lacks {', '.join(lacking)}"])
    try:
        missing = planned_check(folder, card, {} if chats is None else chats)
    except Exception as err:  # noqa: BLE001 -- the plan cannot be rebuilt here: an item file moved, a
        # tokenizer not on disk, a card written by an older lbt whose config this one cannot build
        why = f"cannot rebuild the job's plan: {type(err).__name__}: {err}"
        return JobCheck(folder, "unchecked", status, [why])
    if status != "done":
        missing.insert(0, f"run.json says status {status!r}, not 'done'")
    return JobCheck(folder, "incomplete" if missing else "complete", status, missing)


def check(paths: Sequence[str | Path]) -> list[JobCheck]:
    chats: dict[str, Any] = {}
    return [check_job(folder, chats) for folder in job_folders(paths)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lbt.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="job folders (holding run.json) or sweep folders")
    parser.add_argument("--json", metavar="PATH", help="also write the outcomes as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors("lbt.check"):
        results = check(args.folders)
    for result in results:
        print(result.line())
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    print(f"{len(results)} job(s): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"job": str(r.path), "outcome": r.outcome, "status": r.status, "missing": r.missing}
             for r in results],
            indent=2) + "\n", encoding="utf-8")
    return 0 if all(r.outcome == "complete" for r in results) else 1


if __name__ == "__main__":
    # Through the module's importable name, so that user_errors sees lbt.check's errors (not __main__'s).
    from lbt.check import main as check_main

    sys.exit(check_main())
