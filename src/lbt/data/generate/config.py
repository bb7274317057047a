"""The generator's settings: config file, then environment (and `.env`), then command-line overrides.

Endpoint settings come from the config file, then from the environment (a `.env` file in the working
directory is read first): LBT_LLM_BASE_URL, LBT_LLM_MODEL, LBT_LLM_API_KEY (the key only ever from the
environment, read by lbt.llm_client). Nothing about the endpoint is built in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lbt.data.corpora import SOURCE_DOMAINS
from lbt.env import load_env
from lbt.llm_client import BASE_URL_ENV, MODEL_ENV

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "generate" / "default.yaml"


class GenerateError(RuntimeError):
    """Bad config, inconsistent output folder, or an endpoint that stopped answering."""


@dataclass
class GenerateConfig:
    base_url: str | None = None
    model: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    concurrency: int = 4
    user_sampling: dict = field(
        default_factory=lambda: {"temperature": 1.0, "top_p": 0.95, "max_tokens": 256}
    )
    answer_sampling: dict = field(
        default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}
    )
    templates: str | None = None
    n_per_domain: int = 375
    overage: float = 0.25
    domains: list = field(default_factory=lambda: list(SOURCE_DOMAINS))
    max_attempts: int = 3
    max_scenarios_factor: float = 2.0
    seed: int = 0
    min_words: int = 120
    max_words: int = 220

    @property
    def target_per_domain(self) -> int:
        return math.ceil(self.n_per_domain * (1 + self.overage))


def load_config(path: str | Path | None, overrides: dict | None = None) -> GenerateConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GenerateError(f"{path}: config file not found")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise GenerateError(f"{path}: expected a mapping of config keys")
    flat = {**(raw.get("endpoint") or {}), **raw}
    flat.pop("endpoint", None)
    sampling = flat.pop("sampling", {}) or {}
    known = {f for f in GenerateConfig.__dataclass_fields__}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise GenerateError(f"{path}: unknown config keys {unknown}")
    cfg = GenerateConfig(**flat)
    cfg.user_sampling = {**cfg.user_sampling, **(sampling.get("user") or {})}
    cfg.answer_sampling = {**cfg.answer_sampling, **(sampling.get("answer") or {})}
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    load_env()  # ./.env and $LBT_ROOT/.env; the shell's variables win
    cfg.base_url = cfg.base_url or os.environ.get(BASE_URL_ENV)
    cfg.model = cfg.model or os.environ.get(MODEL_ENV)
    if not cfg.base_url or not cfg.model:
        raise GenerateError(
            f"no endpoint: set endpoint.base_url/model in the config or {BASE_URL_ENV}/{MODEL_ENV} "
            "in the environment or .env"
        )
    bad = [d for d in cfg.domains if d not in SOURCE_DOMAINS]
    if bad:
        raise GenerateError(f"unknown domains {bad}; source domains are {list(SOURCE_DOMAINS)}")
    return cfg
