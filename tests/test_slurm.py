"""The SLURM launcher against a real SLURM: Debian's slurmctld + slurmd (+ munged, slurmdbd for sacct) on
this machine, one node, the tiny model on CPU (tests/slurm_cluster.py brings the cluster up).

A sweep through `hydra/launcher=slurm` finishes every cell and `lbt.analyze` reads it; a job preempted
with `scontrol requeue` resumes to the uninterrupted adapter; a job at its time limit is requeued by
submitit and finishes; submitting a finished sweep again submits nothing and changes no file; a failing
cell is reported failed while the others finish; a two-task job's DDP ranks are started by srun.
Skipped (not failed) where the daemons cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from lbt import train as train_mod
from tests.conftest import ROOT, compose_train, write_toy_corpus
from tests.slurm_cluster import ACCOUNT, ClusterUnavailable, SlurmCluster, start_cluster
from tests.test_cluster import MARKER, TINY, adapter, assert_same_adapter, snapshot

pytestmark = pytest.mark.slow

# Small SLURM requests: 1 CPU and 1 GB per job, so that the node runs several cells at once.
SLURM = ["hydra/launcher=slurm", "hardware=cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
TEN_MINUTES = ["hydra.launcher.timeout_min=10"]
STALL = ["+callbacks.stall._target_=tests.test_slurm.StallFirstAttempt"]


class StallFirstAttempt(L.Callback):
    """In a job's first SLURM attempt (SLURM_RESTART_COUNT unset), stalls after optimizer step `at_step`
    until a stop signal has arrived (at most `max_s`), writing stalled.txt while it waits; a requeued
    attempt runs at full speed. The job is thus mid-training whenever the test or SLURM interrupts it."""

    def __init__(self, at_step: int = 3, max_s: float = 120.0):
        self.at_step, self.max_s = int(at_step), float(max_s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step or int(os.environ.get("SLURM_RESTART_COUNT") or 0):
            return
        stop = next(c for c in trainer.callbacks if type(c).__name__ == "GracefulStop")
        (Path(trainer.default_root_dir) / "stalled.txt").write_text(f"{trainer.global_step} {os.getpid()}")
        deadline = time.time() + self.max_s
        while not stop.requested and time.time() < deadline:
            time.sleep(0.1)


# -- the cluster ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as err:
        pytest.skip(f"no one-node SLURM cluster here: {str(err).splitlines()[0]}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def no_jobs_left_behind(slurm: SlurmCluster):
    """A test that fails mid-job leaves no job running into the next test."""
    yield
    slurm.cancel_all()


def data_root(root: Path, corrupt: tuple[str, ...] = ()) -> Path:
    """<root>/data: toy corpora for the three arms (`corrupt` ones with a broken line) and the real eval
    items (linked), so that the default eval and probe groups run as in the README's sweep."""
    corpora = root / "data" / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    for name in ("frame_plus", "frame_minus", "neutral"):
        write_toy_corpus(corpora / f"{name}.jsonl", n=24)
        if name in corrupt:
            with open(corpora / f"{name}.jsonl", "a", encoding="utf-8") as handle:
                handle.write('{"id": "broken", "user": "half a rec\n')
    (root / "data" / "eval").symlink_to(ROOT / "data" / "eval", target_is_directory=True)
    return root


