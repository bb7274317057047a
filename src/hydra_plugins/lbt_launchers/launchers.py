"""Hydra submitit launchers that never launch a finished job, and a one-GPU-per-job local launcher.

- `SlurmLauncher` (hydra/launcher=slurm): hydra-submitit-launcher's SLURM launcher, one array job per
  sweep; jobs whose directory holds DONE are not submitted. Tested against a real one-node SLURM
  (tests/test_slurm.py).
- `SequentialLauncher` (the default for `-m`): Hydra's basic launcher; finished jobs are not launched.
- `LocalGPULauncher` (hydra/launcher=local_gpus): runs a sweep's jobs as local submitit jobs in parallel,
  one GPU each, as many at a time as there are GPUs (times `jobs_per_gpu`, for jobs small enough to share
  one).

Each logs one summary line per cell when the sweep ends (done / failed with its error / skipped). The
submitit ones keep submitit's requeue protocol: the job function is the launcher itself, whose
`checkpoint()` re-submits the same Hydra job (same overrides, hence the same job directory), which
resumes from checkpoints/last.ckpt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, OmegaConf

import lbt.env  # noqa: F401 -- registers ${lbt.env:NAME,default} wherever Hydra composes (light: no torch)
from lbt.env import JOBS_PER_GPU_ENV
from lbt.rundir import finished_folder

log = logging.getLogger(__name__)


def job_dir_of(config: DictConfig, hydra_context: Any, overrides: Sequence[str]) -> Path | None:
    """The directory a sweep job will write to, resolved as Hydra resolves it; None if it can't be."""
    saved = HydraConfig.instance().cfg
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        HydraConfig.instance().set_config(sweep_config)
        folder = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")))
        return folder / str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
    except Exception as err:  # noqa: BLE001 -- unresolvable subdir: launch the job; train.py checks DONE
        log.debug("cannot resolve the job directory of %s: %s", overrides, err)
        return None
    finally:
        if saved is not None:
            HydraConfig.instance().cfg = saved


def finished_job(job_dir: Path, overrides: Sequence[str]) -> JobReturn:
    card = None
    if (job_dir / "run.json").exists():
        card = json.loads((job_dir / "run.json").read_text(encoding="utf-8"))
    return JobReturn(overrides=list(overrides), working_dir=str(job_dir), task_name="train",
                     status=JobStatus.COMPLETED, _return_value=card)


class SkipFinishedJobs:
    """Hydra launcher mixin: a job whose directory holds DONE (or whose folder under the arm's pre-rename name
    does: `lbt.rundir.finished_folder`) is not launched (one log line each), so
    re-running a finished sweep writes nothing into its job directories; after the sweep, one summary
    line per cell (done / failed with its error / skipped)."""

    config: DictConfig
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns: dict[int, JobReturn] = {}
        job_dirs: dict[int, Path | None] = {}
        pending: list[tuple[int, Sequence[str]]] = []
        for i, overrides in enumerate(job_overrides):
            job_dir = job_dirs[i] = job_dir_of(self.config, self.hydra_context, overrides)
            finished = finished_folder(job_dir) if job_dir is not None else None
            if finished is not None:
                log.info("skip: %s already finished (DONE present%s); not launched", finished,
                         "" if finished == job_dir else f", under the arm's earlier name, for {job_dir.name}")
                job_dirs[i] = finished
                returns[i] = finished_job(finished, overrides)
            else:
                pending.append((i, overrides))
        skipped = set(returns)
        if pending:
            launched = self.launch_pending([o for _, o in pending], initial_job_idx)
            returns.update({i: ret for (i, _), ret in zip(pending, launched)})
        log_summary([(job_dirs[i], returns[i], i in skipped) for i in range(len(job_overrides))])
        return [returns[i] for i in range(len(job_overrides))]

    def launch_pending(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]


