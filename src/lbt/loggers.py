"""Metric loggers from the `logger` config group: wandb (online or offline), csv, none.

W&B: one run per job, group = the sweep's name, job_type `train` (the arm is in the config and the tags;
names from lbt.wandb_keys), a deterministic run id per (sweep, job) with resume="allow" (a requeued job
continues its run), offline mode when there is no API key or no network, and `wandb.finish()` always
(finish_wandb, called from a `finally`).

Every metric of a training job goes through `log_at_step` with the step it describes (optimizer steps
completed: base 0, step_<n> n, final the last), so training, validation, evaluation and probe values share
one axis: `trainer/global_step` in W&B, the `step` column of csv/metrics.csv.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig

from lbt import wandb_keys as keys

log = logging.getLogger(__name__)


def wandb_host() -> str:
    """The W&B server's host name: WANDB_BASE_URL (self-hosted servers), else api.wandb.ai."""
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def wandb_key_in_netrc(host: str | None = None) -> bool:
    """True when the netrc file wandb reads (NETRC, else ~/.netrc under HOME) has a login for the W&B host."""
    path = Path(os.environ.get("NETRC") or Path(os.path.expanduser("~")) / ".netrc")
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(host or wandb_host()) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_host_reachable(host: str | None = None, port: int = 443, timeout: float = 2.0) -> bool:
    host = host or wandb_host()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def requested_mode() -> str:
    """The W&B mode asked for by the environment, as logger/wandb.yaml reads it for training: lbt's own
    LBT_WANDB_MODE, else wandb's WANDB_MODE, else auto (an empty value is unset)."""
    from lbt.env import env_value

    return env_value("LBT_WANDB_MODE") or env_value("WANDB_MODE") or "auto"


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, reason it is offline) for mode auto|online|offline|disabled."""
    requested = str(requested or "auto")
    if requested in ("offline", "disabled", "dryrun"):
        return ("offline" if requested == "dryrun" else requested), None
    if not os.environ.get("WANDB_API_KEY") and not wandb_key_in_netrc():
        return "offline", "no WANDB_API_KEY and no W&B login in ~/.netrc"
    if not wandb_host_reachable():
        return "offline", "W&B is not reachable (no network)"
    return "online", None


def run_id(sweep_name: str, job_name: str) -> str:
    return hashlib.sha1(f"{sweep_name}/{job_name}".encode()).hexdigest()[:16]


def job_run_id(job: dict[str, Any], job_dir: Path, name: str) -> str:
    """Per (sweep, job) in a sweep, so a requeued or re-launched job continues its W&B run; outside a sweep,
    per job directory, so two separate single runs of the same model/arm/seed never share a run."""
    return run_id(str(job["sweep"]), name) if job.get("sweep") else run_id(str(Path(job_dir).resolve()), name)


def build_logger(logger_cfg: DictConfig, job_dir: Path, job: dict[str, Any], config: dict[str, Any],
                 rank_zero: bool = True):
    kind = str(logger_cfg.get("kind", "none"))
    if kind == "none":
        return False
    if kind == "csv":
        return appending_csv_logger(job_dir)
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r}: use wandb, csv or none")
    from lightning.pytorch.loggers import WandbLogger

    mode, reason = wandb_mode(logger_cfg.get("mode"))
    wandb_dir = job_dir / "wandb_files"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    if reason and rank_zero:
        log.warning("W&B offline (%s): logging to %s; upload later with `wandb sync %s/wandb/offline-run-*`",
                    reason, wandb_dir, wandb_dir)
    name = keys.run_name(job["model"], job["arm"], job["seed"])
    sweep = job.get("sweep")
    logger = WandbLogger(
        project=str(logger_cfg.project), entity=logger_cfg.get("entity"),
        group=keys.run_group(sweep) if sweep else None, job_type=keys.JOB_TYPE_TRAIN, name=name,
        id=job_run_id(job, job_dir, name), resume="allow",
        tags=keys.run_tags(job["model"], job["arm"], job["seed"], job.get("experiment")),
        save_dir=str(wandb_dir), mode=mode, config=config, log_model=False,
    )
    # Lightning always passes anonymous=None, which wandb answers with a deprecation warning in every job;
    # leaving the argument out is wandb's default.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def log_at_step(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """Scalars to every logger at `step` (optimizer steps completed), flushed at once: a job killed later
    keeps them in csv/metrics.csv. Call on rank 0 only."""
    if not metrics:
        return
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=int(step))
        logger.save()


def appending_csv_logger(job_dir: Path):
    """Lightning's CSVLogger writing csv/metrics.csv, appending across attempts of a job.

    Lightning's own writer deletes an existing metrics.csv when it starts; a resumed job would lose the
    rows of its earlier attempts. Here the existing file is kept and its columns carried over (a new
    column rewrites the header, keeping every row).
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="", encoding="utf-8") as handle:
                    self.metrics_keys = sorted(next(csv.reader(handle), []))

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=str(job_dir), name="csv", version="")


def mark_wandb_preempting() -> None:
    """Tell W&B this run stops to be requeued (shown as preempted, not crashed); it resumes with the same id."""
    wandb = sys.modules.get("wandb")  # a process that never imported wandb has no run (and pays no import)
    if wandb is not None and wandb.run is not None:
        wandb.run.mark_preempting()


def finish_wandb(exit_code: int | None = None) -> None:
    """Close the W&B run of this process, if any, so multirun jobs never log into each other's run;
    a failed job's run ends with its non-zero exit code (shown as failed in W&B)."""
    wandb = sys.modules.get("wandb")  # a process that never imported wandb has no run (and pays no import)
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
