"""benchmarks/study_report.py on synthetic sweeps written in tmp_path (run cards with `started` and `host`,
DONE files): when each job ran, the peak running at once and the time at each number, each GPU's jobs in
order, two jobs on one GPU at once, missing DONE, unfinished status, --expect. Run as a subprocess, as the
device script runs it (no test imports a benchmark script); every expected number is worked out by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "study_report.py"
DAY = "2026-01-01T"


def epoch(clock: str) -> float:
    """Seconds since the epoch of DAY + clock, in local time (as the script reads the cards' times)."""
    return time.mktime(time.strptime(DAY + clock, "%Y-%m-%dT%H:%M:%S"))


def write_job(
    sweep: Path,
    label: str,
    started: str,
    done: str | None,
    gpu: str | None,
    status: str = "done",
    card_written: str | None = None,
) -> Path:
    """One job folder: run.json as lbt.train writes it, DONE holding its finish time unless done is None."""
    job = sweep / label
    job.mkdir(parents=True)
    model, arm, seed = label.rsplit("-", 2)
    card = {
        "job": {"model": model, "arm": arm, "seed": int(seed[1:]), "sweep": sweep.name},
        "status": status,
        "started": DAY + started,
        "host": {
            "name": "node1",
            "cuda_visible_devices": gpu,
            "gpus": ["H100"] if gpu else [],
            "slurm_job": None,
        },
        "data": {"total_steps": 90},
        "trained_steps": 90 if status == "done" else 40,
    }
    if done is not None:
        card.update(wall_time_s=epoch(done) - epoch(started), tokens_per_s=20000.0)
        (job / "DONE").write_text(DAY + done + "\n", encoding="utf-8")
    (job / "run.json").write_text(json.dumps(card), encoding="utf-8")
    if card_written is not None:
        os.utime(job / "run.json", (epoch(card_written), epoch(card_written)))
    return job


def report(sweep: Path, *args: str) -> tuple[int, dict, str]:
    out = sweep.parent / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(sweep), "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(out.read_text(encoding="utf-8")), result.stdout


def three_gpu_sweep(tmp_path: Path) -> Path:
    """GPU 0: qwen-plus-s0 [0, 100), then qwen-minus-s1 [100, 180) (it starts in the second the first ends);
    GPU 1: qwen-plus-s1 [2, 120); GPU 2: qwen-minus-s0 [5, 50). Running at once: [0, 2) 1, [2, 5) 2, [5, 50) 3,
    [50, 120) 2, [120, 180) 1."""
    sweep = tmp_path / "study"
    write_job(sweep, "qwen-plus-s0", "00:00:00", "00:01:40", "0")
    write_job(sweep, "qwen-plus-s1", "00:00:02", "00:02:00", "1")
    write_job(sweep, "qwen-minus-s0", "00:00:05", "00:00:50", "2")
    write_job(sweep, "qwen-minus-s1", "00:01:40", "00:03:00", "0")
    (sweep / ".submitit" / "123").mkdir(parents=True)  # the launcher's and the analysis' folders: not jobs
    (sweep / "analysis").mkdir()
    return sweep


def test_overlap_peak_and_per_gpu_sequences(tmp_path):
    code, summary, text = report(three_gpu_sweep(tmp_path), "--expect", "4")
    assert code == 0 and summary["ok"]
    assert [j["label"] for j in summary["jobs"]] == [
        "qwen-plus-s0",
        "qwen-plus-s1",
        "qwen-minus-s0",
        "qwen-minus-s1",
    ]
    assert [(j["start_s"], j["end_s"]) for j in summary["jobs"]] == [(0, 100), (2, 120), (5, 50), (100, 180)]
    assert summary["peak_running"] == 3
    assert summary["seconds_running"] == {"1": 62.0, "2": 73.0, "3": 45.0}  # 2 + 60; 3 + 70; 45
    assert summary["gpus"] == {
        "0": ["qwen-plus-s0", "qwen-minus-s1"],
        "1": ["qwen-plus-s1"],
        "2": ["qwen-minus-s0"],
    }
    assert summary["gpu_conflicts"] == []
    assert summary["span_s"] == 180
    assert summary["found"] == summary["finished"] == 4 and summary["unfinished"] == []
    assert "GPU 0: 2 job(s): qwen-plus-s0 -> qwen-minus-s1" in text
    assert "running at once: peak 3" in text


def test_sweep_wall_gives_the_launcher_overhead_and_lead_in(tmp_path):
    sweep = three_gpu_sweep(tmp_path)
    _, summary, text = report(sweep, "--sweep-wall", "200", "--sweep-start", str(epoch("00:00:00") - 4))
    assert summary["launcher_overhead_s"] == 20.0  # 200 s wall - 180 s span
    assert summary["lead_in_s"] == 4.0
    assert "launcher overhead (wall - span) 20 s; sweep start -> first job start 4 s" in text


def test_two_jobs_on_one_gpu_at_once_are_named(tmp_path):
    sweep = tmp_path / "study"
    write_job(sweep, "qwen-plus-s0", "00:00:00", "00:01:00", "0")
    write_job(sweep, "qwen-plus-s1", "00:00:30", "00:01:30", "0")
    write_job(sweep, "qwen-plus-s2", "00:01:30", "00:02:00", "0")  # starts when s1 ends: no conflict
    _, summary, text = report(sweep)
    assert summary["gpu_conflicts"] == [["qwen-plus-s0", "qwen-plus-s1"]]
    assert summary["peak_running"] == 2
    assert "more than 1 job(s) on one GPU at once: qwen-plus-s0 & qwen-plus-s1" in text
    # With two jobs per GPU (hydra.launcher.jobs_per_gpu=2) that is allowed; a third at once is not.
    assert report(sweep, "--jobs-per-gpu", "2")[1]["gpu_conflicts"] == []
    write_job(sweep, "qwen-plus-s3", "00:00:45", "00:00:50", "0")
    assert report(sweep, "--jobs-per-gpu", "2")[1]["gpu_conflicts"] == [
        ["qwen-plus-s0", "qwen-plus-s1", "qwen-plus-s3"]
    ]


def test_missing_done_is_unfinished_and_placed_by_its_card(tmp_path):
    sweep = three_gpu_sweep(tmp_path)
    write_job(sweep, "llama-plus-s0", "00:00:10", None, "3", status="done", card_written="00:02:30")
    code, summary, text = report(sweep, "--expect", "5")
    assert code == 1 and not summary["ok"]
    assert summary["unfinished"] == ["llama-plus-s0"] and summary["finished"] == 4
    row = next(j for j in summary["jobs"] if j["label"] == "llama-plus-s0")
    assert (row["start_s"], row["end_s"], row["done_file"], row["finished"]) == (10, 150, False, False)
    assert summary["span_s"] == 180  # to the last DONE
    # [10, 50): qwen-plus-s0, qwen-plus-s1, qwen-minus-s0 and the job without DONE
    assert summary["peak_running"] == 4
    assert "NOT OK" in text and " 150~ " in text


def test_unfinished_status_fails_even_with_done(tmp_path):
    sweep = three_gpu_sweep(tmp_path)
    write_job(sweep, "llama-minus-s0", "00:00:20", "00:00:40", "3", status="interrupted")
    code, summary, _ = report(sweep)
    assert code == 1 and summary["unfinished"] == ["llama-minus-s0"]
    assert summary["gpus"]["3"] == ["llama-minus-s0"]


def test_expect_counts_missing_jobs_and_folders_without_a_card(tmp_path):
    sweep = three_gpu_sweep(tmp_path)
    assert report(sweep, "--expect", "4")[0] == 0
    code, summary, _ = report(sweep, "--expect", "18")  # 14 jobs never started
    assert code == 1 and summary["expected"] == 18 and summary["found"] == 4 and summary["unfinished"] == []
    (sweep / "llama-neutral-s2").mkdir()  # a job folder whose job died before its card
    code, summary, _ = report(sweep, "--expect", "5")
    row = summary["jobs"][-1]
    assert code == 1 and row["label"] == "llama-neutral-s2" and row["status"] == "no run.json"
    assert row["start_s"] is None and summary["unfinished"] == ["llama-neutral-s2"]


def test_cpu_jobs_share_one_row_and_never_conflict(tmp_path):
    sweep = tmp_path / "study"
    write_job(sweep, "tiny-plus-s0", "00:00:00", "00:00:10", None)
    write_job(sweep, "tiny-plus-s1", "00:00:00", "00:00:09", None)
    _, summary, _ = report(sweep)
    assert summary["gpus"] == {"-": ["tiny-plus-s0", "tiny-plus-s1"]}
    assert summary["gpu_conflicts"] == [] and summary["peak_running"] == 2
    assert summary["seconds_running"] == {"1": 1.0, "2": 9.0}


def test_a_job_starting_in_the_second_another_ends_does_not_overlap_it(tmp_path):
    sweep = tmp_path / "study"
    write_job(sweep, "qwen-plus-s0", "00:00:00", "00:01:00", "0")
    write_job(sweep, "qwen-plus-s1", "00:01:00", "00:02:00", "0")
    _, summary, _ = report(sweep)
    assert summary["peak_running"] == 1 and summary["seconds_running"] == {"1": 120.0}
    assert summary["gpu_conflicts"] == [] and summary["gpus"] == {"0": ["qwen-plus-s0", "qwen-plus-s1"]}
