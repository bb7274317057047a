"""The environment lbt runs in: `.env` files, and one rule for every variable lbt reads — empty means unset.

`load_env()` reads `.env` from the working directory, then from `$LBT_ROOT` (python-dotenv's parser, so
quotes, `export` and comments work as in a shell), sets only the variables that have a value there, and
never overrides a variable already set in the shell. It also drops empty variables of lbt, W&B and
Hugging Face (`LBT_*`, `WANDB_*`, `HF_*`): `HF_HOME=` would put the model cache in a folder named `hub`
under the working directory, `WANDB_ENTITY=` names an entity "", while unset means each library's default.
`import lbt` calls it once, before any library reads its variables at import (huggingface_hub: HF_HOME).

The config reads variables with `${lbt.env:NAME,default}`, registered here: like `${oc.env:NAME,default}`
(a value is a string; the default is as written, `null` is None; wrap it in `oc.decode` for numbers), but
an empty value gives the default too. oc.env returns "" for a variable that is set but empty, which made
`LBT_ROOT=` a data root of "" and the corpus `/data/corpora/...`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from omegaconf import OmegaConf

RESOLVER = "lbt.env"
# Empty variables with these prefixes are removed: for lbt, W&B and Hugging Face unset and empty mean
# the same, and unset is what every default is written for.
PREFIXES = ("LBT_", "WANDB_", "HF_")
# What wandb itself accepts in WANDB_MODE (it validates the variable); lbt's `auto` is LBT_WANDB_MODE's.
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "shared", "run")
# How many jobs of a sweep may share one GPU: the local_gpus launcher sets it for its jobs' processes
# (hydra.launcher.jobs_per_gpu), and lbt.cluster.lock_local_gpus reads it inside each job.
JOBS_PER_GPU_ENV = "LBT_JOBS_PER_GPU"


def env_value(name: str) -> str | None:
    """The variable's value, None when unset or empty."""
    value = os.environ.get(name)
    return value if value else None


def load_env(cwd: Path | None = None) -> dict[str, str]:
    """Put the non-empty values of ./.env, then of $LBT_ROOT/.env, into os.environ without overriding what
    is set, and drop empty LBT_/WANDB_/HF_ variables. Returns what was set: name -> the file it came from."""
    drop_empty()
    loaded: dict[str, str] = {}
    here = Path(cwd or Path.cwd()) / ".env"
    _read(here, loaded)
    root = env_value("LBT_ROOT")  # from the shell, or from ./.env just read
    if root:
        there = Path(root).expanduser() / ".env"
        if not (here.is_file() and there.is_file() and here.samefile(there)):
            _read(there, loaded)
    return loaded


def _read(path: Path, loaded: dict[str, str]) -> None:
    if not path.is_file():
        return
    for name, value in dotenv_values(path).items():
        if value and name not in os.environ:  # empty means unset; the shell wins
            os.environ[name] = value
            loaded[name] = str(path)


def drop_empty() -> list[str]:
    """Remove empty LBT_*, WANDB_*, HF_* variables (empty means unset); returns their names."""
    names = [k for k, v in os.environ.items() if v == "" and k.startswith(PREFIXES)]
    for name in names:
        del os.environ[name]
    return names


_REQUIRED = object()


def _resolve_env(name: str, default: Any = _REQUIRED) -> Any:
    """${lbt.env:NAME,default}: the variable's value (a string), or the default when it is unset or empty."""
    value = env_value(str(name))
    if value is not None:
        return value
    if default is _REQUIRED:
        raise KeyError(f"environment variable {name!r} is not set (and ${{{RESOLVER}:{name}}} has no default)")
    return default


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve_env)


register_resolver()
