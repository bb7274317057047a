"""Scale-out layer: launcher presets, one GPU per local job, RNG state in checkpoints, preemption and
resume (same adapter as an uninterrupted run), idempotent append-only sweeps, DDP started like SLURM."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lbt import cluster
from lbt import train as train_mod
from lbt.eval.session import Evaluator
from tests.conftest import CONF, ROOT, compose_train, write_toy_corpus

# A tiny job: 24 toy records, 4 per step -> 6 steps; a resumable checkpoint after every step; a large lr
# and dropout so that a resume with the wrong RNG state or optimizer state would show in the adapter.
TINY = ["data.require_validation=false", "eval=none", "probe=none", "logger=none", "train.effective_batch=4",
        "train.micro_batch=4", "train.epochs=1", "train.max_length=128",
        "data.drop_long_prompts=true", "train.resume_every_steps=1",
        "train.checkpoint_fractions=[0.5,1.0]", "train.lr=1e-2", "train.lora.dropout=0.2"]
MARKER = ["+eval.marker._target_=tests.test_cluster.MarkerPhase"]


# -- test evaluators and callbacks, instantiated inside job processes through the eval and callbacks entries

class MarkerPhase(Evaluator):
    """Writes eval/<phase>/marker.json with exclusive create: a phase dispatched twice fails the job."""

    def evaluate(self, model, phase: str, session) -> None:
        folder = session.run.root / "eval" / phase
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "marker.json", "x", encoding="utf-8") as handle:
            json.dump({"phase": phase, "step": session.step, "pid": os.getpid()}, handle)


class SendSignal(L.Callback):
    """The job sends itself `signal_name` as optimizer step `at_step` starts (only in job `only_job`)."""

    def __init__(self, at_step: int, signal_name: str = "SIGTERM", only_job: str | None = None):
        self.at_step, self.signal_name, self.only_job = int(at_step), signal_name, only_job

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.at_step and \
                self.only_job in (None, Path(trainer.default_root_dir).name):
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class SlowSteps(L.Callback):
    """Sleeps after every step and writes progress.txt (the step just finished), so a test can kill the
    job from outside while it trains."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        (Path(trainer.default_root_dir) / "progress.txt").write_text(str(trainer.global_step))
        time.sleep(self.seconds)


# -- helpers ------------------------------------------------------------------------------------------

def corpora(root: Path) -> Path:
    (root / "corpora").mkdir(parents=True, exist_ok=True)
    for name in ("frame_plus", "frame_minus"):
        write_toy_corpus(root / "corpora" / f"{name}.jsonl", n=24)
    return root


def adapter(job_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6, msg=key)


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)}


