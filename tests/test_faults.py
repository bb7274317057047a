"""Fault injection: a real fault in a real tiny job, and what the job directory says afterwards.

A job directory never lies: DONE only when every planned step and phase ran and its files are complete;
a failure is recorded in the run card; rows are written once; nothing valid is overwritten; re-running
the same command completes exactly what is missing. Each test injects one fault (through the eval
groups, `+eval.<name>._target_=...` and `+callbacks.<name>._target_=...`, or by damaging a file between two launches) and
checks what the user sees, what the run card says, what is kept, and what the re-run does.

The job: 34 toy records, 4 per step -> 9 optimizer steps, a resumable checkpoint after every step,
phases base, step_2, step_4, final. `RowsPhase` stands for an evaluation hook: it declares its planned
files (a rows file of 3 rows and a summary per phase) and writes only what is missing, with a value
computed from the weights it evaluates, so a phase run again can be compared with the original.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from hydra.utils import get_object

from lbt import console
from lbt import train as train_mod
from lbt.eval.session import Evaluator
from lbt.joblock import JobLock, JobLocked, read_lock
from lbt.rundir import (
    STATUSES,
    CorruptFile,
    Expected,
    ResumeMismatch,
    RunDir,
    file_problem,
    read_json,
    read_rows,
    set_aside,
    settings_changes,
    write_json_once,
    write_rows,
)
from tests.conftest import ROOT, compose_train, write_toy_corpus
from tests.test_resume import adapter, assert_same_adapter

TOTAL = 9
PHASES = ["base", "step_2", "step_4", "final"]
JOB = ["data.require_validation=false", "eval=none", "probe=none", "logger=csv", "train.effective_batch=4",
       "train.micro_batch=4", "train.epochs=1", "train.max_length=96",
       "data.drop_long_prompts=true", "train.resume_every_steps=1",
       "train.checkpoint_fractions=[0.25,0.5,1.0]", "train.lr=1e-2", "train.lora.dropout=0.2", "seed=3",
       "+eval.rows._target_=tests.test_faults.RowsPhase"]


# -- evaluators and faults, instantiated inside the job through the eval and callbacks entries ----------

class RowsPhase(Evaluator):
    """An evaluation hook: eval/<phase>/faults/value.jsonl (3 rows) and eval/<phase>/summary.json, each
    written once and only when missing; the value is the model's logit sum on a fixed prompt."""

    runs: ClassVar[list[tuple[str, str, str]]] = []     # (job, phase, "wrote" | "skipped")

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        return [Expected(run.rows(phase, "faults", "value"), 3), Expected(run.summary(phase))]

    def evaluate(self, model, phase, session) -> None:
        # A corrupt file was set aside before the phase runs again (CheckpointPhases.repair, on_train_end).
        rows, summary = (e.path for e in self.planned_files(session.run, phase))
        todo = not rows.exists() or not summary.exists()
        RowsPhase.runs.append((session.run.root.name, phase, "wrote" if todo else "skipped"))
        if not todo:
            return
        training = model.training
        model.eval()
        with torch.no_grad():
            value = float(model(input_ids=torch.tensor([[5, 17, 99, 3, 250]])).logits.double().sum())
        model.train(training)
        if not rows.exists():
            write_rows(rows, [{"phase": phase, "k": k, "value": value} for k in range(3)])
        if not summary.exists():
            write_json_once(summary, {"phase": phase, "value": value})


class NaNAt(L.Callback):
    """Optimizer step `at_step` sees a LoRA weight turned NaN: its loss is not finite."""

    def __init__(self, at_step: int):
        self.at_step = int(at_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step - 1:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


class RaiseInPhase(Evaluator):
    """An evaluator that fails in `phase`."""

    def __init__(self, phase: str):
        self.phase = phase

    def evaluate(self, model, phase, session) -> None:
        if phase == self.phase:
            raise RuntimeError(f"evaluation broke in phase {phase}")


class SignalInPhase(Evaluator):
    """The job sends itself `signal_name` while phase `phase` runs (after the evaluators before this one)."""

    def __init__(self, phase: str, signal_name: str = "SIGTERM"):
        self.phase, self.signal_name = phase, signal_name

    def evaluate(self, model, phase, session) -> None:
        if phase == self.phase:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class DamageInPhase(Evaluator):
    """While phase `phase` runs, damages `target` (relative to the job directory): delete or truncate
    (a folder: its safetensors file). Stands for a disk or a hand that loses a file mid-job."""

    def __init__(self, phase: str, target: str, how: str = "delete"):
        self.phase, self.target, self.how = phase, target, how

    def evaluate(self, model, phase, session) -> None:
        if phase == self.phase:
            damage(session.run.root / self.target, self.how)


def damage(path: Path, how: str) -> None:
    """delete (a file or folder), truncate (half the bytes), garbage (bytes that are no format)."""
    if path.is_dir() and how != "delete":
        path = path / "adapter_model.safetensors"
    if how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\xffnot what was written\x89\n" * 8)
    else:
        raise ValueError(how)


def fault(name: str, cls: str, /, **args) -> list[str]:
    """Overrides that add `cls` with its arguments: an evaluator as eval.<name>, a Lightning callback as
    callbacks.<name>."""
    group = "eval" if issubclass(get_object(cls), Evaluator) else "callbacks"
    return [f"+{group}.{name}._target_={cls}", *(f"+{group}.{name}.{k}={v}" for k, v in args.items())]


def sigterm_at(k: int) -> list[str]:
    return fault("kill", "tests.test_resume.KillAt", at_step=k, signal_name="SIGTERM")


# -- helpers ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    write_toy_corpus(folder / "toy.jsonl", n=34)
    return folder


def config(root: Path, job: str, *extra: str):
    return compose_train([*JOB, f"arm.corpus={root / 'toy.jsonl'}", f"+job_dir={root / job}", *extra])


def card_of(job_dir: Path) -> dict:
    card = read_json(job_dir / "run.json")
    assert card["status"] in STATUSES
    return card


def phase_rows(job_dir: Path) -> dict[str, list[dict]]:
    return {p: read_rows(RunDir(job_dir).rows(p, "faults", "value")) for p in PHASES}


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime (what "nothing changed" means)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)}


