"""Exact resume at every step: a job stopped at step k (SIGTERM: graceful; SIGKILL: no cleanup at all) and
run again finishes with the adapter of an uninterrupted run (fp32 CPU, 1e-6), the same losses, and every
phase exactly once; DONE only when the completeness check passes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lbt import train as train_mod
from lbt.eval.session import Evaluator, Session
from lbt.rundir import Expected, RunDir
from tests.conftest import ROOT, compose_train, write_toy_corpus

# 34 toy records (one scenario held out for validation), 4 per step -> 9 optimizer steps; a resumable
# checkpoint after every step; large lr and dropout so a wrong RNG, optimizer or data step would show.
JOB = ["data.require_validation=false", "eval=none", "probe=none", "logger=csv", "train.effective_batch=4",
       "train.micro_batch=4", "train.epochs=1", "train.max_length=96",
       "data.drop_long_prompts=true", "train.resume_every_steps=1",
       "train.checkpoint_fractions=[0.25,0.5,1.0]", "train.lr=1e-2", "train.lora.dropout=0.2", "seed=3",
       "+eval.marker._target_=tests.test_resume.Marker"]
TOTAL = 9


class Marker(Evaluator):
    """Writes eval/<phase>/marker.json with exclusive create (rank 0): a phase run twice fails the job."""

    def evaluate(self, model, phase: str, session: Session) -> None:
        if session.is_zero:
            folder = session.run.root / "eval" / phase
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "marker.json", "x", encoding="utf-8") as handle:
                json.dump({"phase": phase, "step": session.step}, handle)

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        return [Expected(run.root / "eval" / phase / "marker.json")]


class KillAt(L.Callback):
    """Stops the job at optimizer step `at_step`. SIGTERM is sent as that step starts: the job finishes
    the step, checkpoints and exits. SIGKILL (not catchable) is sent as the next step starts, after step
    at_step's checkpoint."""

    def __init__(self, at_step: int, signal_name: str = "SIGTERM"):
        self.at_step, self.signal_name = int(at_step), signal_name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        fire_at = self.at_step if self.signal_name == "SIGKILL" else self.at_step - 1
        if trainer.global_step == fire_at:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def config(root: Path, job: str, *extra: str):
    return compose_train([*JOB, f"arm.corpus={root / 'toy.jsonl'}", f"+job_dir={root / job}", *extra])


def kill_args(k: int, signal_name: str) -> list[str]:
    return ["+callbacks.kill._target_=tests.test_resume.KillAt", f"+callbacks.kill.at_step={k}",
            f"+callbacks.kill.signal_name={signal_name}"]


def adapter(job_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-6, msg=key)


