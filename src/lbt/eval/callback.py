"""Evaluation callbacks of a training job (config group `eval`), run at every phase (base, step_<n>, final).

`StanceEvalCallback` writes `<job dir>/eval/<phase>/<item_set>/<measure>.jsonl` and
`eval/<phase>/summary.json`, logs the summary's scalars to the trainer's loggers and the rows as W&B
Tables. `CapabilityCallback` writes `eval/<phase>/capability.json` (perplexity, refusal rates, MMLU accuracy,
flags against phase base).

Both declare what they leave (`planned_files`: every rows file with its row count, the summary, the
capability file at the phase kinds it runs at) for the completeness check behind DONE, and both are
append-only: a phase whose planned files all exist and hold their rows is skipped; a file found missing,
corrupt or short is set aside (`lbt.rundir.incomplete_phases`; a phase summary goes with its rows) and
only it is produced again; a measure file that is intact is read back rather than scored again (a job
resumed mid-phase finishes only what is missing).

Under DDP: every rank scores its own shard of the items (item k goes to rank k mod world size, so no item
is scored twice), rank 0 gathers the rows and writes the files, and the stance means come from
`StanceMetric`s (sum/count states) that torchmetrics adds across ranks. The capability checks are small
and run on rank 0 alone; the other ranks wait at a barrier. The model is switched to eval mode (dropout
off) under no_grad and every module's mode is restored afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lbt.eval.battery import (
    BatterySettings,
    ItemSet,
    check_measures,
    check_options,
    evaluation_mode,
    load_item_set,
    score_item_set,
)
from lbt.eval.items import load_refusal, load_texts
from lbt.eval.rows import expected_rows
from lbt.eval.summary import StanceMetric, flat_metrics, summarize_phase
from lbt.phases import PhaseHook
from lbt.rundir import (
    Expected,
    RunDir,
    file_problem,
    incomplete_phases,
    phase_kind,
    read_json,
    read_rows,
    set_aside,
    write_json_once,
    write_rows,
)

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """Hydra hands over DictConfig/ListConfig; the callbacks keep plain Python data."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _broadcast(trainer: L.Trainer, value: Any) -> Any:
    """Rank 0's value on every rank (so that all ranks skip or score the same things)."""
    return trainer.strategy.broadcast(value, src=0) if trainer.world_size > 1 else value


def _gather_rows(trainer: L.Trainer, rows: list[dict]) -> list[dict]:
    """All ranks' rows on rank 0 (an empty list elsewhere)."""
    if (
        trainer.world_size == 1
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        return rows
    gathered: list[list[dict] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in (part or [])] if trainer.is_global_zero else []


def _in_item_order(rows: list[dict], items: ItemSet) -> list[dict]:
    """Rows of interleaved shards back in file order (item, then template, then order)."""
    position = {item["id"]: k for k, item in enumerate(items)}
    return sorted(
        rows, key=lambda r: (position[r["item_id"]], r.get("template", 0), r["order"] != "original")
    )


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float]) -> None:
    if trainer.is_global_zero and metrics:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=trainer.global_step)