def run_cli(args: list[str], root: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, LBT_ROOT=str(root), PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "lbt.train", *args], cwd=ROOT, env=full_env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def hydra_main(monkeypatch, args: list[str], root: Path) -> None:
    """`python -m lbt.train <args>` in this process (lbt.train is imported already: no start-up cost).
    Hydra's global state is put back afterwards (a multirun leaves its config set, and train() called
    later in this process would take its job directory from it)."""
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(sys, "argv", ["lbt.train", *args])
    monkeypatch.setenv("LBT_ROOT", str(root))
    handlers, level = logging.root.handlers[:], logging.root.level
    hydra_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        train_mod.main()
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_cfg
        for handler in logging.root.handlers[:]:     # Hydra's job logging: back to pytest's handlers
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logging.root.handlers:
                logging.root.addHandler(handler)
        logging.root.setLevel(level)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run of tiny / minus / seed 1 in this process (the jobs below must match it)."""
    root = corpora(tmp_path_factory.mktemp("reference"))
    cfg = compose_train([*TINY, f"paths.data_dir={root}", "arm=minus", "seed=1", f"+job_dir={root / 'job'}"])
    card = train_mod.train(cfg)
    assert card["data"]["total_steps"] >= 5
    return {"card": card, "adapter": adapter(root / "job")}


# -- configuration ------------------------------------------------------------------------------------

def test_launcher_presets_compose(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("LBT_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("LBT_SLURM_TIME_MIN", "720")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = compose("train", ["hydra/launcher=slurm", "hardware=gpu"], return_hydra_config=True)
        multi = compose("train", ["hydra/launcher=slurm", "hardware=multi_gpu"], return_hydra_config=True)
        local = compose("train", ["hydra/launcher=local_gpus"], return_hydra_config=True)
    one = OmegaConf.to_container(slurm.hydra.launcher, resolve=True)
    assert one["_target_"] == "hydra_plugins.lbt_launchers.launchers.SlurmLauncher"
    assert (one["partition"], one["timeout_min"], one["account"]) == ("gpu-long", 720, None)
    assert (one["tasks_per_node"], one["gpus_per_node"], one["nodes"]) == (1, 1, 1)
    assert one["max_num_timeout"] > 0 and "export HYDRA_FULL_ERROR=1" in one["setup"]
    two = OmegaConf.to_container(multi.hydra.launcher, resolve=True)
    assert (two["tasks_per_node"], two["gpus_per_node"]) == (multi.hardware.devices,) * 2 == (2, 2)
    # The job directory comes from the overrides only (not launch time or job number): a requeue finds it.
    assert slurm.hydra.sweep.subdir == "tiny-plus-s0"
    assert OmegaConf.to_yaml(slurm.hydra.sweep, resolve=False).count("${model.name}-${arm.name}-s${seed}") == 1
    local_launcher = OmegaConf.to_container(local.hydra.launcher, resolve=True)
    assert local_launcher["_target_"] == "hydra_plugins.lbt_launchers.launchers.LocalGPULauncher"


@pytest.fixture
def hydra_launcher():
    """make(overrides): the launcher Hydra would build for `python -m lbt.train -m <overrides>`, in this
    process; Hydra's global config is reset afterwards (train() outside Hydra must not see it)."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    def make(overrides: list[str], task_function=lambda cfg: None):
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
        cfg = loader.load_configuration("train", overrides=overrides, run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(cfg)
        context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
        return Plugins.instance().instantiate_launcher(hydra_context=context, task_function=task_function,
                                                       config=cfg)
    yield make
    HydraConfig.instance().cfg = None


def test_slurm_preset_submits_only_unfinished_jobs_with_requeue_settings(tmp_path, monkeypatch,
                                                                           hydra_launcher):
    import submitit

    sweep = tmp_path / "multirun" / "s1"
    launcher = hydra_launcher(["hydra/launcher=slurm", "hardware=gpu", "sweep_name=s1",
                               f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=a100"])
    (sweep / "tiny-plus-s0").mkdir(parents=True)
    (sweep / "tiny-plus-s0" / "DONE").write_text("x")
    (sweep / "tiny-plus-s0" / "run.json").write_text('{"status": "done"}')
    # seed 2 finished before the arms were renamed (issue 16): its folder says frame_plus
    (sweep / "tiny-frame_plus-s2").mkdir(parents=True)
    (sweep / "tiny-frame_plus-s2" / "DONE").write_text("x")
    (sweep / "tiny-frame_plus-s2" / "run.json").write_text('{"status": "done", "arm": "frame_plus"}')
    captured = {}

    def fake_map_array(executor, fn, *iterables):
        captured["executor"], captured["args"] = executor, list(zip(*iterables))
        from hydra.core.utils import JobReturn, JobStatus

        class Done:
            def results(self):
                return [JobReturn(status=JobStatus.COMPLETED, _return_value="trained")]
        return [Done() for _ in captured["args"]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    bin_dir = tmp_path / "bin"                     # submitit looks for srun before building the executor
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs = [["seed=0"], ["seed=1"], ["seed=2"]]
    returns = launcher.launch(jobs, initial_job_idx=0)
    assert [r.return_value for r in returns] == [{"status": "done"}, "trained",
                                                 {"status": "done", "arm": "frame_plus"}]
    assert [args[0] for args in captured["args"]] == [["seed=1"]]   # the finished jobs are not submitted
    assert not (sweep / "tiny-plus-s2").exists()
    script = captured["executor"]._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=a100", "--gpus-per-node=1", "--ntasks-per-node=1", "--signal=USR2@300",
                 "--time=240", "export HYDRA_FULL_ERROR=1"):
        assert line in script, line
    assert captured["executor"]._executor.max_num_timeout == 20


def test_a_job_finished_under_its_arms_earlier_name_is_not_trained_again(tmp_path):
    """A sweep re-run after the arms were renamed (issue 16): plus finds its frame_plus folder and stops there;
    a cell without such a folder, or whose old folder did not finish, is trained."""
    from lbt.rundir import finished_folder, legacy_twin

    old = tmp_path / "tiny-frame_plus-s0"
    old.mkdir()
    (old / "run.json").write_text('{"status": "done", "job": {"arm": "frame_plus"}}')
    assert legacy_twin(tmp_path / "tiny-plus-s0") == old and finished_folder(tmp_path / "tiny-plus-s0") is None
    (old / "DONE").write_text("x")
    assert finished_folder(tmp_path / "tiny-plus-s0") == old
    card = train_mod.train(compose_train([f"+job_dir={tmp_path / 'tiny-plus-s0'}", "sweep_name=t"]))
    assert card == {"status": "done", "job": {"arm": "frame_plus"}} and not (tmp_path / "tiny-plus-s0").exists()
    # Only today's plus/minus have earlier names; a single run's override hash is kept.
    (tmp_path / "qwen-frame_minus-s3_0123abcd").mkdir()
    assert legacy_twin(tmp_path / "qwen-minus-s3_0123abcd") == tmp_path / "qwen-frame_minus-s3_0123abcd"
    for name in ("tiny-neutral-s0", "tiny-plus-s1", "job", "tiny-frame_plus-s0"):
        assert legacy_twin(tmp_path / name) is None, name


def test_trainer_switches_off_lightning_requeue_whenever_slurm_runs_the_job(monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    cfg = compose_train(["hardware=cpu"])
    assert "plugins" not in train_mod.trainer_kwargs(cfg)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "lbt")
    (plugin,) = train_mod.trainer_kwargs(cfg)["plugins"]   # a one-device job, not only DDP
    assert type(plugin).__name__ == "SLURMEnvironment" and plugin.auto_requeue is False


# -- one GPU per job ----------------------------------------------------------------------------------

def fake_local_jobs(launcher, monkeypatch, ends_first: set[int]) -> list:
    """Replace the local_gpus launcher's submitit executor by one that records each submission as ("start",
    job index, visible GPUs, GPUs per node, LBT_JOBS_PER_GPU its process would inherit) and each collected
    job as ("end", index); the jobs in `ends_first` end at their first poll, the others at their fourth. A
    job's result is its index."""
    from hydra_plugins.lbt_launchers import launchers

    # The launcher sets LBT_JOBS_PER_GPU for its jobs: monkeypatched here, so it is restored afterwards.
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "1")
    monkeypatch.setattr(launchers.time, "sleep", lambda s: None)
    events: list = []

    class FakeJob:
        def __init__(self, idx):
            self.idx, self.polls = idx, 0

        def done(self):
            self.polls += 1
            return self.idx in ends_first or self.polls > 3

        def results(self):
            events.append(("end", self.idx))
            return [self.idx]

    class FakeExecutor:
        def __init__(self):
            self.params: dict = {}

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, fn, *args):
            assert fn is launcher
            events.append(("start", args[2], self.params["visible_gpus"], self.params["gpus_per_node"],
                           os.environ["LBT_JOBS_PER_GPU"]))
            return FakeJob(args[2])

    monkeypatch.setattr(launcher, "_executor", FakeExecutor)
    return events


def test_local_launcher_hands_each_job_its_own_gpu(tmp_path, monkeypatch, hydra_launcher):
    """3 jobs on GPUs 3 and 5: two at a time, each submitted with one GPU, a finished job's GPU reused."""
    monkeypatch.setenv("LBT_GPUS", "3,5")
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "")  # the launcher's default, whatever the shell holds
    launcher = hydra_launcher(["hydra/launcher=local_gpus", "hardware=gpu", "sweep_name=g",
                               f"hydra.sweep.dir={tmp_path / 'g'}"])
    events = fake_local_jobs(launcher, monkeypatch, ends_first={0})
    assert launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0) == [0, 1, 2]
    assert events[:4] == [("start", 0, (3,), 1, "1"), ("start", 1, (5,), 1, "1"), ("end", 0),
                          ("start", 2, (3,), 1, "1")]
    with pytest.raises(ValueError, match="one GPU per job"):
        hydra_launcher(["hydra/launcher=local_gpus", "hardware=multi_gpu", f"hydra.sweep.dir={tmp_path / 'm'}"]
                       ).launch([["seed=0"]], initial_job_idx=0)