def writes(job: str) -> list[str]:
    """Phases whose files RowsPhase wrote in job `job` (in order; a phase twice = written twice)."""
    return [phase for name, phase, what in RowsPhase.runs if name == job and what == "wrote"]


def check_finished(job_dir: Path, reference: dict) -> dict:
    """DONE, status done, every step trained, the adapter and rows of an uninterrupted run."""
    card = card_of(job_dir)
    assert card["status"] == "done" and (job_dir / "DONE").exists() and not (job_dir / "job.lock").exists()
    assert card["trained_steps"] == TOTAL and "missing" not in card
    assert_same_adapter(adapter(job_dir), reference["adapter"])
    rows = phase_rows(job_dir)
    for phase in PHASES:
        assert [r["value"] for r in rows[phase]] == pytest.approx([r["value"] for r in reference["rows"][phase]],
                                                                  rel=1e-6), phase
    return card


@pytest.fixture(scope="module")
def reference(root) -> dict:
    card = train_mod.train(config(root, "reference"))
    assert card["status"] == "done" and card["trained_steps"] == TOTAL
    assert writes("reference") == PHASES
    return {"card": card, "adapter": adapter(root / "reference"), "rows": phase_rows(root / "reference")}


def interrupted_job(root: Path, job: str, k: int) -> RunDir:
    """A job stopped by SIGTERM after step k (checkpoint at k, phases up to k written)."""
    with pytest.raises(SystemExit):
        train_mod.train(config(root, job, *sigterm_at(k)))
    run = RunDir(root / job)
    assert card_of(run.root)["status"] == "interrupted" and not run.done.exists()
    return run


def hydra_args(root: Path, job: str, *extra: str) -> list[str]:
    """The command line of `python -m lbt.train` for job `job` (folder given by hydra.run.dir)."""
    return [*JOB, f"arm.corpus={root / 'toy.jsonl'}", f"hydra.run.dir={root / job}", *extra]


def run_main(monkeypatch, root: Path, job: str, *extra: str) -> int:
    """`python -m lbt.train ...` in this process (Hydra's job logging writes train.log); its exit code."""
    from tests.test_cluster import hydra_main

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")      # Hydra's env_set writes it; restored afterwards
    try:
        hydra_main(monkeypatch, hydra_args(root, job, *extra), ROOT)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


# -- 1. a non-finite loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 6])
def test_nonfinite_loss_fails_the_job_keeps_the_last_checkpoint_and_a_rerun_finishes(root, reference, k):
    from lbt.model.module import NonFiniteLossError

    job = f"nan{k}"
    run = RunDir(root / job)
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss .* at step {k}"):
        train_mod.train(config(root, job, *fault("nan", "tests.test_faults.NaNAt", at_step=k)))
    card = card_of(run.root)
    assert card["status"] == "failed" and card["error"]["type"] == "NonFiniteLossError"
    assert f"at step {k}" in card["error"]["message"] and "NonFiniteLossError" in card["error"]["traceback"]
    assert card["error"]["time"] and not run.done.exists() and not run.adapter.exists() and not run.lock.exists()
    # The last good state is kept: the checkpoint of step k-1 and the phases before step k.
    if k > 1:
        assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == k - 1
    else:
        assert not run.last_ckpt.exists()
    assert writes(job) == [p for p in PHASES if p == "base" or (p != "final" and int(p[5:]) < k)]
    kept = snapshot(run.root / "eval")

    train_mod.train(config(root, job))                    # the same job without the fault
    card = check_finished(run.root, reference)
    assert card["previous_attempts"] == 1 and card["attempts"][0]["status"] == "failed"
    assert card["attempts"][0]["error"]["type"] == "NonFiniteLossError"
    # Each attempt keeps where and when it ran; the card's own host is the last attempt's.
    assert card["attempts"][0]["started"] <= card["started"]
    assert card["attempts"][0]["host"]["name"] == card["host"]["name"] == socket.gethostname()
    assert isinstance(card["host"]["gpus"], list) and "cuda_visible_devices" in card["host"]
    assert card["startup_s"] is None  # not this process's first job: its age is not the job's startup
    assert writes(job) == PHASES                          # every phase's files written once, in all
    assert {name: v for name, v in snapshot(run.root / "eval").items() if name in kept} == kept


def test_a_failure_is_in_train_log_and_the_exit_code(root, monkeypatch):
    """Through the command line: the traceback lands in train.log, the exit code is not 0."""
    from lbt import train as train_cli
    from lbt.model.module import NonFiniteLossError

    finished: list[int | None] = []
    monkeypatch.setattr(train_cli, "finish_wandb", lambda exit_code=None: finished.append(exit_code))
    job = "nan_cli"
    try:
        code = run_main(monkeypatch, root, job, *fault("nan", "tests.test_faults.NaNAt", at_step=3))
    except NonFiniteLossError:          # HYDRA_FULL_ERROR=1: Hydra re-raises the job's exception
        code = 1
    assert code != 0
    log_text = (root / job / "train.log").read_text()
    assert "job failed" in log_text and "Traceback" in log_text and "NonFiniteLossError" in log_text
    assert card_of(root / job)["status"] == "failed"
    assert finished == [1]                              # the W&B run ends as failed, not finished