def log_row_tables(trainer: L.Trainer, phase: str, rows: Mapping[str, Mapping[str, list[dict]]]) -> None:
    """Rows as W&B Tables (key eval_rows/<phase>/<item_set>/<measure>) when a WandbLogger is attached."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []
    for logger in loggers:
        for item_set, by_measure in rows.items():
            for measure, measure_rows in by_measure.items():
                if not measure_rows:
                    continue
                columns = list(dict.fromkeys(k for row in measure_rows for k in row))
                data = [[row.get(c) for c in columns] for row in measure_rows]
                try:  # the rows are on disk already: a W&B hiccup must not stop training
                    logger.log_table(
                        key=f"eval_rows/{phase}/{item_set}/{measure}", columns=columns, data=data
                    )
                except Exception as err:  # noqa: BLE001
                    log.warning("W&B table eval_rows/%s/%s/%s not logged: %s", phase, item_set, measure, err)


PHASE_KINDS = ("base", "step", "final")  # what lbt.rundir.phase_kind returns


class StanceEvalCallback(PhaseHook):
    """The stance battery on the configured item sets at every phase."""

    def __init__(
        self,
        item_sets: Mapping[str, str],
        measures: Sequence[str],
        battery: Mapping[str, Any] | None = None,
        max_items: int | None = None,
        log_tables: bool = True,
        measure_phases: Mapping[str, Sequence[str]] | None = None,
    ):
        self.measures = check_measures(plain(measures))
        # measure -> the phase kinds (base, step, final) it runs at; measures not listed run at every phase.
        self.measure_phases = {m: [str(k) for k in kinds] for m, kinds in (plain(measure_phases) or {}).items()}
        for kinds in self.measure_phases.values():
            if set(kinds) - set(PHASE_KINDS):
                raise ValueError(f"eval.measure_phases: phase kinds must be among {PHASE_KINDS}, got {kinds}")
        self.battery_cfg = plain(battery) or {}
        BatterySettings.from_config(self.battery_cfg)  # unusable settings fail at instantiation
        # Item files are read and checked now, before training starts (errors name file, line, field).
        self.item_sets = {
            name: load_item_set(path, name, max_items) for name, path in plain(item_sets).items()
        }
        self.log_tables = log_tables
        self.settings: BatterySettings | None = None

    def setup_context(self, context) -> None:
        super().setup_context(context)
        template_kwargs = (
            plain(context.cfg.model.get("chat_template_kwargs")) if context.cfg is not None else {}
        )
        self.settings = BatterySettings.from_config(self.battery_cfg, template_kwargs)
        for items in self.item_sets.values():  # inexpressible options fail now, not at the first phase
            check_options(context.tokenizer, items, self.measures, self.settings)

    @property
    def run(self) -> RunDir:
        if self.context is None:
            raise RuntimeError("StanceEvalCallback: setup_context was not called (add CheckpointPhases)")
        return RunDir(self.context.job_dir)

    def planned_files(self, phase: str) -> list[Expected]:
        """Every rows file of the phase (all items: rank 0 writes the gathered shards) and the summary."""
        run = self.run
        return [
            Expected(run.rows(phase, name, measure), expected_rows(items, measure))
            for name, items in self.item_sets.items()
            for measure in self.measures_at(phase)
        ] + [Expected(run.summary(phase))]

    def run_phase(self, trainer: L.Trainer, module: L.LightningModule, phase: str) -> None:
        if self.context is None or self.settings is None:
            raise RuntimeError("StanceEvalCallback: setup_context was not called (add CheckpointPhases)")
        run = self.run
        # Rank 0 checks the phase's files; a bad one is set aside (with the summary built from it).
        incomplete = incomplete_phases({phase: self.planned_files(phase)}) if trainer.is_global_zero else None
        if not _broadcast(trainer, incomplete):
            log.info("eval %s: every planned file is there, skipped", phase)
            return
        started = time.perf_counter()
        measures = self.measures_at(phase)
        rows, metrics, seconds = self._score(trainer, module.model, phase, measures)
        summary = summarize_phase(rows, phase, metrics)  # compute() adds the ranks' metric states
        summary.update(
            seconds=seconds,
            wall_s=round(time.perf_counter() - started, 3),
            settings={
                "measures": measures,
                "option_form": self.settings.option_form,
                "item_sets": {n: str(s.path) for n, s in self.item_sets.items()},
                "n_items": {n: len(s) for n, s in self.item_sets.items()},
            },
        )
        if trainer.is_global_zero:
            write_json_once(run.summary(phase), summary)
            log_scalars(trainer, {**flat_metrics(summary), "eval/seconds": summary["wall_s"]})
            if self.log_tables:
                log_row_tables(trainer, phase, rows)
            log.info("eval %s: %s in %.1f s", phase, _brief(summary), summary["wall_s"])
        trainer.strategy.barrier()

    def measures_at(self, phase: str) -> list[str]:
        kind = phase_kind(phase)
        return [m for m in self.measures if kind in self.measure_phases.get(m, PHASE_KINDS)]

    def _score(self, trainer: L.Trainer, model: torch.nn.Module, phase: str, measures: list[str]):
        rank, world = trainer.global_rank, trainer.world_size
        device = next(model.parameters()).device
        rows: dict[str, dict[str, list[dict]]] = {}
        metrics: dict[str, dict[str, StanceMetric]] = {}
        seconds: dict[str, dict[str, float]] = {}
        with evaluation_mode(model):
            for name, items in self.item_sets.items():
                paths = {m: self.run.rows(phase, name, m) for m in measures}
                missing = _broadcast(trainer, [m for m in measures if not paths[m].exists()])
                seconds[name] = {}
                local = (
                    score_item_set(
                        model,
                        self.context.tokenizer,
                        items.shard(rank, world),
                        missing,
                        self.settings,
                        phase,
                        seconds[name],
                    )
                    if missing
                    else {}
                )
                domains = sorted({item["domain"] for item in items})
                rows[name], metrics[name] = {}, {}
                for measure in measures:
                    metric = StanceMetric(domains).to(device)
                    if measure in missing:
                        metric.update_rows(local[measure])
                        rows[name][measure] = _in_item_order(_gather_rows(trainer, local[measure]), items)
                        if trainer.is_global_zero:
                            write_rows(paths[measure], rows[name][measure])
                    else:  # written before a resume: read back on rank 0, which alone adds it to the metric
                        rows[name][measure] = read_rows(paths[measure]) if trainer.is_global_zero else []
                        metric.update_rows(rows[name][measure])
                    metrics[name][measure] = metric
        return rows, metrics, seconds


def _brief(summary: Mapping[str, Any]) -> str:
    parts = []
    for name, item_set in summary["item_sets"].items():
        for measure, stats in item_set["measures"].items():
            if stats["mean_stance"] is not None:
                parts.append(f"{name}/{measure}={stats['mean_stance']:+.3f}")
    return ", ".join(parts) or "no scored rows"


class CapabilityCallback(PhaseHook):
    """Perplexity, refusal rates and (when a file is given) MMLU accuracy at every phase."""

    def __init__(
        self,
        heldout_path: str | None,
        refusal_path: str | None,
        mmlu_path: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        refusal_max_new_tokens: int = 48,
        generation_batch_size: int | None = None,
        max_texts: int | None = None,
        max_refusal: int | None = None,
        mmlu_max_items: int | None = None,
        option_form: str = "bare",
        perplexity_rise: float = 0.05,
        mmlu_drop: float = 0.02,
        phases: Sequence[str] = PHASE_KINDS,
    ):
        from lbt.eval.capability import load_mmlu

        self.phases = [str(k) for k in phases]
        if set(self.phases) - set(PHASE_KINDS) or "base" not in self.phases:
            raise ValueError(f"eval.capability.phases must be among {PHASE_KINDS} and include base (the "
                             f"guardrails compare with it), got {self.phases}")

        # Files are read and checked at instantiation, before training starts.
        self.texts = load_texts(heldout_path)[:max_texts] if heldout_path else []
        self.refusal = _spread_refusal(load_refusal(refusal_path), max_refusal) if refusal_path else []
        self.mmlu = load_mmlu(mmlu_path)[:mmlu_max_items] if mmlu_path else []
        self.paths = {"heldout": heldout_path, "refusal": refusal_path, "mmlu": mmlu_path}
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        # Perplexity holds (batch, length, vocabulary) logits: small batches. Refusal generation and MMLU read
        # one position per prompt (host-bound decoding steps): as many prompts at once as the stance battery.
        self.generation_batch_size = int(generation_batch_size or batch_size)
        self.refusal_max_new_tokens = int(refusal_max_new_tokens)
        self.option_form = option_form
        self.thresholds = {"perplexity_rise": float(perplexity_rise), "mmlu_drop": float(mmlu_drop)}

    def planned_files(self, phase: str) -> list[Expected]:
        if self.context is None:
            raise RuntimeError("CapabilityCallback: setup_context was not called (add CheckpointPhases)")
        if phase_kind(phase) not in self.phases:
            return []
        return [Expected(RunDir(self.context.job_dir).capability(phase))]

    def run_phase(self, trainer: L.Trainer, module: L.LightningModule, phase: str) -> None:
        planned = self.planned_files(phase)
        if not planned:
            return
        out = planned[0].path
        problem = file_problem(planned[0]) if trainer.is_global_zero else None
        if problem and out.exists():  # corrupt: kept for inspection, measured again
            set_aside(out, problem)
        if trainer.is_global_zero and problem:
            started = time.perf_counter()
            with evaluation_mode(module.model):
                record = self.measure(module.model, phase)
            record["wall_s"] = round(time.perf_counter() - started, 3)
            write_json_once(out, record)
            scalars = {
                "cap/perplexity": record["perplexity"],
                "cap/mmlu_accuracy": record["mmlu_accuracy"],
                "cap/comply_correct_rate": record["refusal"]["comply_correct_rate"],
                "cap/refuse_correct_rate": record["refusal"]["refuse_correct_rate"],
            }
            log_scalars(trainer, {k: float(v) for k, v in scalars.items() if v is not None})
            log.info(
                "capability %s: perplexity %s, refusal %s, flags %s",
                phase,
                record["perplexity"],
                record["refusal"],
                record["flags"],
            )
        trainer.strategy.barrier()

    def measure(self, model: torch.nn.Module, phase: str) -> dict[str, Any]:
        from lbt.eval.capability import capability_flags, mmlu_accuracy, perplexity, refusal_rates

        tokenizer = self.context.tokenizer
        template_kwargs = (
            plain(self.context.cfg.model.get("chat_template_kwargs")) if self.context.cfg else {}
        )
        record: dict[str, Any] = {
            "phase": phase,
            "perplexity": None,
            "n_tokens": 0,
            "refusal": {
                "comply_correct_rate": None,
                "refuse_correct_rate": None,
                "n_comply": 0,
                "n_refuse": 0,
            },
            "mmlu_accuracy": None,
            "n_mmlu": len(self.mmlu),
            "paths": self.paths,
        }
        if self.texts:
            record["perplexity"], record["n_tokens"] = perplexity(
                model, tokenizer, [t["text"] for t in self.texts], self.batch_size, self.max_length
            )
        if self.refusal:
            record["refusal"], record["refusal_rows"] = refusal_rates(
                model, tokenizer, self.refusal, self.refusal_max_new_tokens, self.generation_batch_size,
                template_kwargs,
            )
        if self.mmlu:
            record["mmlu_accuracy"] = mmlu_accuracy(
                model, tokenizer, self.mmlu, self.option_form, self.generation_batch_size, template_kwargs
            )
        base_file = RunDir(self.context.job_dir).capability("base")
        base = None
        if phase != "base" and base_file.exists():
            base = read_json(base_file)  # a corrupt base file is an error naming it (re-run sets it aside)
        record["flags"] = capability_flags(record, base, **self.thresholds)
        record["base"] = {k: base.get(k) for k in ("perplexity", "mmlu_accuracy")} if base else None
        return record


def _spread_refusal(battery: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` prompts, taking comply and refuse prompts in turn (both kinds in small runs)."""
    if limit is None or limit >= len(battery):
        return battery
    comply = [p for p in battery if p["expect"] == "comply"]
    refuse = [p for p in battery if p["expect"] == "refuse"]
    chosen = [p for pair in zip(comply, refuse) for p in pair]
    chosen += comply[len(refuse) :] + refuse[len(comply) :]
    return chosen[:limit]