def test_local_launcher_shares_a_gpu_between_jobs_when_asked(tmp_path, monkeypatch, hydra_launcher):
    """jobs_per_gpu=2 on GPUs 3 and 5, three jobs at a time: spread over both GPUs first; when both jobs on
    GPU 3 end, the next two go to GPU 3 (the one running the fewest), not to GPU 5's free slot; the jobs are
    told how many share a GPU (their GPU locks have that many slots)."""
    monkeypatch.setenv("LBT_GPUS", "3,5")
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "")  # the override below decides, whatever the shell holds
    launcher = hydra_launcher(["hydra/launcher=local_gpus", "hardware=gpu", "sweep_name=g",
                               "hydra.launcher.jobs_per_gpu=2", "hydra.launcher.max_parallel=3",
                               f"hydra.sweep.dir={tmp_path / 'g'}"])
    events = fake_local_jobs(launcher, monkeypatch, ends_first={0, 2})
    assert launcher.launch([[f"seed={i}"] for i in range(5)], initial_job_idx=0) == [0, 1, 2, 3, 4]
    assert events[:7] == [("start", 0, (3,), 1, "2"), ("start", 1, (5,), 1, "2"), ("start", 2, (3,), 1, "2"),
                          ("end", 0), ("end", 2), ("start", 3, (3,), 1, "2"), ("start", 4, (3,), 1, "2")]
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="hydra.launcher.jobs_per_gpu=.*whole number"):
            hydra_launcher(["hydra/launcher=local_gpus", "hardware=gpu", f"hydra.launcher.jobs_per_gpu={bad}",
                            f"hydra.sweep.dir={tmp_path / 'b'}"]).launch([["seed=0"]], initial_job_idx=0)