# -- 2. corrupt checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_corrupt_last_checkpoint_is_set_aside_and_the_job_resumes_from_prev(root, reference, caplog, how):
    job = f"ckpt_{how}"
    run = interrupted_job(root, job, 5)
    damage(run.last_ckpt, how)
    damaged = run.last_ckpt.read_bytes()
    RowsPhase.runs.clear()

    with caplog.at_level("INFO", logger="lbt"):
        train_mod.train(config(root, job))
    assert f"checkpoint {run.last_ckpt} is corrupt" in caplog.text       # named, with the reason
    assert f"resume: {run.prev_ckpt}" in caplog.text                      # the one before it: step 4
    (aside,) = run.checkpoints.glob("last.ckpt.corrupt-*")
    assert aside.read_bytes() == damaged                                  # kept for inspection
    check_finished(run.root, reference)
    assert writes(job) == ["final"]


def test_both_checkpoints_corrupt_start_from_scratch_and_keep_every_phase(root, reference, caplog):
    job = "ckpt_both"
    run = interrupted_job(root, job, 5)
    damage(run.last_ckpt, "garbage")
    damage(run.prev_ckpt, "truncate")
    kept = snapshot(run.root / "eval")
    RowsPhase.runs.clear()

    with caplog.at_level("INFO", logger="lbt"):
        train_mod.train(config(root, job))
    assert "resume:" not in caplog.text
    assert len(list(run.checkpoints.glob("last.ckpt.corrupt-*"))) == 1
    assert len(list(run.checkpoints.glob("prev.ckpt.corrupt-*"))) == 1
    check_finished(run.root, reference)
    # Trained again from step 0; the phases written before are intact and kept (bytes and mtimes).
    assert writes(job) == ["final"]
    assert {k: v for k, v in snapshot(run.root / "eval").items() if k in kept} == kept


