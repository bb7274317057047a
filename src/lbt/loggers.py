"""Metric loggers from the `logger` config group: wandb (online or offline), csv, none.

W&B: one run per job, group = the sweep's name, a deterministic run id per (sweep, job) with
resume="allow" (a requeued job continues its run), offline mode when there is no API key or no
network, and `wandb.finish()` always (finish_wandb, called from a `finally`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def wandb_host_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, reason it is offline) for mode auto|online|offline|disabled."""
    requested = str(requested or "auto")
    if requested in ("offline", "disabled", "dryrun"):
        return ("offline" if requested == "dryrun" else requested), None
    if not os.environ.get("WANDB_API_KEY") and not Path.home().joinpath(".netrc").exists():
        return "offline", "no WANDB_API_KEY"
    if not wandb_host_reachable():
        return "offline", "W&B is not reachable (no network)"
    return "online", None


def run_id(sweep_name: str, job_name: str) -> str:
    return hashlib.sha1(f"{sweep_name}/{job_name}".encode()).hexdigest()[:16]


def build_logger(logger_cfg: DictConfig, job_dir: Path, job: dict[str, Any], config: dict[str, Any],
                 rank_zero: bool = True):
    kind = str(logger_cfg.get("kind", "none"))
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(job_dir), name="csv", version="")
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r}: use wandb, csv or none")
    from lightning.pytorch.loggers import WandbLogger

    mode, reason = wandb_mode(logger_cfg.get("mode"))
    wandb_dir = job_dir / "wandb_files"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    if reason and rank_zero:
        log.warning("W&B offline (%s): logging to %s; upload later with `wandb sync %s/wandb/offline-run-*`",
                    reason, wandb_dir, wandb_dir)
    name = f"{job['model']}-{job['arm']}-s{job['seed']}"
    return WandbLogger(
        project=str(logger_cfg.project), entity=logger_cfg.get("entity"), group=job.get("sweep"),
        job_type=job["arm"], name=name, id=run_id(str(job.get("sweep")), name), resume="allow",
        tags=[f"model:{job['model']}", f"arm:{job['arm']}", f"seed:{job['seed']}",
              f"experiment:{job.get('experiment') or 'none'}"],
        save_dir=str(wandb_dir), mode=mode, config=config, log_model=False,
    )


def finish_wandb() -> None:
    """Close the W&B run of this process, if any, so multirun jobs never log into each other's run."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