def error_line(error: Any) -> str:
    """One line for a failed cell: where submitit passes the job's traceback as text (the job raised, or
    died), the traceback's last line; else `Type: first line of the message`."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        trace = text.split("Traceback (most recent call last)", 1)[1].splitlines()
        trace = trace[:next((i for i, line in enumerate(trace) if line.startswith("-----")), len(trace))]
        lines = [line.strip() for line in trace if line.strip() and not line.startswith(" ")]
        if lines:
            return lines[-1]
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if isinstance(error, BaseException) else first


def cell_outcome(job_dir: Path | None, ret: JobReturn, skipped: bool) -> tuple[str, str]:
    """(outcome, detail) of one cell: skipped, done, failed, or unfinished (ended without DONE)."""
    overrides = " ".join(getattr(ret, "overrides", None) or [])
    where = str(job_dir or getattr(ret, "working_dir", None) or overrides)
    value = getattr(ret, "_return_value", None)
    if skipped:
        return "skipped", f"{where} (DONE present)"
    if getattr(ret, "status", JobStatus.COMPLETED) != JobStatus.COMPLETED:
        return "failed", f"{where}: {error_line(value)}"
    if job_dir is not None and not (job_dir / "DONE").exists():
        status = value.get("status") if isinstance(value, dict) else None
        return "unfinished", f"{where} (no DONE; run.json status: {status})"
    return "done", where


def log_summary(cells: Sequence[tuple[Path | None, JobReturn, bool]]) -> None:
    """One line per cell, then the counts: the sweep's outcome at a glance (failed cells at error level)."""
    counts: dict[str, int] = {}
    for job_dir, ret, skipped in cells:
        outcome, detail = cell_outcome(job_dir, ret, skipped)
        counts[outcome] = counts.get(outcome, 0) + 1
        (log.error if outcome in ("failed", "unfinished") else log.info)("%s: %s", outcome, detail)
    log.info("sweep: %d cells, %s", len(cells), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


def collect(job: Any, overrides: Sequence[str]) -> JobReturn:
    """A submitit job's JobReturn; a job that died or raised outside Hydra's job (killed, not requeued,
    timed out too often) becomes a FAILED JobReturn, so that the other cells are still waited for."""
    try:
        return job.results()[0]
    except Exception as err:  # noqa: BLE001 -- reported per cell by log_summary, re-raised by Hydra
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=err)