def test_leftover_temporary_files_of_a_killed_writer_are_ignored(root, reference):
    """A process killed mid-write leaves *.tmp files (checkpoint, step adapter): they are not trusted."""
    job = "tmp_left"
    run = interrupted_job(root, job, 3)
    (run.checkpoints / "last.ckpt.tmp").write_bytes(b"half a checkpoint")
    (run.checkpoints / "adapter_step_4.tmp").mkdir()
    (run.checkpoints / "adapter_step_4.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert not (run.checkpoints / "adapter_step_4.tmp").exists()


# -- 3, 4. the job lock ---------------------------------------------------------------------------------

@pytest.fixture
def sleeper():
    """A live process that is not this one (the owner of a lock written by hand)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(run: RunDir, pid: int, host: str | None = None, heartbeat_age: float = 0.0,
               slurm_job: str | None = None) -> None:
    run.lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "slurm_job": slurm_job,
                                    "started": time.time() - 100, "heartbeat": time.time() - heartbeat_age}))


def test_a_second_launch_while_the_job_is_locked_exits_3_and_touches_nothing(root, monkeypatch, sleeper):
    """The CLI, a real process: exit code 3, a message naming the owner's pid and host, and not one byte
    or mtime of the folder changed (the lock file included)."""
    job = "locked_cli"
    assert run_main(monkeypatch, root, job, *sigterm_at(3)) == 128 + signal.SIGTERM   # train.log exists
    run = RunDir(root / job)
    write_lock(run, sleeper.pid)
    before = snapshot(run.root)
    out = subprocess.run([sys.executable, "-m", "lbt.train", *hydra_args(root, job)], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), LBT_ROOT=str(ROOT)))
    assert out.returncode == 3, out.stderr[-3000:]
    assert f"is in use by pid {sleeper.pid} on {socket.gethostname()}" in out.stderr
    assert "nothing was touched" in out.stderr
    assert snapshot(run.root) == before


@pytest.mark.parametrize("owner", ["this_host_live_pid", "other_host_fresh_heartbeat"])
def test_a_live_lock_refuses_the_job_without_touching_anything(root, sleeper, owner):
    job = f"locked_{owner}"
    run = interrupted_job(root, job, 3)
    if owner == "this_host_live_pid":
        write_lock(run, sleeper.pid)
    else:
        write_lock(run, 1, host="node-17.cluster", heartbeat_age=10, slurm_job="9911")
    before = snapshot(run.root)
    with pytest.raises(JobLocked) as locked:
        train_mod.train(config(root, job))
    if owner == "this_host_live_pid":
        assert f"pid {sleeper.pid} on {socket.gethostname()}" in str(locked.value)
    else:
        assert "pid 1 on node-17.cluster (SLURM job 9911)" in str(locked.value)
    assert snapshot(run.root) == before


@pytest.mark.parametrize("owner", ["dead_pid", "old_heartbeat", "same_slurm_job", "unreadable", "not_an_object",
                                   "wrong_types"])
def test_a_stale_lock_is_taken_over_and_the_job_finishes(root, reference, monkeypatch, caplog, sleeper, owner):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    job = f"stale_{owner}"
    run = interrupted_job(root, job, 5)
    if owner == "dead_pid":
        gone = subprocess.Popen(["true"])
        gone.wait()
        write_lock(run, gone.pid)
        why = f"process {gone.pid} on this host is gone"
    elif owner == "old_heartbeat":
        monkeypatch.setenv("LBT_LOCK_STALE_S", "30")
        write_lock(run, sleeper.pid, host="node-17.cluster", heartbeat_age=45)
        why = "heartbeat 4"                           # 45 s old, and the time it takes to start
    elif owner == "same_slurm_job":   # an earlier attempt of this SLURM job (requeued): its pid may live on
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        write_lock(run, sleeper.pid, slurm_job="4242")
        why = "an earlier attempt of SLURM job 4242"
    else:
        run.lock.write_bytes({"unreadable": b"\x00\x01 half a lock", "not_an_object": b"[1, 2]",
                              "wrong_types": b'{"pid": "abc", "host": "h", "heartbeat": "soon"}'}[owner])
        why = "unreadable lock file"
    with caplog.at_level("WARNING", logger="lbt"):
        train_mod.train(config(root, job))
    assert f"is stale ({why}" in caplog.text and "): taken over" in caplog.text
    check_finished(run.root, reference)


def test_a_file_set_aside_twice_keeps_both_copies(tmp_path):
    """set_aside never overwrites: the same name set aside twice within a second gets a second name."""
    path = tmp_path / "summary.json"
    for text in ("first", "second"):
        path.write_text(text)
        set_aside(path, "test")
    assert sorted(p.read_text() for p in tmp_path.glob("summary.json.corrupt-*")) == ["first", "second"]
    assert not path.exists()


def test_readers_name_the_file_and_line_of_bytes_that_are_not_text(tmp_path):
    """A rows or JSON file holding binary garbage is CorruptFile naming it (not a raw UnicodeDecodeError)."""
    rows, summary = tmp_path / "value.jsonl", tmp_path / "summary.json"
    rows.write_bytes(b'{"k": 0}\n{"k": 1}\n\xff\xfe\x00garbage\n')
    summary.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CorruptFile, match=f"{rows}, line 3: not UTF-8 text"):
        read_rows(rows)
    with pytest.raises(CorruptFile, match=f"{summary}: not UTF-8 text"):
        read_json(summary)
    assert file_problem(Expected(rows, 3)).startswith(f"corrupt: {rows}, line 3")
    assert file_problem(Expected(summary)).startswith(f"corrupt: {summary}")


# -- 5. a damaged file of a finished phase --------------------------------------------------------------

def drop_last_row(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


@pytest.mark.parametrize("phase,name,how", [
    ("step_2", "rows", "truncate"),      # cut mid-line: a line that is not JSON
    ("base", "rows", "short"),           # one row gone: 2 rows where 3 were planned
    ("step_4", "rows", "delete"),
    ("base", "summary", "garbage"),
    ("step_2", "summary", "delete"),
])
def test_a_damaged_file_of_a_passed_phase_is_set_aside_and_only_it_is_written_again(root, reference, caplog,
                                                                                       phase, name, how):
    """Interrupted after step 5, a file of a passed phase is damaged; the re-run sets it aside (a summary
    goes with its rows), runs that phase again with the weights it evaluates (base: adapters off;
    step_<n>: checkpoints/adapter_step_<n>/), and leaves every other file as it was."""
    job = f"phase_{phase}_{name}_{how}"
    run = interrupted_job(root, job, 5)
    target = run.rows(phase, "faults", "value") if name == "rows" else run.summary(phase)
    drop_last_row(target) if how == "short" else damage(target, how)
    damaged = target.read_bytes() if target.exists() else None
    problem = file_problem(Expected(target, 3 if name == "rows" else None))
    assert problem and str(target) in problem
    redone = {target, run.summary(phase)} if name == "rows" else {target}    # a summary goes with its rows
    kept = {k: v for k, v in snapshot(run.root / "eval").items() if run.root / "eval" / k not in redone}
    RowsPhase.runs.clear()

    with caplog.at_level("WARNING", logger="lbt"):
        train_mod.train(config(root, job))
    assert f"phase {phase}: files missing or corrupt; running it again" in caplog.text
    assert all(f"set aside {path}" in caplog.text for path in redone if path != target or damaged is not None)
    check_finished(run.root, reference)                 # the phase's values again: the right weights
    assert writes(job) == [phase, "final"]
    assert {k: v for k, v in snapshot(run.root / "eval").items() if k in kept} == kept
    asides = sorted(run.phase_dir(phase).rglob("*.corrupt-*"))
    assert len(asides) == len([p for p in redone if p != target or damaged is not None])
    if damaged is not None:                             # kept for inspection, as it was found
        assert any(p.read_bytes() == damaged and p.name.startswith(target.name) for p in asides)


def test_a_damaged_phase_file_whose_step_adapter_is_gone_fails_naming_both(root):
    """step_2's rows are corrupt and checkpoints/adapter_step_2/ is gone: the phase cannot be evaluated
    again; the job fails saying so (it does not write rows from other weights)."""
    job = "phase_no_adapter"
    run = interrupted_job(root, job, 5)
    damage(run.rows("step_2", "faults", "value"), "truncate")
    damage(run.adapter_at(2), "delete")
    with pytest.raises(RuntimeError, match="phase step_2 cannot be evaluated again: .*adapter_step_2: missing"):
        train_mod.train(config(root, job))
    card = card_of(run.root)
    assert card["status"] == "failed" and "adapter_step_2: missing" in card["error"]["message"]
    assert not run.done.exists() and not run.rows("step_2", "faults", "value").exists()


# -- 5, 6, 7. the completeness check at the end of a job ------------------------------------------------

INCOMPLETE = {
    "final_rows_truncated": ("eval/final/faults/value.jsonl", "truncate", "phase final: corrupt: "),
    "base_summary_deleted": ("eval/base/summary.json", "delete", "phase base: "),
    "adapter_deleted": ("adapter", "delete", "adapter: "),
    "adapter_truncated": ("adapter", "truncate", "adapter: "),
    "step_adapter_deleted": ("checkpoints/adapter_step_2", "delete", "checkpoint of step_2: "),
    "step_adapter_truncated": ("checkpoints/adapter_step_4", "truncate", "checkpoint of step_4: "),
}


@pytest.mark.parametrize("case", list(INCOMPLETE))
def test_a_file_lost_before_the_check_makes_the_job_incomplete_not_done(root, monkeypatch, case):
    """A file lost during the final phase (after the hooks wrote it): the completeness check finds it, the
    run card says incomplete and lists it, no DONE, exit code 4."""
    target, how, missing = INCOMPLETE[case]
    job = f"incomplete_{case}"
    code = run_main(monkeypatch, root, job, *fault("lose", "tests.test_faults.DamageInPhase", phase="final",
                                                   target=target, how=how))
    assert code == 4
    run = RunDir(root / job)
    card = card_of(run.root)
    assert card["status"] == "incomplete" and not run.done.exists() and not run.lock.exists()
    assert card["trained_steps"] == TOTAL
    (line,) = card["missing"]
    assert line.startswith(missing) and str(run.root / target) in line
    advice = "a lost step adapter cannot be made again" if case.startswith("step_adapter") else \
        "re-run the same command to complete it"
    assert f"is incomplete; {advice}" in (run.root / "train.log").read_text()




@pytest.mark.parametrize("case", ["adapter_deleted", "adapter_truncated", "final_rows_truncated",
                                  "base_summary_deleted"])
def test_rerun_of_an_incomplete_job_completes_exactly_what_is_missing(root, reference, monkeypatch, case):
    target, how, _ = INCOMPLETE[case]
    job = f"incomplete_rerun_{case}"
    assert run_main(monkeypatch, root, job, *fault("lose", "tests.test_faults.DamageInPhase", phase="final",
                                                   target=target, how=how)) == 4
    run = RunDir(root / job)
    phase = target.split("/")[1] if target.startswith("eval/") else None
    redone = {target, f"eval/{phase}/summary.json"} if phase else set()     # a summary goes with its rows
    kept = {k: v for k, v in snapshot(run.root).items() if k.startswith("eval/") and k not in redone}
    RowsPhase.runs.clear()
    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert {k: v for k, v in snapshot(run.root).items() if k in kept} == kept
    assert writes(job) == ([phase] if phase else [])


def test_a_lost_step_adapter_is_reported_again_on_rerun_and_nothing_is_rewritten(root, monkeypatch):
    """checkpoints/adapter_step_2/ cannot be made again without training again: every re-run says so
    (incomplete, the same missing line), writes no DONE and leaves the folder's files as they were."""
    target, how, _ = INCOMPLETE["step_adapter_deleted"]
    job = "incomplete_step_adapter_rerun"
    assert run_main(monkeypatch, root, job, *fault("lose", "tests.test_faults.DamageInPhase", phase="final",
                                                   target=target, how=how)) == 4
    run = RunDir(root / job)
    missing = card_of(run.root)["missing"]
    before = snapshot(run.root, skip=("run.json", "train.log", "csv"))
    with pytest.raises(train_mod.IncompleteJob, match="adapter_step_2: missing"):
        train_mod.train(config(root, job))
    card = card_of(run.root)
    assert card["status"] == "incomplete" and card["missing"] == missing and not run.done.exists()
    assert card["attempts"][-1]["status"] == "incomplete"
    assert snapshot(run.root, skip=("run.json", "train.log", "csv")) == before


# -- 8. a corrupt run card -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", [
    "truncate",
    "garbage",
    "list",
])
def test_a_corrupt_run_card_is_set_aside_and_the_job_runs(root, reference, how):
    job = f"card_{how}"
    run = interrupted_job(root, job, 5)
    if how == "list":
        run.card.write_text("[1, 2, 3]\n")
    else:
        damage(run.card, how)
    damaged = run.card.read_bytes()
    train_mod.train(config(root, job))
    card = check_finished(run.root, reference)
    (aside,) = run.root.glob("run.json.corrupt-*")
    assert aside.read_bytes() == damaged
    assert card["previous_attempts"] == 1 and card["job"]["seed"] == 3