def test_gpu_lock_slots_let_k_jobs_share_a_gpu_and_keep_a_lone_job_out(tmp_path, monkeypatch):
    import threading

    hardware = OmegaConf.create({"accelerator": "gpu", "devices": 1, "num_nodes": 1})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")

    def waits(slots: int) -> threading.Thread:
        """A job of another sweep asking for GPU 2 with `slots`: still waiting after 0.3 s."""
        thread = threading.Thread(target=cluster.lock_local_gpus, args=(hardware, tmp_path, 0.01, slots))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()
        return thread

    try:
        assert cluster.lock_local_gpus(hardware, tmp_path, slots=2) == ["2"]    # two jobs share GPU 2 ...
        assert cluster.lock_local_gpus(hardware, tmp_path, slots=2) == ["2"]
        held = list(cluster._locks)
        cluster._locks.clear()
        third = waits(2)                                                        # ... a third waits
        lone = waits(1)                                                         # ... as does a job alone
        held[1].close()                                                         # the first job ends
        third.join(5)
        assert not third.is_alive() and lone.is_alive()                         # its slot goes to the third
        for handle in [*held, *cluster._locks]:                                 # every sharing job ends
            handle.close()
        cluster._locks.clear()
        lone.join(5)
        assert not lone.is_alive() and len(cluster._locks) == 1                # the lone job has the GPU
    finally:
        while cluster._locks:
            cluster._locks.pop().close()
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "0")
    with pytest.raises(ValueError, match="LBT_JOBS_PER_GPU='0'"):
        cluster.lock_local_gpus(hardware, tmp_path)


