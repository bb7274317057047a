"""When each job of a sweep ran, on which GPU, and what ran at once — read from the job folders alone.

    python benchmarks/study_report.py <sweep dir> [--expect 18] [--sweep-wall S] [--sweep-start EPOCH]
                                                  [--json PATH]

A job folder is a child of the sweep holding run.json, or named like Hydra's subdir (<model>-<arm>-s<seed>).
Its start is the run card's `started` (the attempt that wrote the card), its end the time written in
`DONE` (both local time, to the second); `wall` is the card's `wall_time_s` (the job's own clock, from the
card's start: Python's start, imports and Hydra's compose come before it). A job not `done` or without
DONE is listed as unfinished; its end is the card's last write, to place it among the others.

Printed: one row per job sorted by start (seconds since the sweep's first start), the peak number of jobs
running at once and how long each number ran, each GPU's jobs in order, more jobs on one GPU at once than --jobs-per-gpu allows,
the span (first start to last DONE) and, given the sweep's own wall time, the launcher's overhead (wall −
span: the processes' starts, the launcher's polling and its end). Exit 0 iff every job folder holds a
finished job and, with --expect N, there are N of them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # lbt.train writes `started` and DONE so (local time)
JOB_NAME = re.compile(r".+-s\d+$")  # hydra.sweep.subdir: <model>-<arm>-s<seed>
NO_GPU = "-"


@dataclass
class Job:
    label: str
    gpu: str  # host.cuda_visible_devices; "-" where none was set (a CPU job, or a card without host)
    host: str | None
    status: str  # the card's status, or "no run.json"
    done_file: bool
    start: datetime | None
    end: datetime | None  # DONE's time; for an unfinished job, the card's last write
    wall_s: float | None
    steps: str  # trained/planned optimizer steps
    tokens_per_s: float | None
    attempts: int

    @property
    def finished(self) -> bool:
        return self.status == "done" and self.done_file


def parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(str(text).strip(), TIME_FORMAT)
    except ValueError:
        return None


def done_time(path: Path) -> datetime | None:
    """The finish time DONE holds; its modification time where it holds none (an older job folder)."""
    if not path.exists():
        return None
    return parse_time(path.read_text(encoding="utf-8")) or datetime.fromtimestamp(path.stat().st_mtime)


def read_job(folder: Path) -> Job:
    card_path = folder / "run.json"
    card: dict[str, Any] = {}
    status = "no run.json"
    if card_path.exists():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            status = str(card.get("status"))
        except (OSError, ValueError):
            status = "run.json unreadable"
    host = card.get("host") or {}
    finished_at = done_time(folder / "DONE")
    if finished_at is None and card_path.exists():
        finished_at = datetime.fromtimestamp(card_path.stat().st_mtime)
    planned = (card.get("data") or {}).get("total_steps")
    return Job(
        label=folder.name,
        gpu=str(host.get("cuda_visible_devices") or NO_GPU),
        host=host.get("name"),
        status=status,
        done_file=(folder / "DONE").exists(),
        start=parse_time(card.get("started")),
        end=finished_at,
        wall_s=card.get("wall_time_s"),
        steps=f"{card.get('trained_steps', '?')}/{'?' if planned is None else planned}",
        tokens_per_s=card.get("tokens_per_s"),
        attempts=int(card.get("previous_attempts") or 0) + 1,
    )


def find_jobs(sweep: Path) -> list[Job]:
    """The sweep's job folders (not .submitit, not analysis/), sorted by start; jobs without one last."""
    folders = [
        p
        for p in sweep.iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / "run.json").exists() or JOB_NAME.match(p.name))
    ]
    jobs = [read_job(p) for p in folders]
    return sorted(jobs, key=lambda j: (j.start is None, j.start or datetime.min, j.label))


def intervals(jobs: list[Job], t0: datetime) -> list[tuple[float, float, Job]]:
    """(start, end, job) in seconds since t0, for every job with both times."""
    return [
        ((j.start - t0).total_seconds(), (j.end - t0).total_seconds(), j)
        for j in jobs
        if j.start is not None and j.end is not None
    ]


def concurrency(spans: list[tuple[float, float, Job]]) -> tuple[int, dict[int, float]]:
    """The peak number of jobs running at once, and the seconds spent at each number (0 not counted). A job
    that ends in the second the next one starts does not overlap it: at one time, ends count first."""
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])  # (t, -1) before (t, 1)
    running, peak, last = 0, 0, None
    seconds: dict[int, float] = {}
    for t, delta in events:
        if last is not None and running > 0 and t > last:
            seconds[running] = seconds.get(running, 0.0) + (t - last)
        running += delta
        peak = max(peak, running)
        last = t
    return peak, dict(sorted(seconds.items()))


def gpu_sequences(jobs: list[Job]) -> dict[str, list[str]]:
    """Each GPU's jobs in the order they started (jobs come sorted by start)."""
    sequences: dict[str, list[str]] = {}
    for job in jobs:
        sequences.setdefault(job.gpu, []).append(job.label)
    return dict(sorted(sequences.items()))


def gpu_conflicts(spans: list[tuple[float, float, Job]], per_gpu: int = 1) -> list[list[str]]:
    """The jobs running on one GPU whenever more than `per_gpu` did at once (the launcher's jobs_per_gpu: it
    must never put more there). A job that ends in the second another starts does not overlap it."""
    found: list[list[str]] = []
    for gpu in sorted({job.gpu for _, _, job in spans} - {NO_GPU}):
        events = sorted(
            [(s, 1, job.label) for s, _, job in spans if job.gpu == gpu]
            + [(e, -1, job.label) for _, e, job in spans if job.gpu == gpu]
        )
        running: set[str] = set()
        for _, delta, label in events:
            if delta < 0:
                running.discard(label)
                continue
            running.add(label)
            if len(running) > per_gpu and sorted(running) not in found:
                found.append(sorted(running))
    return sorted(found)