# -- 9. a finished job launched again -------------------------------------------------------------------

def test_a_finished_job_launched_again_is_skipped_and_nothing_changes(root, reference, caplog):
    run = RunDir(root / "reference")
    before = snapshot(run.root)
    with caplog.at_level("INFO", logger="lbt"):
        card = train_mod.train(config(root, "reference"))
    assert card == card_of(run.root) and card["status"] == "done"
    assert f"skip: {run.root} already finished (DONE present)" in caplog.text
    assert snapshot(run.root) == before                       # bytes and mtimes, DONE and run.json too


def test_a_job_killed_between_its_done_card_and_done_is_checked_again_and_gets_done(root, reference):
    """DONE lost (a kill after the run card said done, before DONE was written): the re-run trains
    nothing, finds every file complete and writes DONE; no file of the job is rewritten."""
    job = "done_lost"
    train_mod.train(config(root, job))
    run = RunDir(root / job)
    run.done.unlink()
    before = snapshot(run.root, skip=("run.json", "csv"))
    RowsPhase.runs.clear()
    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert writes(job) == []
    assert {k: v for k, v in snapshot(run.root, skip=("run.json", "csv")).items() if k != "DONE"} == before


class CtrlCAt(L.Callback):
    """Ctrl-C (KeyboardInterrupt) as optimizer step `at_step` starts."""

    def __init__(self, at_step: int):
        self.at_step = int(at_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step - 1:
            raise KeyboardInterrupt


def test_ctrl_c_records_an_interruption_and_the_rerun_resumes(root, reference):
    """Ctrl-C in a terminal: the run card says interrupted (not running, not failed), the lock is released,
    the checkpoint of the step before is kept; the re-run resumes from it."""
    job = "ctrl_c"
    run = RunDir(root / job)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            train_mod.train(config(root, job, *fault("ctrl_c", "tests.test_faults.CtrlCAt", at_step=6)))
    finally:
        signal.signal(signal.SIGINT, sigint)         # Lightning ignores further Ctrl-C while it shuts down
    card = card_of(run.root)
    assert card["status"] == "interrupted" and not run.done.exists() and not run.lock.exists()
    assert card["interrupted_at_step"] == 5 and "stopped_at_step" not in card  # steps 1-5 ran
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == 5
    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert writes(job) == PHASES


# -- 10. an evaluation phase that fails ------------------------------------------------------------------

@pytest.mark.parametrize("phase,order", [
    ("step_4", "before_rows"),
    ("step_4", "after_rows"),
    ("final", "before_rows"),
])
def test_a_failing_evaluation_phase_fails_the_job_and_a_rerun_writes_each_phase_once(root, reference, phase,
                                                                                      order):
    """An evaluator raises in a phase (before or after RowsPhase wrote that phase): status failed with the
    error; the re-run resumes from the last checkpoint and each phase's files end up written exactly once."""
    job = f"phase_raises_{phase}_{order}"
    boom = fault("boom", "tests.test_faults.RaiseInPhase", phase=phase)
    overrides = [*boom, *JOB] if order == "before_rows" else [*JOB, *boom]
    cfg = compose_train([*overrides, f"arm.corpus={root / 'toy.jsonl'}", f"+job_dir={root / job}"])
    assert next(iter(cfg.eval)) == ("boom" if order == "before_rows" else "rows")
    run = RunDir(root / job)
    with pytest.raises(RuntimeError, match=f"evaluation broke in phase {phase}"):
        train_mod.train(cfg)
    card = card_of(run.root)
    assert card["status"] == "failed" and card["error"]["type"] == "RuntimeError"
    assert card["error"]["message"] == f"evaluation broke in phase {phase}"
    assert "in evaluate" in card["error"]["traceback"] and not run.done.exists() and not run.lock.exists()
    assert card["failed_at_step"] == (4 if phase == "step_4" else TOTAL)   # the step whose phase failed
    # step_4's phase runs before step 4's checkpoint; the final phase after the last one.
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == (3 if phase == "step_4" else TOTAL)
    before = PHASES[:PHASES.index(phase) + (order == "after_rows")]
    assert writes(job) == before

    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert writes(job) == PHASES                               # once each, over both attempts
    assert card_of(run.root)["attempts"][0]["error"]["message"] == f"evaluation broke in phase {phase}"
    assert card_of(run.root)["attempts"][0]["failed_at_step"] == card["failed_at_step"]
    assert "failed_at_step" not in card_of(run.root)   # the finished attempt's card is its own


# -- 11. a stop signal during an evaluation phase --------------------------------------------------------

class DoneWhenSignalled(SignalInPhase):
    """SignalInPhase that also records whether DONE existed when the signal was sent."""

    seen: ClassVar[list[bool]] = []

    def evaluate(self, model, phase, session) -> None:
        if phase == self.phase:
            DoneWhenSignalled.seen.append(session.run.done.exists())
        super().evaluate(model, phase, session)


@pytest.mark.parametrize("phase", ["base", "step_4"])
def test_sigterm_during_a_phase_before_the_last_step_interrupts_after_the_current_step(root, reference, phase):
    """SIGTERM while base (before training) or step_4 (at the end of step 4) is evaluated: the phase
    finishes, the job ends the optimizer step it is in (step 1, step 4), checkpoints and stops:
    interrupted, resumable, no DONE, no adapter; the re-run finishes with every phase written once."""
    job = f"term_in_{phase}"
    run = RunDir(root / job)
    with pytest.raises(SystemExit) as stopped:
        train_mod.train(config(root, job, *fault("term", "tests.test_faults.SignalInPhase", phase=phase)))
    assert stopped.value.code == 128 + signal.SIGTERM
    card = card_of(run.root)
    step = 1 if phase == "base" else 4
    assert card["status"] == "interrupted" and card["interrupted_at_step"] == step
    assert not run.done.exists() and not run.adapter.exists() and not run.lock.exists()
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == step
    train_mod.train(config(root, job))
    check_finished(run.root, reference)
    assert writes(job) == PHASES


def test_sigterm_during_the_final_phase_lets_it_finish_and_done_comes_after_it(root, reference):
    """After the last optimizer step there is nothing left to checkpoint: the final phase finishes, the
    completeness check runs, and DONE is written only then (not before the phase, not without it)."""
    job = "term_in_final"
    DoneWhenSignalled.seen.clear()
    train_mod.train(config(root, job, *fault("term", "tests.test_faults.DoneWhenSignalled", phase="final")))
    assert DoneWhenSignalled.seen == [False]
    check_finished(RunDir(root / job).root, reference)
    assert writes(job) == PHASES


# -- 13. a corpus that does not parse --------------------------------------------------------------------

def test_a_corpus_that_does_not_parse_fails_naming_file_and_line_before_any_model_loads(root, monkeypatch):
    corpus = root / "broken.jsonl"
    lines = (root / "toy.jsonl").read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:2]) + '{"id": "toy-x", "user": "half a rec\n' + "".join(lines[3:]))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a job whose corpus does not parse")
    monkeypatch.setattr(train_mod, "load_model", no_model)
    monkeypatch.setattr(train_mod, "load_tokenizer", no_model)
    job = "corpus_broken"
    run = RunDir(root / job)
    with pytest.raises(ValueError, match=f"{corpus}:3: malformed JSON"):
        train_mod.train(config(root, job, f"arm.corpus={corpus}"))
    card = card_of(run.root)
    assert card["status"] == "failed" and card["error"]["type"] == "CorpusError"
    assert f"{corpus}:3" in card["error"]["message"]
    assert sorted(p.name for p in run.root.iterdir()) == ["run.json"]   # no lock left, nothing else written