class SlurmLauncher(SkipFinishedJobs, submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (one array job per sweep) that skips finished jobs, asks
    for no GPU for a CPU job, makes a failed cell a FAILED SLURM task, and waits for every cell even when
    one fails or dies (hydra-submitit-launcher raised at the first job that left no result)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """In the job: Hydra's job; a failure is raised rather than returned, so that SLURM records the
        task as FAILED (sacct, --mail-type=FAIL) and the submitting side still gets its traceback."""
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        return ret

    def launch_pending(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        params = dict(self.params)
        if str(OmegaConf.select(self.config, "hardware.accelerator")) != "gpu":
            params["gpus_per_node"] = None  # the preset's gpus_per_node follows hardware.devices
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        base = set(OmegaConf.structured(submitit_launcher.BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            # The same call as hydra-submitit-launcher: the launcher itself is the job function.
            job_args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                             Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_args))
        first = str(getattr(jobs[0], "job_id", "?")) if jobs else "-"
        log.info("slurm: submitted %d job(s) as SLURM job %s; logs in %s", len(jobs), first.split("_")[0],
                 sweep_dir / ".submitit")
        return [collect(job, overrides) for job, overrides in zip(jobs, job_overrides)]


class LocalGPULauncher(SkipFinishedJobs, submitit_launcher.LocalLauncher):
    """A sweep's jobs as local submitit jobs, at most `max_parallel` at a time (default: `jobs_per_gpu` per
    GPU of the pool, 1 on CPU), each on one GPU, shared with at most `jobs_per_gpu` − 1 other jobs (default
    1: a GPU of its own; more only for jobs whose peak memory fits that share of the card).

    submitit_local alone would give every job the same GPUs; here the launcher keeps the list of free GPUs
    and submits each job with `visible_gpus=[its GPU]`, so submitit sets CUDA_VISIBLE_DEVICES when it
    creates the job's process (before anything in it can start CUDA); a finished job's GPU goes to the
    next job, which gets the GPU running the fewest jobs. Inside, lbt.cluster.lock_local_gpus also locks
    it (one of its `jobs_per_gpu` slots), so that two sweeps on one machine wait for each other. A job that
    gets the requeue signal checkpoints, exits with submitit's requeue code and is restarted by submitit's
    local controller, on the same GPU.
    """

    def __init__(self, max_parallel: int | None = None, jobs_per_gpu: int | None = 1, **params: Any) -> None:
        self.max_parallel = max_parallel
        self.jobs_per_gpu = jobs_per_gpu
        super().__init__(**params)

    def _executor(self) -> Any:
        import submitit

        params = self.params
        executor = submitit.LocalExecutor(folder=params["submitit_folder"],
                                          max_num_timeout=int(params.get("max_num_timeout") or 0))
        executor.update_parameters(timeout_min=params.get("timeout_min", 10080), tasks_per_node=1, nodes=1,
                                   name=params.get("name", "train"),
                                   stderr_to_stdout=bool(params.get("stderr_to_stdout", False)))
        return executor

    def gpu_pool(self) -> list[int]:
        if str(OmegaConf.select(self.config, "hardware.accelerator")) != "gpu":
            return []
        devices = int(OmegaConf.select(self.config, "hardware.devices") or 1)
        if devices != 1:
            raise ValueError(f"hydra/launcher=local_gpus runs one GPU per job, but hardware.devices={devices}: "
                             "start multi-GPU jobs with torchrun or SLURM (docs/cluster.md)")
        from lbt.cluster import gpu_pool  # torch: imported only when a GPU sweep is launched

        pool = gpu_pool()
        if not pool or not all(g.isdigit() for g in pool):
            raise ValueError(f"hydra/launcher=local_gpus: no GPU ids to hand out ({pool}); set LBT_GPUS=0,1,...")
        return [int(g) for g in pool]

    def slots(self) -> int:
        """Jobs that may share one GPU (hydra.launcher.jobs_per_gpu, ≥ 1)."""
        value = self.jobs_per_gpu if self.jobs_per_gpu is not None else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu={value!r}: use a whole number ≥ 1 "
                             "(jobs sharing one GPU)")
        return value

    def launch_pending(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        pool, slots = self.gpu_pool(), self.slots()
        free = [gpu for _ in range(slots) for gpu in pool]  # each GPU once per job it may hold
        limit = min(int(self.max_parallel or len(free) or 1), len(free) or len(job_overrides))
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("local_gpus: %d jobs, at most %d at a time%s; sweep dir %s", len(job_overrides), limit,
                 f" on GPUs {','.join(map(str, pool))}" + (f", {slots} jobs per GPU" if slots > 1 else "")
                 if pool else "", self.config.hydra.sweep.dir)
        # The jobs' processes inherit it: lbt.cluster.lock_local_gpus lets this many jobs hold one GPU.
        os.environ[JOBS_PER_GPU_ENV] = str(slots)
        executor = self._executor()
        queue = list(enumerate(job_overrides, start=initial_job_idx))
        running: list[tuple[int, Sequence[str], Any, int | None]] = []
        returns: dict[int, JobReturn] = {}
        while queue or running:
            while queue and len(running) < limit:
                idx, overrides = queue.pop(0)
                gpu = None
                if free:  # the free slot of the GPU running the fewest jobs (the pool's order breaks ties)
                    load = {g: sum(r[3] == g for r in running) for g in free}
                    gpu = free.pop(free.index(min(free, key=lambda g: (load[g], pool.index(g)))))
                executor.update_parameters(gpus_per_node=0 if gpu is None else 1,
                                           visible_gpus=() if gpu is None else (gpu,))
                log.info("\t#%d : %s%s", idx, " ".join(filter_overrides(overrides)),
                         "" if gpu is None else f" (GPU {gpu})")
                # The same call hydra-submitit-launcher makes: the launcher itself is the job function.
                job = executor.submit(self, list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                      Singleton.get_state())
                running.append((idx, overrides, job, gpu))
            for item in [r for r in running if r[2].done()]:
                running.remove(item)
                idx, overrides, job, gpu = item
                returns[idx] = collect(job, overrides)
                if gpu is not None:
                    free.append(gpu)
            if running:
                time.sleep(0.5)
        return [returns[i] for i in sorted(returns)]


class SequentialLauncher(SkipFinishedJobs, BasicLauncher):
    """Hydra's basic launcher (jobs one after another in this process) that skips finished jobs: the
    default for `-m`, so re-running a finished sweep rewrites nothing, not even Hydra's .hydra/ files."""
