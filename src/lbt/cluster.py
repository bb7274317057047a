"""Scale-out, inside a job: one GPU per local job, preemption-safe stops, resumable RNG state.

The launchers (presets `hydra/launcher=slurm` and `local_gpus`) live in hydra_plugins.lbt_launchers,
because Hydra only loads launchers from its plugin namespace.

- `lock_local_gpus`: under `hydra/launcher=local_gpus` the launcher gives each job one GPU; the job
  locks it (a file per GPU), so that two sweeps on one machine never share a GPU.
- `GracefulStop` turns SIGTERM / SIGUSR1 / SIGUSR2 into: finish the current optimizer step, write
  checkpoints/last.ckpt, stop, then requeue (submitit's checkpoint protocol under submitit,
  `scontrol requeue` under a plain SLURM job) or exit.
- `RNGState` puts every rank's torch / CUDA / numpy / python RNG state into the resumable checkpoint, so
  a resumed job draws the same LoRA-dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from lbt.env import JOBS_PER_GPU_ENV
from lbt.joblock import slurm_job_id

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # SLURM's --signal before the time limit
RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK")


def env_rank() -> int:
    """This process's global rank as the launcher (SLURM, torchrun) set it; 0 for a single process.

    Known before Lightning starts, so that only rank 0 writes the run card of a multi-process job.
    """
    for name in RANK_ENV:
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def env_local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID); 0 for one process."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def slurm_plugins() -> list[Any]:
    """Under SLURM, Lightning's own auto-requeue is switched off: GracefulStop and submitit requeue instead.

    Applies to every job SLURM started (one GPU or several), not only DDP jobs.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# -- one GPU per job on one node --------------------------------------------------------------------

def gpu_pool() -> list[str]:
    """GPU ids a local sweep may hand out: LBT_GPUS, else CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    for name in ("LBT_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None and value.strip():
            return [g.strip() for g in value.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


_locks: list[Any] = []  # open lock files: a GPU stays locked for this process's lifetime


def jobs_per_gpu() -> int:
    """How many jobs of this job's sweep may share one GPU (LBT_JOBS_PER_GPU, default 1)."""
    value = (os.environ.get(JOBS_PER_GPU_ENV) or "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{JOBS_PER_GPU_ENV}={value!r}: use a whole number ≥ 1 (jobs sharing one GPU)")
    return int(value)


def lock_local_gpus(hardware: DictConfig, lock_dir: str | Path | None = None, poll_s: float = 5.0,
                    slots: int | None = None) -> list[str]:
    """Under hydra/launcher=local_gpus, lock the GPUs the launcher gave this job (CUDA_VISIBLE_DEVICES),
    waiting while a job of another sweep on this machine holds one.

    The launcher gives one GPU to at most `jobs_per_gpu` of its own jobs; the file locks (released by the OS
    when the process ends, however it ends) extend that to several sweeps on one machine. With one job per
    GPU a job holds `gpu<id>.lock` alone. With k per GPU it holds `gpu<id>.lock` shared with the other
    sharing jobs, and one of k slot locks (`gpu<id>.slot<s>.lock`): a job that wants a GPU alone waits for
    all sharing jobs, and sharing jobs wait for it (slots: k; None: `jobs_per_gpu()`). No-op outside
    submitit's local executor or on CPU.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or str(hardware.accelerator) != "gpu":
        return []
    gpus = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    slots = jobs_per_gpu() if slots is None else slots
    folder = Path(lock_dir or os.environ.get("LBT_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "lbt-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        if slots == 1:
            _locks.append(_lock_waiting([folder / f"gpu{gpu}.lock"], fcntl.LOCK_EX, gpu, poll_s))
        else:
            _locks.append(_lock_waiting([folder / f"gpu{gpu}.lock"], fcntl.LOCK_SH, gpu, poll_s))
            _locks.append(_lock_waiting([folder / f"gpu{gpu}.slot{s}.lock" for s in range(slots)],
                                        fcntl.LOCK_EX, gpu, poll_s))
    if gpus:
        log.info("local_gpus: this job runs on GPU %s%s", ",".join(gpus),
                 f" (shared by up to {slots} jobs)" if slots > 1 else "")
    return gpus


def _lock_waiting(paths: list[Path], mode: int, gpu: str, poll_s: float) -> Any:
    """The first of `paths` this process can lock (flock `mode`), waiting while all are held; the open
    file is returned and stays open: the lock lives with it."""
    handles = [open(path, "a+") for path in paths]  # noqa: SIM115 -- one is kept open: the lock lives with it
    waited = False
    while True:
        for handle in handles:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except OSError:
                continue
            for other in handles:
                if other is not handle:
                    other.close()
            if mode == fcntl.LOCK_EX:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
            return handle
        if not waited:
            log.info("local_gpus: GPU %s is busy (another sweep); waiting for it", gpu)
            waited = True
        time.sleep(poll_s)


# -- resumable RNG state ------------------------------------------------------------------------------

def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states as plain lists and tensors (loadable with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "python": [version, list(internal), gauss_next]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class RNGState(L.Callback):
    """Saves every rank's RNG state in the resumable checkpoint and restores it right before the first
    optimizer step after a resume (after the DataLoader has drawn its own seed), so that LoRA dropout
    continues exactly where the interrupted run stopped."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = rng_state(pl_module.device)
        states = [state]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # save_checkpoint runs on every rank; rank 0 writes the file, so it must hold all ranks' states.
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            self._pending = states[trainer.global_rank % len(states)]
        else:
            log.warning("checkpoint holds no RNG state: the resumed run's dropout masks will differ")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending, pl_module.device)
            self._pending = None


