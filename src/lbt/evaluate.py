"""python -m lbt.evaluate — the stance battery on any model, with or without a LoRA adapter, on any item file.

    python -m lbt.evaluate model=qwen items=[data/eval/target_items.jsonl]
    python -m lbt.evaluate model=qwen adapter=multirun/<sweep>/qwen-frame_plus-s0/adapter \\
        items=[data/eval/target_items.jsonl,../shared/reference/seed-eval/target_items.jsonl]
    python -m lbt.evaluate model=llama hardware=gpu eval.option_form=leading_space out_dir=outputs/llama-base

The output directory looks like a job directory, so `lbt.analyze` and `lbt.judge` read it alike:
`eval/<phase>/<item_set>/<measure>.jsonl` (item_set = the item file's stem), `eval/<phase>/summary.json`,
`run.json` (job.arm = "base" without an adapter, else the arm in the adapter's job run.json) and `DONE`.
Item files and the adapter directory are checked before any model loads; measure files that exist are
read back, never overwritten.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lbt.data.records import file_sha256
from lbt.eval.battery import (
    BatterySettings,
    check_measures,
    check_options,
    evaluation_mode,
    load_item_set,
    score_item_set,
)
from lbt.eval.rows import phase_dir, read_rows, rows_path, write_json_once, write_rows
from lbt.eval.summary import summarize_phase
from lbt.model.load import load_model, load_tokenizer, resolve_dtype
from lbt.runcard import git_sha, package_versions, public_config, read_json, write_json_atomic

log = logging.getLogger("lbt.evaluate")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; raised before any model loads."""


def adapter_job(adapter: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The training job an adapter came from: run.json beside it, or one or two folders up
    (<job>/adapter, <job>/checkpoints/adapter_step_<n>)."""
    for folder in (adapter, adapter.parent, adapter.parent.parent):
        card = folder / "run.json"
        if card.is_file():
            return read_json(card).get("job"), folder
    return None, None


def infer_phase(adapter: Path | None) -> str:
    if adapter is None:
        return "base"
    match = re.fullmatch(r"adapter_step_(\d+)", adapter.name)
    return f"step_{match.group(1)}" if match else "final"


def check_adapter(adapter: str | None) -> Path | None:
    if not adapter:
        return None
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(
            f"adapter={path}: no adapter_config.json there (expected a peft save_pretrained "
            "directory such as <job>/adapter or <job>/checkpoints/adapter_step_<n>)"
        )
    return path


def output_directory(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/evaluate")


def load_evaluated_model(cfg: DictConfig, tokenizer, adapter: Path | None) -> torch.nn.Module:
    dtype = resolve_dtype(cfg.model.dtype or cfg.hardware.dtype)
    device = "cuda" if cfg.hardware.accelerator == "gpu" else "cpu"
    model = load_model(cfg.model, tokenizer, dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.eval()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the configured item files; returns the phase summary (also written to summary.json)."""
    started = time.time()
    measures = check_measures(OmegaConf.to_container(cfg.eval.measures, resolve=True))
    template_kwargs = OmegaConf.to_container(cfg.model.chat_template_kwargs, resolve=True) or {}
    settings = BatterySettings.from_config(OmegaConf.to_container(cfg.eval, resolve=True), template_kwargs)
    paths = [Path(str(p)) for p in cfg["items"]]  # cfg.items is DictConfig.items()
    item_sets = [load_item_set(p, max_items=cfg.eval.get("max_items")) for p in paths]
    names = [s.name for s in item_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"items: two files share a stem ({names}); item_set names must be unique")
    adapter = check_adapter(cfg.get("adapter"))
    job, source_job = adapter_job(adapter) if adapter is not None else (None, None)
    if job and job.get("model") not in (None, str(cfg.model.name)):
        log.warning(
            "adapter %s was trained on model=%s but model=%s is loaded", adapter, job["model"], cfg.model.name
        )
    phase = str(cfg.phase) if cfg.get("phase") else infer_phase(adapter)
    out_dir = output_directory(cfg)
    summary_file = phase_dir(out_dir, phase) / "summary.json"
    if summary_file.exists():
        log.info("skip: %s exists; nothing is overwritten", summary_file)
        return read_json(summary_file)

    tokenizer = load_tokenizer(cfg.model)
    for items in item_sets:  # inexpressible options fail before the model loads
        check_options(tokenizer, items, measures, settings)
    model = load_evaluated_model(cfg, tokenizer, adapter)
    rows: dict[str, dict[str, list[dict]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    with evaluation_mode(model):
        for items in item_sets:
            files = {m: rows_path(out_dir, phase, items.name, m) for m in measures}
            missing = [m for m in measures if not files[m].exists()]
            seconds[items.name] = {}
            scored = score_item_set(model, tokenizer, items, missing, settings, phase, seconds[items.name])
            rows[items.name] = {}
            for measure in measures:
                if measure in scored:
                    write_rows(files[measure], scored[measure])
                    rows[items.name][measure] = scored[measure]
                else:
                    rows[items.name][measure] = read_rows(files[measure])
    summary = summarize_phase(rows, phase)
    summary.update(
        seconds=seconds,
        settings={
            "measures": measures,
            "option_form": settings.option_form,
            "items": [str(p) for p in paths],
            "adapter": str(adapter or ""),
        },
    )
    write_json_once(summary_file, summary)
    write_run_card(cfg, out_dir, job, source_job, adapter, phase, item_sets, started)
    log.info(
        "evaluated %s (%s) on %s in %.1f s -> %s",
        cfg.model.name,
        (job or {}).get("arm", "base"),
        names,
        time.time() - started,
        out_dir,
    )
    return summary


def write_run_card(
    cfg: DictConfig,
    out_dir: Path,
    job: dict[str, Any] | None,
    source_job: Path | None,
    adapter: Path | None,
    phase: str,
    item_sets,
    started: float,
) -> None:
    arm = "base" if adapter is None else (job or {}).get("arm") or "unknown"
    if adapter is not None and job is None:
        log.warning("adapter %s: no run.json found beside it or above; job.arm = 'unknown'", adapter)
    card = {
        "job": {
            "model": str(cfg.model.name),
            "arm": arm,
            "seed": (job or {}).get("seed"),
            "experiment": (job or {}).get("experiment"),
            "sweep": (job or {}).get("sweep"),
        },
        "kind": "evaluate",
        "phase": phase,
        "adapter": str(adapter) if adapter else None,
        "source_job": str(source_job) if source_job else None,
        "items": [
            {"item_set": s.name, "path": str(s.path), "sha256": file_sha256(s.path), "n_items": len(s)}
            for s in item_sets
        ],
        "config": public_config(cfg),
        "git_sha": git_sha(Path(CONF_DIR).parent),
        "versions": package_versions(),
        "wall_time_s": round(time.time() - started, 3),
        "status": "done",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "run.json", card)
    (out_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n", encoding="utf-8")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