def summarize(
    jobs: list[Job],
    expect: int | None = None,
    sweep_wall: float | None = None,
    sweep_start: float | None = None,
    per_gpu: int = 1,
) -> dict[str, Any]:
    t0 = min((j.start for j in jobs if j.start is not None), default=None)
    spans = [] if t0 is None else intervals(jobs, t0)
    peak, seconds = concurrency(spans)
    finished = [j for j in jobs if j.finished]
    span = None
    if finished and t0 is not None:
        span = max((j.end - t0).total_seconds() for j in finished if j.end is not None)
    rows = []
    for job in jobs:
        row = {k: v for k, v in asdict(job).items() if k not in ("start", "end")}
        row.update(
            finished=job.finished,
            start_s=None if job.start is None or t0 is None else (job.start - t0).total_seconds(),
            end_s=None if job.end is None or t0 is None else (job.end - t0).total_seconds(),
            started=job.start.strftime(TIME_FORMAT) if job.start else None,
            ended=job.end.strftime(TIME_FORMAT) if job.end else None,
        )
        rows.append(row)
    summary: dict[str, Any] = {
        "first_start": t0.strftime(TIME_FORMAT) if t0 else None,
        "jobs": rows,
        "found": len(jobs),
        "finished": len(finished),
        "unfinished": [j.label for j in jobs if not j.finished],
        "expected": expect,
        "peak_running": peak,
        "seconds_running": {str(k): round(v, 1) for k, v in seconds.items()},
        "gpus": gpu_sequences(jobs),
        "jobs_per_gpu": per_gpu,
        "gpu_conflicts": gpu_conflicts(spans, per_gpu),
        "span_s": span,
        "sweep_wall_s": sweep_wall,
        "launcher_overhead_s": None if sweep_wall is None or span is None else round(sweep_wall - span, 1),
        "lead_in_s": None,
    }
    if sweep_start is not None and t0 is not None:
        summary["lead_in_s"] = round(t0.timestamp() - sweep_start, 1)
    summary["ok"] = not summary["unfinished"] and (expect is None or len(jobs) == expect)
    return summary


def seconds_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def report_lines(summary: dict[str, Any]) -> list[str]:
    header = (
        f"{'job':<28} {'gpu':>4} {'start_s':>8} {'end_s':>8} {'wall_s':>8} {'steps':>9} {'tok/s':>8} "
        f"{'tries':>5} {'status':<12} DONE"
    )
    lines = [header]
    for row in summary["jobs"]:
        end = seconds_text(row["end_s"]) + ("" if row["done_file"] else "~")
        tokens = "?" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}"
        lines.append(
            f"{row['label']:<28} {row['gpu']:>4} {seconds_text(row['start_s']):>8} {end:>8} "
            f"{'?' if row['wall_s'] is None else format(row['wall_s'], '.1f'):>8} {row['steps']:>9} "
            f"{tokens:>8} {row['attempts']:>5} {row['status']:<12} {'yes' if row['done_file'] else 'NO'}"
        )
    lines.append(
        f"(seconds since the first start, {summary['first_start']}, to the second; ~: no DONE, the card's last write)"
    )
    at_once = ", ".join(f"{k}: {v:.0f} s" for k, v in summary["seconds_running"].items()) or "-"
    lines.append(f"running at once: peak {summary['peak_running']}; time with k jobs running: {at_once}")
    for gpu, labels in summary["gpus"].items():
        lines.append(f"GPU {gpu}: {len(labels)} job(s): {' -> '.join(labels)}")
    conflicts = "; ".join(" & ".join(pair) for pair in summary["gpu_conflicts"]) or "none"
    lines.append(f"more than {summary['jobs_per_gpu']} job(s) on one GPU at once: {conflicts}")
    lines.append(f"span (first start -> last DONE): {seconds_text(summary['span_s'])} s")
    if summary["sweep_wall_s"] is not None:
        lead_in = summary["lead_in_s"]
        lead = "" if lead_in is None else f"; sweep start -> first job start {lead_in:.0f} s"
        lines.append(
            f"sweep wall {summary['sweep_wall_s']:.0f} s; launcher overhead (wall - span) "
            f"{seconds_text(summary['launcher_overhead_s'])} s{lead}"
        )
    expected = "" if summary["expected"] is None else f", expected {summary['expected']}"
    unfinished = "" if not summary["unfinished"] else f"; unfinished: {', '.join(summary['unfinished'])}"
    lines.append(
        f"jobs: {summary['found']} found, {summary['finished']} finished (done + DONE){expected}{unfinished}: "
        + ("OK" if summary["ok"] else "NOT OK")
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory (multirun/<sweep_name>)")
    parser.add_argument("--expect", type=int, help="the number of jobs the sweep must hold, all finished")
    parser.add_argument(
        "--sweep-wall", type=float, help="the sweep's wall time in seconds, measured by the caller"
    )
    parser.add_argument("--sweep-start", type=float, help="the sweep's start, seconds since the epoch")
    parser.add_argument(
        "--jobs-per-gpu",
        type=int,
        default=1,
        help="jobs the launcher may run on one GPU at once (hydra.launcher.jobs_per_gpu)",
    )
    parser.add_argument("--json", type=Path, help="write the summary here as JSON too")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: no sweep directory {args.sweep}", file=sys.stderr)
        return 2
    summary = summarize(
        find_jobs(args.sweep), args.expect, args.sweep_wall, args.sweep_start, args.jobs_per_gpu
    )
    summary["sweep"] = str(args.sweep)
    print("\n".join(report_lines(summary)))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