def submit(slurm: SlurmCluster, root: Path, args: list[str], timeout: float = 240,
           background: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m lbt.train -m <args>` in `root` on the login node (here), the cluster told once in
    `root/.env` as docs/cluster.md says (LBT_SLURM_PARTITION, LBT_SLURM_ACCOUNT); the sweep folder is
    <root>/multirun/<sweep_name>, as in the README. Output goes to <root>/submit.log."""
    dotenv = root / ".env"
    if not dotenv.exists():
        dotenv.write_text(f"LBT_SLURM_PARTITION={slurm.partition}\nLBT_SLURM_ACCOUNT={ACCOUNT}\n")
    env = {k: v for k, v in slurm.env.items() if not k.startswith("LBT_SLURM_")}   # the shell would win
    env.update(LBT_ROOT=str(root), PYTHONPATH=str(ROOT), HOME=str(root))
    log = open(root / "submit.log", "a", encoding="utf-8")  # noqa: SIM115 -- a file: a full pipe would block
    log.write(f"\n$ python -m lbt.train -m {' '.join(args)}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "lbt.train", "-m", *args], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    if background:
        return proc
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"submission still running after {timeout} s:\n{output(root)}\n{slurm.logs()}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output(root), "")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run, in this process, of the cell the preempted and timed-out jobs run."""
    root = data_root(tmp_path_factory.mktemp("reference"))
    cfg = compose_train([*TINY, f"paths.data_dir={root / 'data'}", "arm=minus", "seed=1",
                         f"+job_dir={root / 'job'}"])
    return {"card": train_mod.train(cfg), "adapter": adapter(root / "job")}


def output(root: Path) -> str:
    return (root / "submit.log").read_text(encoding="utf-8")


def submitit_logs(sweep: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").rglob("*_log.*")))


def job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of a sweep's jobs (array tasks as <job>_<task>): submitit's folders with a job log."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and any(p.glob("*_log.out")))


def card(job_dir: Path) -> dict:
    return json.loads((job_dir / "run.json").read_text(encoding="utf-8"))


def ended(slurm: SlurmCluster, job_id: str, timeout: float = 60) -> list[dict[str, str]]:
    """sacct's rows of a job (one per attempt) once it has ended: the launcher returns as soon as a job's
    result file appears, while SLURM may still be ending the job (and slurmdbd records it a moment later)."""
    deadline = time.time() + timeout
    rows = slurm.accounting(job_id)
    while time.time() < deadline and (not rows or rows[-1]["State"] in ("PENDING", "RUNNING", "COMPLETING",
                                                                      "REQUEUED")):
        time.sleep(0.5)
        rows = slurm.accounting(job_id)
    return rows


def wait_for(what: str, ready, timeout: float, slurm: SlurmCluster, root: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s\n{output(root)[-3000:]}\n{slurm.queue()}")


# -- 1 + 3: the README's sweep, analysed, then submitted again ----------------------------------------

@pytest.fixture(scope="module")
def study_sweep(slurm: SlurmCluster, tmp_path_factory) -> dict:
    """The README's SLURM sweep on the tiny model: 3 arms x 1 seed, default evaluation and probes."""
    root = data_root(tmp_path_factory.mktemp("study"))
    sweep = root / "multirun" / "study1"
    args = [*SLURM, *TEN_MINUTES, "model=tiny", "arm=plus,minus,neutral", "seed=0", "sweep_name=study1",
            "data.require_validation=false", "logger=csv", "train.effective_batch=4", "train.micro_batch=4",
            "train.epochs=1", "train.max_length=128",
            "data.drop_long_prompts=true", "train.checkpoint_fractions=[0.5,1.0]"]
    started = time.time()
    out = submit(slurm, root, args)
    return {"root": root, "sweep": sweep, "args": args, "out": out, "seconds": time.time() - started}


def test_readme_sweep_runs_every_cell_through_slurm_and_analyze_reads_it(slurm, study_sweep):
    root, sweep, out = study_sweep["root"], study_sweep["sweep"], study_sweep["out"]
    assert out.returncode == 0, out.stdout[-4000:] + submitit_logs(sweep)[-4000:]
    cells = ["tiny-minus-s0", "tiny-neutral-s0", "tiny-plus-s0"]
    assert sorted(p.name for p in sweep.iterdir() if (p / "DONE").exists()) == cells
    # One array job, one task per cell, each with the partition and account from .env (neither is the
    # cluster's default).
    ids = job_ids(sweep)
    assert len(ids) == 3 and len({i.split("_")[0] for i in ids}) == 1, ids
    for job_id in ids:
        ended(slurm, job_id)
        fields = slurm.show_job(job_id)
        assert (fields["JobState"], fields["Partition"], fields["Account"]) == ("COMPLETED", slurm.partition,
                                                                                 ACCOUNT), fields
        assert [row["State"] for row in ended(slurm, job_id)] == ["COMPLETED"]
    for name in cells:
        job = card(sweep / name)
        assert job["status"] == "done" and job["job"]["sweep"] == "study1"
        assert (sweep / name / "eval" / "final").is_dir() and (sweep / name / "probe" / "final.json").exists()
    for name in cells:                                                  # the launcher's summary, per cell
        assert f"done: multirun/study1/{name}\n" in out.stdout, out.stdout[-3000:]

    analysis = subprocess.run([sys.executable, "-m", "lbt.analyze", "multirun/study1", "--exploratory",
                               "--no-wandb", "--n-resamples", "50"], cwd=root, capture_output=True, text=True,
                              timeout=300, check=False, env=dict(os.environ, LBT_ROOT=str(root)))
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    report = json.loads((sweep / "analysis" / "report.json").read_text())
    assert report["exploratory"] is True
    assert sorted((j["arm"], j["done"]) for j in report["jobs"]) == [
        ("minus", True), ("neutral", True), ("plus", True)]
    assert report["descriptive"], "no rows read from the sweep"


def test_resubmitting_a_finished_sweep_submits_nothing_and_changes_no_file(slurm, study_sweep):
    root, sweep = study_sweep["root"], study_sweep["sweep"]
    assert study_sweep["out"].returncode == 0
    before = snapshot(sweep, skip=("multirun.yaml", "analysis"))
    all_jobs = ("sacct", "-n", "-X", "-P", "-a", "-S", "2000-01-01", "-o", "JobID")
    queued_before = slurm.run(*all_jobs).split()
    again = submit(slurm, root, study_sweep["args"], timeout=120)
    assert again.returncode == 0, again.stdout[-3000:]
    text = again.stdout.split("$ python -m lbt.train")[-1]
    assert text.count("skip: ") == 3 and "done: " not in text and "failed: " not in text
    assert slurm.run(*all_jobs).split() == queued_before                           # no job submitted
    assert snapshot(sweep, skip=("multirun.yaml", "analysis")) == before          # bytes and mtimes unchanged


# -- 2: preemption ------------------------------------------------------------------------------------

def markers(job_dir: Path) -> dict[str, dict]:
    """eval/<phase>/marker.json of tests.test_cluster.MarkerPhase (created exclusively: once per phase)."""
    return {p.parent.name: json.loads(p.read_text()) for p in (job_dir / "eval").glob("*/marker.json")}


def test_a_job_preempted_with_scontrol_requeue_resumes_to_the_uninterrupted_adapter(slurm, reference,
                                                                                    tmp_path):
    """`scontrol requeue` while the job trains (what a preempting cluster does): SLURM sends SIGTERM, the
    job checkpoints after its step and exits, SLURM starts it again, it resumes from last.ckpt and ends
    with the adapter of an uninterrupted run, every evaluation phase written exactly once."""
    root = data_root(tmp_path)
    sweep = root / "multirun" / "preempt"
    job_dir = sweep / "tiny-minus-s1"
    args = [*SLURM, *TEN_MINUTES, *TINY, *MARKER, *STALL, "arm=minus", "seed=1", "sweep_name=preempt"]
    proc = submit(slurm, root, args, background=True)
    try:
        wait_for("the job stalls mid-training", (job_dir / "stalled.txt").exists, 180, slurm, root)
        (job_id,) = [j["id"] for j in slurm.queue() if j["state"] == "RUNNING"]
        slurm.run("scontrol", "requeue", job_id)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = submitit_logs(sweep)
    assert proc.returncode == 0, output(root)[-3000:] + logs[-4000:]
    assert [row["State"] for row in ended(slurm, job_id)] == ["REQUEUED", "COMPLETED"]
    assert "received SIGTERM" in logs and "resume:" in logs
    job = card(job_dir)
    assert job["status"] == "done" and job["previous_attempts"] == 1
    assert job["attempts"][0]["status"] == "interrupted" and job["attempts"][0]["interrupted_at_step"] == 3
    assert job["loss_history"] == pytest.approx(reference["card"]["loss_history"], rel=1e-5)
    assert_same_adapter(adapter(job_dir), reference["adapter"])
    phases = markers(job_dir)
    assert sorted(phases) == ["base", "final", "step_3"]
    first_pid = int((job_dir / "stalled.txt").read_text().split()[1])
    assert phases["base"]["pid"] == phases["step_3"]["pid"] == first_pid != phases["final"]["pid"]
    assert "done: multirun/preempt/tiny-minus-s1\n" in output(root)


# -- 4: a failing cell ---------------------------------------------------------------------------------

def test_a_failing_cell_is_reported_failed_and_the_other_cells_finish(slurm, tmp_path):
    root = data_root(tmp_path, corrupt=("frame_minus",))
    sweep = root / "multirun" / "broken"
    out = submit(slurm, root, [*SLURM, *TEN_MINUTES, *TINY, "arm=plus,minus", "seed=0", "sweep_name=broken"])
    assert out.returncode != 0, out.stdout[-3000:]                   # the sweep as a whole failed ...
    assert (sweep / "tiny-plus-s0" / "DONE").exists()           # ... but the good cell finished
    failed = sweep / "tiny-minus-s0"
    assert not (failed / "DONE").exists()
    job = card(failed)
    assert job["status"] == "failed" and job["error"]["type"] == "CorpusError", job
    assert "frame_minus.jsonl:25" in job["error"]["message"]
    # The launcher's summary names each cell's outcome, the failed one with its error.
    lines = out.stdout.splitlines()
    assert any("done: multirun/broken/tiny-plus-s0" in line for line in lines)
    (line,) = [line for line in lines if "failed: multirun/broken/tiny-minus-s0: " in line]
    assert "CorpusError" in line and "frame_minus.jsonl:25" in line, line
    assert any(line.endswith("sweep: 2 cells, 1 done, 1 failed") for line in lines), out.stdout[-2000:]
    # SLURM's own record agrees: the failed cell's array task FAILED (non-zero exit), the other COMPLETED
    # (tasks in the sweep's order: 0 is arm=plus, 1 is arm=minus).
    states = {i.split("_")[1]: [(row["State"], row["ExitCode"]) for row in ended(slurm, i)]
              for i in job_ids(sweep)}
    assert states == {"0": [("COMPLETED", "0:0")], "1": [("FAILED", "1:0")]}, states


# -- 5: the time limit ---------------------------------------------------------------------------------

def test_a_job_at_its_time_limit_is_requeued_by_submitit_and_finishes(slurm, reference, tmp_path):
    """A one-minute time limit and `--signal=USR2@10`: SLURM signals the job while it trains (slurmctld
    checks time limits every 30 s, so 20-50 s after the start); the job checkpoints, submitit calls the
    launcher's checkpoint() and `scontrol requeue`s it (a timeout: one of max_num_timeout); the next
    attempt resumes and finishes with the uninterrupted adapter."""
    root = data_root(tmp_path)
    sweep = root / "multirun" / "timelimit"
    job_dir = sweep / "tiny-minus-s1"
    args = [*SLURM, *TINY, *STALL, "arm=minus", "seed=1", "sweep_name=timelimit",
            "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10"]
    out = submit(slurm, root, args, timeout=240)
    logs = submitit_logs(sweep)
    assert out.returncode == 0, out.stdout[-3000:] + logs[-4000:]
    (job_id,) = job_ids(sweep)
    assert [row["State"] for row in ended(slurm, job_id)] == ["REQUEUED", "COMPLETED"]
    assert "received SIGUSR2" in logs and "this job is timed-out" in logs and "Requeued job" in logs
    job = card(job_dir)
    assert job["status"] == "done" and job["previous_attempts"] == 1
    assert job["attempts"][0]["status"] == "interrupted" and job["attempts"][0]["interrupted_at_step"] == 3
    assert_same_adapter(adapter(job_dir), reference["adapter"])


# -- several tasks per job: SLURM starts the DDP ranks ---------------------------------------------------

def test_a_two_task_job_runs_ddp_ranks_started_by_srun(slurm, tmp_path):
    """`hardware.devices=2` on CPU: 2 tasks per node, srun starts both ranks (gloo), Lightning joins them
    from SLURM's environment; one DONE, the loss curve of one process."""
    root = data_root(tmp_path)
    sweep = root / "multirun" / "ddp"
    common = [*TINY, "arm=plus", "seed=0", "train.lora.dropout=0"]
    single = train_mod.train(compose_train([*common, f"paths.data_dir={root / 'data'}",
                                            f"+job_dir={root / 'single'}"]))
    out = submit(slurm, root, [*SLURM, *TEN_MINUTES, *common, "hardware.devices=2", "hardware.strategy=ddp",
                               "sweep_name=ddp"])
    logs = submitit_logs(sweep)
    assert out.returncode == 0, out.stdout[-3000:] + logs[-4000:]
    (job_id,) = job_ids(sweep)
    assert [row["State"] for row in ended(slurm, job_id)] == ["COMPLETED"]
    fields = slurm.show_job(job_id)
    assert (fields["NumTasks"], fields["JobState"]) == ("2", "COMPLETED"), fields
    assert "MEMBER: 2/2" in logs
    job = card(sweep / "tiny-plus-s0")
    assert job["status"] == "done" and job["config"]["hardware"]["devices"] == 2
    assert job["loss_history"] == pytest.approx(single["loss_history"], rel=1e-4)