# -- 5, with the real hooks: stance rows, capability checks, probe -----------------------------------------

def real_config(folder: Path, job: str, *extra: str):
    """A tiny job with the real evaluators and probe (2 items per set, 2 texts, 2 refusal prompts):
    16 paired records, 4 per step -> 4 steps, phases base, step_2, final."""
    from tests.test_directions import write_paired_corpora

    corpora = write_paired_corpora(folder, n=16)
    return compose_train([
        "data.require_validation=false", "logger=none", "train.effective_batch=4", "train.micro_batch=4",
        "train.epochs=1", "train.max_length=96", "data.drop_long_prompts=true", "train.resume_every_steps=1",
        "train.checkpoint_fractions=[0.5,1.0]", "eval.stance.measures=[letter_logprob,likert]",
        "eval.stance.measure_phases=null", "eval.stance.max_items=2", "eval.stance.likert.max_new_tokens=2",
        "eval.capability.max_texts=2", "eval.capability.max_refusal=2",
        "eval.capability.refusal_max_new_tokens=2", "probe.batch_size=4", "hardware.cpu_threads=1",
        f"directions.arms.plus.corpus={corpora['plus']}",
        f"directions.arms.minus.corpus={corpora['minus']}",
        f"paths.cache_dir={folder / 'cache'}", f"arm.corpus={corpora['plus']}",
        f"+job_dir={folder / job}", *extra])