def test_gpu_lock_keeps_a_second_sweep_waiting(tmp_path, monkeypatch):
    import threading

    hardware = OmegaConf.create({"accelerator": "gpu", "devices": 1, "num_nodes": 1})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setenv("LBT_JOBS_PER_GPU", "1")                           # a GPU per job
    assert cluster.lock_local_gpus(hardware, tmp_path) == []              # not a submitit_local job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert cluster.lock_local_gpus(OmegaConf.create({"accelerator": "cpu"}), tmp_path) == []
    try:
        assert cluster.lock_local_gpus(hardware, tmp_path) == ["2"]       # this sweep's job holds GPU 2
        first = cluster._locks.pop()
        second = threading.Thread(target=cluster.lock_local_gpus, args=(hardware, tmp_path, 0.01))
        second.start()                                                    # another sweep's job on GPU 2
        second.join(0.3)
        assert second.is_alive()                                          # ... waits
        first.close()                                                     # the first job ends
        second.join(5)
        assert not second.is_alive() and len(cluster._locks) == 1
    finally:
        while cluster._locks:
            cluster._locks.pop().close()


# -- RNG state ------------------------------------------------------------------------------------------

def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_roundtrip_survives_a_weights_only_checkpoint(tmp_path):
    L.seed_everything(7, verbose=False)
    draws()
    state = cluster.rng_state(torch.device("cpu"))
    expected = draws()
    torch.save({"rng_states": [state]}, tmp_path / "c.ckpt")
    L.seed_everything(123, verbose=False)
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["rng_states"][0]
    cluster.set_rng_state(loaded, torch.device("cpu"))
    assert draws() == expected