# -- preemption ---------------------------------------------------------------------------------------

def _is_submitit_requeue_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return (owner is not None and type(owner).__module__.startswith("submitit")
            and getattr(handler, "__name__", "") in ("checkpoint_and_try_requeue", "checkpoint_and_exit"))


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this SLURM job (array task aware); True when SLURM accepted it."""
    job_id = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not requeue SLURM job %s: %s", job_id, err)
        return False
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
    return result.returncode == 0


class GracefulStop(L.Callback):
    """On SIGTERM / SIGUSR1 / SIGUSR2: finish the current optimizer step, write checkpoints/last.ckpt,
    stop training, then requeue or exit (`exit_for_requeue`).

    The signal handler only records the signal; the checkpoint is written at the next step boundary,
    after every other callback's on_train_batch_end (put this callback last), so the checkpoint is the
    exact state an uninterrupted run has before its next step. Ranks agree on stopping at the same step.
    Handlers are installed before fit and again at on_train_start, where they replace the SIGTERM
    handler Lightning registers (which would end the fit loop without a checkpoint).
    """

    def __init__(self, save_checkpoint: Callable[[L.Trainer], None]):
        self.save_checkpoint = save_checkpoint
        self.signum: int | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._submitit: dict[int, Callable] = {}

    # signals
    def _record(self, signum: int, frame: Any = None) -> None:
        if self.signum is None:
            log.warning("received %s: stopping after this optimizer step with a checkpoint",
                        signal.Signals(signum).name)
        self.signum = signum

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current != self._record:  # (bound methods: equal, never identical)
                self._previous.setdefault(sig, current)
                if _is_submitit_requeue_handler(current):
                    self._submitit[sig] = current
            signal.signal(sig, self._record)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    # training loop
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        if self.signum is None:
            self.signum = signal.SIGTERM  # another rank got the signal
        if trainer.global_step >= trainer.max_steps:
            return  # the last step: let the job finish normally
        self.save_checkpoint(trainer)
        self.stopped_at_step = trainer.global_step
        trainer.should_stop = True
        log.warning("checkpoint written at step %d; stopping", trainer.global_step)

    def exit_for_requeue(self) -> None:
        """After fit: hand over to submitit's requeue, or `scontrol requeue` under SLURM, then exit."""
        signum = int(self.signum or signal.SIGTERM)
        self.uninstall()
        handler = self._submitit.get(signum)
        if handler is not None:
            # submitit's protocol: calls the launcher's checkpoint() (resubmits the same Hydra job, which
            # resumes from last.ckpt), requeues and exits on rank 0; returns on the other ranks.
            handler(signum, None)
        elif signum in REQUEUE_SIGNALS and os.environ.get("SLURM_JOB_ID") and not self._submitit \
                and env_rank() == 0 and requeue_slurm_job():
            log.warning("requeued SLURM job %s", os.environ["SLURM_JOB_ID"])
        raise SystemExit(128 + signum)