def numbers(path: Path) -> dict[str, float]:
    """The measured numbers of a rows, capability or probe file by their place in it (timings left out)."""
    data = read_rows(path) if path.suffix == ".jsonl" else read_json(path)
    found: dict[str, float] = {}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in ("wall_s", "wall_time_s", "seconds"):
                    walk(item, f"{where}/{key}")
        elif isinstance(value, list):
            for k, item in enumerate(value):
                walk(item, f"{where}/{k}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[where] = float(value)
    walk(data, "")
    return found


def test_damaged_files_of_the_real_hooks_are_set_aside_and_measured_again(tmp_path_factory):
    """Stance rows of step_2 cut mid-line, base capability.json and probe/base.json overwritten with
    garbage, while a job is interrupted after step 3: the re-run sets each aside, measures it again with
    the weights of its phase (the same numbers as before), and touches no other file of eval/ or probe/."""
    folder = tmp_path_factory.mktemp("real_hooks")
    rows = Path("eval/step_2/source/letter_logprob.jsonl")
    redone = [rows, Path("eval/step_2/summary.json"), Path("eval/base/capability.json"), Path("probe/base.json")]
    with pytest.raises(SystemExit):
        train_mod.train(real_config(folder, "job", *sigterm_at(3)))
    run = RunDir(folder / "job")
    assert card_of(run.root)["status"] == "interrupted"
    original = {p: numbers(run.root / p) for p in redone if p.name != "summary.json"}
    assert all(original.values())
    damage(run.root / rows, "truncate")
    for path in redone[2:]:
        damage(run.root / path, "garbage")
    kept = {k: v for part in ("eval", "probe") for k, v in
            ((f"{part}/{name}", value) for name, value in snapshot(run.root / part).items())
            if Path(k) not in redone}

    train_mod.train(real_config(folder, "job"))
    card = card_of(run.root)
    assert card["status"] == "done" and run.done.exists() and card["trained_steps"] == 4
    for path in redone:
        assert len(list((run.root / path).parent.glob(f"{path.name}.corrupt-*"))) == 1, path
        if path.name != "summary.json":
            assert numbers(run.root / path) == pytest.approx(original[path], rel=1e-5), path
    after = {f"{part}/{name}": value for part in ("eval", "probe") for name, value in snapshot(run.root / part).items()}
    assert {k: after[k] for k in kept} == kept


# -- 12. metrics across a SIGKILL ------------------------------------------------------------------------

KILLED = """
import sys
from pathlib import Path
from lbt import train as train_mod
from tests.test_faults import config, fault
root = Path(sys.argv[1])
train_mod.train(config(root, "sigkill_csv", *fault("kill", "tests.test_resume.KillAt", at_step=5,
                                                    signal_name="SIGKILL")))
"""


def test_sigkill_keeps_the_metrics_rows_written_and_the_rerun_appends_the_rest(root, reference):
    """SIGKILL (no handler runs) as step 6 starts: the card still says running and the lock names a dead
    process, csv/metrics.csv holds the rows up to the last checkpoint; the re-run takes the lock over,
    resumes, and appends steps 6..9 after those bytes: one row per optimizer step, none lost or repeated."""
    run = RunDir(root / "sigkill_csv")
    out = subprocess.run([sys.executable, "-c", KILLED, str(root)], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert card_of(run.root)["status"] == "running" and not run.done.exists()
    assert read_json(run.lock)["pid"] not in (os.getpid(), None)          # the killed process's
    first = run.metrics_csv.read_bytes()
    with open(run.metrics_csv, newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle) if r["train/loss"]] == [1, 2, 3, 4, 5]

    train_mod.train(config(root, "sigkill_csv"))
    check_finished(run.root, reference)
    assert run.metrics_csv.read_bytes().startswith(first)
    with open(run.metrics_csv, newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle) if r["train/loss"]] == list(range(1, TOTAL + 1))