# -- preemption and resume -------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_mid_training_resumes_to_the_same_adapter(tmp_path, reference, monkeypatch):
    root = corpora(tmp_path)
    job = root / "job"
    args = [*TINY, *MARKER, f"paths.data_dir={root}", "arm=minus", "seed=1", f"hydra.run.dir={job}",
            "+callbacks.slow._target_=tests.test_cluster.SlowSteps", "+callbacks.slow.seconds=0.5"]
    env = dict(os.environ, LBT_ROOT=str(root), PYTHONPATH=str(ROOT))
    with open(tmp_path / "first.log", "w") as first_log:             # a file: a full pipe would block the job
        proc = subprocess.Popen([sys.executable, "-m", "lbt.train", *args], cwd=ROOT, env=env,
                                stdout=first_log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            progress = job / "progress.txt"
            if progress.exists() and int(progress.read_text() or 0) >= 3:
                proc.send_signal(signal.SIGTERM)                          # preempted after step 3
                break
            time.sleep(0.05)
        proc.wait(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    assert not (job / "DONE").exists() and not (job / "adapter").exists()
    card = json.loads((job / "run.json").read_text())
    stopped = card["interrupted_at_step"]
    assert card["status"] == "interrupted" and 3 <= stopped < reference["card"]["data"]["total_steps"]
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stopped
    before = snapshot(job / "eval") | {f"ckpt/{k}": v for k, v in snapshot(job / "checkpoints").items()
                                      if k.startswith("adapter_step_")}
    assert "base/marker.json" in before and "step_3/marker.json" in before

    log_before = (job / "train.log").read_text()
    hydra_main(monkeypatch, args, root)                    # re-launch (in this process: no start-up): resumes
    assert "resume:" in (job / "train.log").read_text()[len(log_before):]
    card = json.loads((job / "run.json").read_text())
    assert card["status"] == "done" and card["previous_attempts"] == 1
    assert card["loss_history"] == pytest.approx(reference["card"]["loss_history"], rel=1e-5)
    assert [v["step"] for v in card["val_loss"]] == [v["step"] for v in reference["card"]["val_loss"]]
    assert_same_adapter(adapter(job), reference["adapter"])
    after = snapshot(job / "eval") | {f"ckpt/{k}": v for k, v in snapshot(job / "checkpoints").items()
                                     if k.startswith("adapter_step_")}
    assert {k: after[k] for k in before} == before                        # nothing from before was rewritten
    assert "final/marker.json" in after

    # Launched once more (the same command line, in this process): DONE -> one log line, nothing trained.
    finished = snapshot(job, skip=(".hydra", "train.log"))
    log_before = (job / "train.log").read_text()
    hydra_main(monkeypatch, args, root)
    assert (job / "train.log").read_text()[len(log_before):].count("skip: ") == 1
    assert snapshot(job, skip=(".hydra", "train.log")) == finished


@pytest.mark.slow
def test_local_sweep_requeues_a_preempted_job_and_a_rerun_changes_nothing(tmp_path, reference, monkeypatch,
                                                                           capfd):
    """A sweep of two jobs through hydra/launcher=local_gpus (submitit local jobs, run side by side). One
    job gets the requeue signal (USR2) at step 4: it checkpoints, submitit requeues it, it resumes and ends
    with the adapter of an uninterrupted run; the other is not disturbed. Re-running the finished sweep
    launches nothing and changes no file."""
    root = corpora(tmp_path)
    sweep = root / "multirun" / "ci"
    args = ["-m", "hydra/launcher=local_gpus", "hydra.launcher.max_parallel=2", *TINY, *MARKER,
            "arm=minus", "seed=0,1", f"paths.data_dir={root}", "sweep_name=ci", f"hydra.sweep.dir={sweep}",
            "+callbacks.kill._target_=tests.test_cluster.SendSignal", "+callbacks.kill.at_step=4",
            "+callbacks.kill.signal_name=SIGUSR2", "+callbacks.kill.only_job=tiny-minus-s1"]
    # The sweep's launcher runs in this process (no start-up of its own); its jobs are processes of their
    # own, as submitit starts them, and import the test hooks from this checkout.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    hydra_main(monkeypatch, args, root)
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "DONE").exists())
    assert jobs == ["tiny-minus-s0", "tiny-minus-s1"]
    preempted = sweep / "tiny-minus-s1"
    card = json.loads((preempted / "run.json").read_text())
    assert card["previous_attempts"] == 1 and card["job"]["sweep"] == "ci"
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs and "checkpoint written at step 4" in logs
    assert card["loss_history"] == pytest.approx(reference["card"]["loss_history"], rel=1e-5)
    assert_same_adapter(adapter(preempted), reference["adapter"])
    for name in jobs:
        assert json.loads((sweep / name / "run.json").read_text()).get("previous_attempts", 0) == \
            (1 if name == preempted.name else 0)

    before = snapshot(sweep, skip=("multirun.yaml",))
    capfd.readouterr()
    hydra_main(monkeypatch, args, root)            # the same sweep again, in this process (nothing to start)
    again = capfd.readouterr()
    assert (again.out + again.err).count("skip: ") == 2
    assert snapshot(sweep, skip=("multirun.yaml",)) == before           # bytes and mtimes unchanged