def phases_written(job_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (job_dir / "eval").glob("*/marker.json"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    write_toy_corpus(folder / "toy.jsonl", n=34)
    return folder


@pytest.fixture(scope="module")
def reference(root) -> dict:
    card = train_mod.train(config(root, "reference"))
    assert card["status"] == "done" and card["data"]["total_steps"] == TOTAL and card["trained_steps"] == TOTAL
    return {"card": card, "adapter": adapter(root / "reference"),
            "phases": phases_written(root / "reference")}


def check_resumed(job_dir: Path, reference: dict, attempts: int = 1) -> dict:
    card = json.loads((job_dir / "run.json").read_text())
    assert card["status"] == "done" and (job_dir / "DONE").exists()
    assert card["trained_steps"] == TOTAL and card["previous_attempts"] == attempts
    assert card["loss_history"] == pytest.approx(reference["card"]["loss_history"], rel=1e-6)
    assert_same_adapter(adapter(job_dir), reference["adapter"])
    assert phases_written(job_dir) == reference["phases"] == ["base", "final", "step_2", "step_4"]
    return card


@pytest.mark.parametrize("k", range(1, TOTAL))
def test_sigterm_at_every_step_resumes_exactly(root, reference, k):
    job = f"term{k}"
    with pytest.raises(SystemExit) as stopped:
        train_mod.train(config(root, job, *kill_args(k, "SIGTERM")))
    assert stopped.value.code == 128 + signal.SIGTERM
    run = RunDir(root / job)
    card = json.loads(run.card.read_text())
    assert card["status"] == "interrupted" and card["interrupted_at_step"] == k
    assert not run.done.exists() and not run.adapter.exists() and not run.lock.exists()
    assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == k

    train_mod.train(config(root, job, *kill_args(k, "SIGTERM")))      # the same command again
    check_resumed(root / job, reference)
    # The metrics of both attempts are kept: one train/loss row per optimizer step.
    with open(run.metrics_csv, newline="") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert steps == list(range(1, TOTAL + 1))     # the loss of the n-th optimizer step at step n


DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from tests.test_resume import config, kill_args
from lbt import train as train_mod
from pathlib import Path
root = Path({folder!r})
codes = {{}}
for k in range(1, {total}):
    pid = os.fork()      # no torch work in this process before forking: each child starts clean
    if pid == 0:
        try:
            train_mod.train(config(root, f"kill{{k}}", *kill_args(k, "SIGKILL")))
        finally:
            os._exit(0)
    codes[k] = os.waitpid(pid, 0)[1]
print("CODES", codes)
"""


def test_sigkill_at_every_step_resumes_exactly(root, reference):
    """SIGKILL leaves no trace but the files: the card still says running, the lock names a dead process.
    The re-run takes the stale lock over, resumes from the last checkpoint and matches the reference."""
    driver = DRIVER.format(root=str(ROOT), folder=str(root), total=TOTAL)
    out = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for k in range(1, TOTAL):
        run = RunDir(root / f"kill{k}")
        card = json.loads(run.card.read_text())
        assert card["status"] == "running" and run.lock.exists() and not run.done.exists(), k
        assert torch.load(run.last_ckpt, weights_only=False)["global_step"] == k
        train_mod.train(config(root, f"kill{k}"))        # the same job, without the fault injected
        check_resumed(run.root, reference)
        assert not run.lock.exists()


def ddp_job(root: Path, name: str, *extra: str, timeout: int = 300) -> list[int]:
    """A 2-rank CPU DDP job started the way SLURM starts one (one process per rank), in `root / name`."""
    from tests.test_cluster import free_port

    args = [*JOB, f"arm.corpus={root / 'toy.jsonl'}", "hardware.devices=2", "hardware.strategy=ddp",
            f"hydra.run.dir={root / name}", *extra]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4343", "SLURM_JOB_NAME": "lbt-ci", "SLURM_NODELIST": "localhost",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env = dict(os.environ, PYTHONPATH=str(ROOT), **slurm)
    logs = [root / f"{name}.rank{r}.log" for r in range(2)]
    with open(logs[0], "a") as log0, open(logs[1], "a") as log1:   # files: a full pipe would block a rank
        ranks = [subprocess.Popen([sys.executable, "-m", "lbt.train", *args], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
                 for r, log in enumerate((log0, log1))]
        codes = [proc.wait(timeout=timeout) for proc in ranks]
    return codes


@pytest.mark.slow
def test_ddp_job_stopped_at_a_step_resumes_to_the_same_adapter(root):
    """Two CPU ranks: SIGTERM on both at step 3, re-run, and the adapter equals an uninterrupted 2-rank
    run's (same reduction order, so exact to 1e-6)."""
    assert ddp_job(root, "ddp-ref") == [0, 0], (root / "ddp-ref.rank0.log").read_text()[-3000:]
    codes = ddp_job(root, "ddp-kill", *kill_args(3, "SIGTERM"))
    assert codes == [128 + signal.SIGTERM] * 2, (root / "ddp-kill.rank0.log").read_text()[-3000:]
    card = json.loads((root / "ddp-kill" / "run.json").read_text())
    assert card["status"] == "interrupted" and card["interrupted_at_step"] == 3
    assert ddp_job(root, "ddp-kill", *kill_args(3, "SIGTERM")) == [0, 0], \
        (root / "ddp-kill.rank0.log").read_text()[-3000:]
    card = json.loads((root / "ddp-kill" / "run.json").read_text())
    reference = json.loads((root / "ddp-ref" / "run.json").read_text())
    assert card["status"] == "done" and card["previous_attempts"] == 1 and card["trained_steps"] == TOTAL
    assert card["loss_history"] == pytest.approx(reference["loss_history"], rel=1e-6)
    assert_same_adapter(adapter(root / "ddp-kill"), adapter(root / "ddp-ref"))
    assert phases_written(root / "ddp-kill") == phases_written(root / "ddp-ref")


@pytest.mark.slow
def test_the_same_command_finds_and_resumes_an_interrupted_single_run(root, reference, tmp_path):
    """What the interruption message says is true: typing the same command again, from the same folder,
    resumes the job in its own folder (no hydra.run.dir given) and finishes it."""
    args = [*JOB, f"arm.corpus={root / 'toy.jsonl'}", *kill_args(4, "SIGTERM")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "lbt.train", *args]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "To resume, run the same command again" in first.stdout + first.stderr
    [job] = list((tmp_path / "outputs" / "runs").iterdir())
    assert job.name.startswith("tiny-plus-s3_")
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert list((tmp_path / "outputs" / "runs").iterdir()) == [job]
    card = check_resumed(job, reference)
    assert card["overrides"] == args          # the command line, in the card (Hydra's .hydra/ is not written)
    assert not (job / ".hydra").exists()
