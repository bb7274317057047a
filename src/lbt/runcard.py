"""Run cards: what a job was (resolved config without secrets, code and package versions, corpus hash)
and what it did (wall time, tokens/s, losses). Secrets never reach a run card or a logger.

This module holds the card's content; writing and reading it is `lbt.rundir`'s (write_json_atomic and
read_json are re-exported here for older importers)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lbt.rundir import RunDir, read_json, write_json_atomic

__all__ = ["git_sha", "host_info", "package_versions", "process_age_s", "public_config", "read_json",
           "record_status", "scrub_secrets", "write_json_atomic"]

# A tokenizer is no secret: the run card must say which one a job used.
SECRET_KEY = re.compile(r"(api[_-]?key|token(?!izer)|secret|password|passwd|credential|auth)", re.IGNORECASE)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LBT_LLM_API_KEY", "OPENAI_API_KEY")
REDACTED = "<redacted>"
PACKAGES = ("lbt", "torch", "transformers", "peft", "lightning", "hydra-core", "omegaconf", "torchmetrics",
            "wandb", "numpy", "scipy")


def scrub_secrets(obj: Any) -> Any:
    """Replace values under secret-looking keys, and any value equal to a secret in the environment."""
    secrets = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str) and (value in secrets or (SECRET_KEY.search(key) and value)):
            return REDACTED
        return value
    return walk(obj)


def public_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides (`key=value`) as given, with the values of secret-looking keys and of
    secrets in the environment redacted."""
    out = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        out.append(f"{key}{sep}{scrub_secrets({key.lstrip('+~'): value})[key.lstrip('+~')]}" if sep else item)
    return out


def public_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, secrets removed."""
    return scrub_secrets(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def installed_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution named (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def package_versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **installed_versions(PACKAGES)}


def host_info() -> dict[str, Any]:
    """Where this attempt of a job runs: the host, the GPUs it was given (CUDA_VISIBLE_DEVICES, as the
    local_gpus launcher or SLURM set it) and their names, and the SLURM job id."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"name": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": gpus, "slurm_job": os.environ.get("SLURM_JOB_ID")}


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22, starttime: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def record_status(run: RunDir, card: dict[str, Any], status: str, error: BaseException | None = None, *,
                  write: bool = True, **fields: Any) -> None:
    """Set the card's status and fields (and the error's type, message and traceback tail), then write it
    atomically; a card that is no longer incomplete drops its list of missing files. write=False updates
    the card in memory only (the ranks of a multi-GPU job other than rank 0)."""
    card.update(status=status, **fields)
    if status != "incomplete":
        card.pop("missing", None)
    if error is not None:
        tail = traceback.format_exception(type(error), error, error.__traceback__)
        card["error"] = {"type": type(error).__name__, "message": str(error),
                         "traceback": "".join(tail)[-4000:], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if write:
        write_json_atomic(run.card, card)
