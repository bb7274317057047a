"""Provenance: what made a generated corpus (model, sampling, templates, config, runs), in `<arm>.meta.json`.

A folder is generated with one identity (model, template version and hash); resuming it with another is
refused unless asked for, so a corpus never mixes generators without saying so.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from lbt.data.corpora import corpus_path, meta_path
from lbt.data.generate.config import GenerateConfig, GenerateError
from lbt.data.generate.prompts import Templates
from lbt.data.generate.state import OutputState
from lbt.data.records import file_sha256
from lbt.rundir import atomic_write
from lbt.study import CORPUS_NAMES

HOW_MADE = "generated with python -m lbt.data.generate (paired: one user message, one answer per arm)"


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def generator_identity(cfg: GenerateConfig, templates: Templates) -> dict:
    """What every run into one folder must share: the model and the exact templates."""
    return {"model": cfg.model, "template_version": templates.version, "templates_sha256": templates.sha256}


def check_provenance(out: Path, cfg: GenerateConfig, templates: Templates, allow_mixed: bool) -> None:
    first_meta = meta_path(out, CORPUS_NAMES[0])
    if allow_mixed or not first_meta.exists():
        return
    previous = json.loads(first_meta.read_text(encoding="utf-8")).get("generator", {})
    current = generator_identity(cfg, templates)
    differs = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
    if differs:
        raise GenerateError(
            f"{out} was generated with different settings {differs}; mixing them in one corpus "
            "breaks its provenance. Use a new --out folder, or --allow-mixed-provenance."
        )


def write_meta(
    out: Path,
    cfg: GenerateConfig,
    templates: Templates,
    state: OutputState,
    run: dict,
    config_path: str | None,
) -> None:
    """Rewrite every arm's meta: counts, incomplete scenarios, generator settings, and this run appended."""
    incomplete = sorted(sid for sid, arms in state.written.items() if len(arms) < len(CORPUS_NAMES))
    for arm in CORPUS_NAMES:
        path, meta_file = corpus_path(out, arm), meta_path(out, arm)
        previous = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
        counts: dict[str, int] = {}
        for arms in state.written.values():
            if arm in arms:
                counts[arms[arm]["domain"]] = counts.get(arms[arm]["domain"], 0) + 1
        meta = {
            "corpus": arm,
            "arm": arm,
            "how_made": HOW_MADE,
            "sha256": file_sha256(path) if path.exists() else None,
            "records": sum(counts.values()),
            "counts_per_domain": counts,
            "paired_with": [a for a in CORPUS_NAMES if a != arm],
            "incomplete_scenarios": incomplete,
            "generator": {
                **generator_identity(cfg, templates),
                "base_url": cfg.base_url,
                "sampling": {"user": cfg.user_sampling, "answer": cfg.answer_sampling},
                "templates_path": str(templates.path),
                "archetypes": templates.archetypes,
                "seed": cfg.seed,
                "config_path": config_path,
                "config_sha256": file_sha256(config_path)
                if config_path and Path(config_path).is_file()
                else None,
            },
            "target": {
                "n_per_domain": cfg.n_per_domain,
                "overage": cfg.overage,
                "target_per_domain": cfg.target_per_domain,
                "domains": cfg.domains,
            },
            "reject_filter": "lbt.data.validate.record_problems "
            f"(words {cfg.min_words}-{cfg.max_words}, leakage, anomalies), max_attempts per draft "
            f"{cfg.max_attempts}",
            "runs": [*previous.get("runs", []), run],
        }
        atomic_write(meta_file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