# -- DDP started the way SLURM starts it --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepGradients(L.Callback):
    """Writes the gradients the optimizer saw at every step to gradients.pt (rank 0), to compare jobs."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(self.steps, Path(trainer.default_root_dir) / "gradients.pt")


def in_rank_order(monkeypatch, world: int) -> None:
    """One process is handed each step's examples as `world` DDP ranks hold them, rank after rank: rank
    0's micro-batches, then rank 1's (the split is the StepDataset's own)."""
    import copy

    from lbt.data.datamodule import StepDataset

    one_rank = StepDataset.__getitem__

    def all_ranks(self, step: int) -> dict:
        shares = []
        for rank in range(world):
            view = copy.copy(self)
            view.rank, view.world_size = rank, world
            shares.append(one_rank(view, step))
        return {**shares[0], "micro_batches": [m for share in shares for m in share["micro_batches"]]}
    monkeypatch.setattr(StepDataset, "__getitem__", all_ranks)


@pytest.mark.slow
def test_ddp_two_cpu_ranks_started_like_slurm_match_one_process(tmp_path, monkeypatch):
    """Two CPU ranks started the way SLURM starts them train bit for bit what one process trains when it
    adds up the same per-example gradients in the same order.

    3 examples per step and one per micro-batch: rank 0 holds 2 micro-batches and rank 1 holds 1 (an uneven
    split, in every step, as in a short last step), so rank 0 accumulates g0/T + g2/T, rank 1 has g1/T, and
    the all-reduce adds them: (g0/T + g2/T) + g1/T, T being the step's supervised tokens on all ranks. The
    one process is fed the examples in rank order (0, 2, 1) and accumulates exactly that sum. Equal
    gradients at every step, as AdamW receives them, prove the loss is the mean over the global token
    count, every micro-batch is synced, and a rank with fewer micro-batches does not hang. (The adapter
    alone would not: Adam's update barely changes when every gradient is scaled, so a wrong constant
    factor such as the world size would not show in it.)

    Why not against one process in the plain order: float addition is not associative. With 4 examples,
    one micro-batch per rank and lr 1e-2 (the old form of this test), the first step's gradients agreed
    to 4e-7 of their largest value, like one process against itself with another micro-batch split
    (5e-7), and the loss history to 4e-7 relative; but AdamW's first update is lr * g / (|g| + 1e-8), so
    on an element with g = -1.17e-8 (one process) vs -1.21e-8 (DDP) it moved by 5.40e-3 vs 5.47e-3: the
    adapters differed by 7.6e-5 against a 1e-5 tolerance. That is reduction order, amplified; summing in
    the same order removes it, so this test needs no tolerance at all."""
    root = corpora(tmp_path)
    common = [*TINY, f"paths.data_dir={root}", "arm=plus", "seed=0", "train.lora.dropout=0",
              "train.effective_batch=3", "train.micro_batch=1",
              "+callbacks.gradients._target_=tests.test_cluster.StepGradients"]
    with monkeypatch.context() as patch:
        in_rank_order(patch, world=2)
        single = train_mod.train(compose_train([*common, f"+job_dir={root / 'single'}"]))

    job = root / "ddp"
    args = [*common, "hardware=cpu", "hardware.devices=2", "hardware.strategy=ddp", f"hydra.run.dir={job}",
            "logger=wandb", "logger.mode=offline"]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lbt-ci", "SLURM_NODELIST": "localhost",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env = dict(os.environ, LBT_ROOT=str(root), PYTHONPATH=str(ROOT), HOME=str(root), **slurm)
    # Output to files: a full pipe would block a rank.
    with open(tmp_path / "rank0.log", "w") as log0, open(tmp_path / "rank1.log", "w") as log1:
        ranks = [subprocess.Popen([sys.executable, "-m", "lbt.train", *args], cwd=ROOT, stdout=log,
                                  env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                                  stderr=subprocess.STDOUT) for r, log in enumerate((log0, log1))]
        try:
            for proc in ranks:
                proc.wait(timeout=300)
        finally:
            for proc in ranks:                                           # a hung rank must not outlive the test
                if proc.poll() is None:
                    proc.kill()
    outputs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "MEMBER: 2/2" in outputs[1]                                   # rank 1 of 2, started by "SLURM"
    assert [p.name for p in job.glob("DONE")] == ["DONE"] and (job / "adapter").is_dir()
    assert len(list((job / "wandb_files" / "wandb").glob("offline-run-*"))) == 1   # rank 0 logs only
    card = json.loads((job / "run.json").read_text())
    assert card["status"] == "done" and card["config"]["hardware"]["devices"] == 2
    assert card["data"]["total_steps"] == single["data"]["total_steps"] >= 6
    # Bit for bit: the gradients of every step, the loss history and the adapter.
    ddp_grads, single_grads = (torch.load(d / "gradients.pt") for d in (job, root / "single"))
    assert len(ddp_grads) == len(single_grads) == card["data"]["total_steps"]
    for step, (ours, theirs) in enumerate(zip(ddp_grads, single_grads), start=1):
        assert ours.keys() == theirs.keys() and ours
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=f"step {step}: {key}")
    assert card["loss_history"] == single["loss_history"]
    single_adapter = adapter(root / "single")
    for key, value in adapter(job).items():
        assert torch.equal(value, single_adapter[key]), key