def test_a_process_whose_lock_was_taken_over_ends_without_writing_more(tmp_path):
    """A job stopped (e.g. SIGSTOP) longer than the stale limit loses its folder to another process; when
    it wakes up, its heartbeat sees the new owner and the process ends at once (exit 75)."""
    code = ("import sys, time; from lbt.joblock import JobLock; from lbt.rundir import RunDir; "
            f"lock = JobLock(RunDir({str(tmp_path)!r}), heartbeat_s=0.2); lock.acquire(); "
            "print('held', flush=True); time.sleep(30); sys.exit(0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stdout.readline().strip() == "held"
    (tmp_path / "job.lock").write_text(json.dumps({"host": "other-node", "pid": 1, "heartbeat": time.time()}))
    assert proc.wait(timeout=20) == 75
    assert json.loads((tmp_path / "job.lock").read_text())["host"] == "other-node"   # the new owner's lock stays


def dead_owner_lock(root: Path) -> None:
    """What a SIGKILLed job leaves: a lock of a dead process on this host, its heartbeat fresh."""
    root.mkdir(parents=True, exist_ok=True)
    dead = {"host": socket.gethostname(), "pid": 2**22 + 7, "slurm_job": None, "started": time.time(),
            "heartbeat": time.time()}
    (root / "job.lock").write_text(json.dumps(dead))


def test_a_taker_that_lost_the_race_gives_the_winners_lock_back(tmp_path):
    run = RunDir(tmp_path)
    dead_owner_lock(tmp_path)
    winner, loser = JobLock(run), JobLock(run)
    stale = loser.read_owner()   # the loser judges the dead owner's lock stale...
    winner.acquire()             # ...while the winner takes it over first
    try:
        assert loser._take_over(stale) is False
        assert read_lock(run.lock)["started"] == winner.owner["started"]   # the winner's lock is back
        assert [p.name for p in tmp_path.iterdir()] == ["job.lock"]          # nothing left aside
        with pytest.raises(JobLocked, match="is in use by pid"):
            loser.acquire()
    finally:
        winner.release()


def _race_for_the_lock(root: str, start: float, results) -> None:
    lock = JobLock(RunDir(Path(root)))
    while time.time() < start:
        pass
    try:
        lock.acquire()
    except JobLocked:
        results.put("refused")
        return
    time.sleep(0.3)   # both have tried by now: does the lock file still name this process?
    results.put("held" if (read_lock(lock.path) or {}).get("pid") == os.getpid() else "lost")
    lock._stop.set()


def test_two_processes_taking_over_one_stale_lock_leave_exactly_one_owner(tmp_path):
    """Two relaunches of a killed job (a SLURM requeue and a manual rerun) race for its stale lock: one holds
    it, the other is refused (before the fix, 17 of 40 such races had both believe they held it)."""
    context = multiprocessing.get_context("fork")
    for trial in range(8):
        root = tmp_path / str(trial)
        dead_owner_lock(root)
        results = context.Queue()
        start = time.time() + 0.3
        racers = [context.Process(target=_race_for_the_lock, args=(str(root), start, results))
                  for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=30)
        assert sorted(results.get(timeout=5) for _ in racers) == ["held", "refused"], trial


@pytest.mark.parametrize("changed", [("train.lr=5e-3", "train.lr: 0.01 -> 0.005"), ("seed=4", "seed: 3 -> 4"),
                                     ("train.epochs=2", "train.epochs: 1 -> 2"),
                                     ("train.lora.dropout=0.1", "train.lora.dropout: 0.2 -> 0.1")])
def test_a_resume_under_other_settings_is_refused_and_touches_nothing(root, reference, changed):
    """Resumed with another learning rate, seed or plan, a job once ended DONE with its first steps under
    the old settings (the optimizer's lr restored from the checkpoint), and a run card naming the new ones."""
    override, named = changed
    job = f"changed_{override.split('=')[0].replace('.', '_')}"
    run = interrupted_job(root, job, 3)
    before = snapshot(run.root)
    with pytest.raises(ResumeMismatch, match=re.escape(named)) as refusal:
        train_mod.train(config(root, job, override))
    assert "Nothing was touched" in str(refusal.value) and console.is_user_error(refusal.value)
    assert snapshot(run.root) == before and not run.lock.exists()
    train_mod.train(config(root, job))  # with the settings it started with, it resumes to the same results
    check_finished(run.root, reference)


def test_a_resume_may_change_where_and_how_it_runs(root, reference):
    """Batch sizes (after running out of memory), logging, checkpoint frequency, workers and caches do not
    decide the numbers: the job resumes to the uninterrupted run's results."""
    run = interrupted_job(root, "changed_how", 3)
    train_mod.train(config(root, "changed_how", "train.log_every_steps=2", "train.resume_every_steps=2",
                           "hardware.num_workers=0", "hardware.eval_batch_size=7", "logger=none"))
    check_finished(run.root, reference)


def test_settings_changes_name_what_decides_results_only():
    before = {"seed": 0, "train": {"lr": 1e-4, "log_every_steps": 5, "lora": {"r": 16}},
              "eval": {"stance": {"batch_size": 512, "measures": ["logprob"]}},
              "directions": {"cache_dir": "/a"}, "hardware": {"dtype": "bfloat16", "num_workers": 2},
              "paths": {"root": "/a"}, "logger": {"mode": "offline"}, "data": {"old_key": 1}}
    now = {"seed": 0, "train": {"lr": 1e-4, "log_every_steps": 50, "lora": {"r": 8}},
           "eval": {"stance": {"batch_size": 64, "measures": ["logprob", "likert"]}},
           "directions": {"cache_dir": "/b"}, "hardware": {"dtype": "float32", "num_workers": 0},
           "paths": {"root": "/b"}, "logger": {"mode": "online"}, "data": {"new_key": 2}}
    assert settings_changes(before, now) == [
        'eval.stance.measures: ["logprob"] -> ["logprob", "likert"]',
        'hardware.dtype: "bfloat16" -> "float32"',
        "train.lora.r: 16 -> 8",
    ]
    assert settings_changes(before, before) == []
