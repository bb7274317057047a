"""The evaluators of the `eval` config group: the stance battery and the capability guardrails.

`StanceEvaluator` writes `<job dir>/eval/<phase>/<item_set>/<measure>.jsonl` and `eval/<phase>/summary.json`,
logs the summary's scalars with their shift from base (`shift_vs_base/*`, from the base phase's summary) and,
with W&B, one rows table per measure holding every phase written so far (read back from the job directory,
so a resumed job's table keeps the phases of its earlier attempts). `CapabilityEvaluator` writes
`eval/<phase>/capability.json` (perplexity, refusal rates, MMLU accuracy, flags against phase base).
Each is built from its config entry's own keys and the model's `ChatFormat`; item files are read and
checked at construction, so bad input fails before any model loads.

Both declare what they leave (`planned_files`) for the completeness check behind DONE, and both are
append-only: a phase whose planned files all exist and hold their rows is skipped; a file found missing,
corrupt or short is set aside (`lbt.rundir.incomplete_phases`; a phase summary goes with its rows) and
only it is produced again; a measure file that is intact is read back rather than scored again.

Across ranks (a multi-GPU job): every rank scores its own shard of the items (item k goes to rank k mod
world size, so no item is scored twice), rank 0 gathers the rows and writes the files, and the stance
means come from `StanceMetric`s (sum/count states) that torchmetrics adds across ranks. The capability
checks are small and run on rank 0 alone; the other ranks wait at the barrier. The model is scored in
evaluation mode (dropout off) under no_grad, and every module's mode is restored afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lbt import wandb_keys as keys
from lbt.data.chat import ChatFormat
from lbt.eval.battery import check_measures, score_item_sets
from lbt.eval.items import ItemSet, load_item_set, load_refusal, load_texts
from lbt.eval.measures import check_options
from lbt.eval.rows import expected_rows
from lbt.eval.session import Evaluator, Session
from lbt.eval.settings import BatterySettings
from lbt.eval.summary import StanceMetric, flat_metrics, summarize_phase
from lbt.model.modes import evaluation_mode
from lbt.rundir import (
    CorruptFile,
    Expected,
    RunDir,
    file_problem,
    incomplete_phases,
    read_json,
    read_rows,
    set_aside,
    write_json_once,
    write_rows,
)
from lbt.study import PHASE_KINDS, is_phase, phase_key, phase_kind

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """Hydra hands over DictConfig/ListConfig; the evaluators keep plain Python data."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_phase_kinds(key: str, kinds: Sequence[str]) -> list[str]:
    kinds = [str(k) for k in kinds]
    if set(kinds) - set(PHASE_KINDS):
        raise ValueError(f"{key}: phase kinds must be among {PHASE_KINDS}, got {kinds}")
    return kinds


class StanceEvaluator(Evaluator):
    """The stance battery on the configured item sets at every phase (a measure at the phase kinds that
    `measure_phases` gives it; every phase when it is not listed)."""

    def __init__(
        self,
        chat: ChatFormat,
        item_sets: Mapping[str, str],
        measures: Sequence[str],
        measure_phases: Mapping[str, Sequence[str]] | None = None,
        max_items: int | None = None,
        option_form: str = "bare",
        batch_size: int = 128,
        forced_choice: Mapping[str, Any] | None = None,
        likert: Mapping[str, Any] | None = None,
        open_ended: Mapping[str, Any] | None = None,
        log_tables: bool = True,
    ):
        self.chat = chat
        self.measures = check_measures(plain(measures))
        self.measure_phases = {m: check_phase_kinds(f"eval.stance.measure_phases.{m}", kinds)
                               for m, kinds in (plain(measure_phases) or {}).items()}
        battery = {"option_form": option_form, "batch_size": batch_size, "forced_choice": plain(forced_choice),
                   "likert": plain(likert), "open_ended": plain(open_ended)}
        self.settings = BatterySettings.from_config(battery)
        # Item files are read and checked now (errors name file, line, field), and so are options the
        # tokenizer cannot express: before any model loads.
        self.item_sets = {name: load_item_set(path, name, max_items) for name, path in plain(item_sets).items()}
        for items in self.item_sets.values():
            check_options(chat, items, self.measures, self.settings)
        self.log_tables = bool(log_tables)

    def measures_at(self, phase: str) -> list[str]:
        kind = phase_kind(phase)
        return [m for m in self.measures if kind in self.measure_phases.get(m, PHASE_KINDS)]

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        """Every rows file of the phase (all items: rank 0 writes the gathered shards) and the summary."""
        return [
            Expected(run.rows(phase, name, measure), expected_rows(items, measure))
            for name, items in self.item_sets.items()
            for measure in self.measures_at(phase)
        ] + [Expected(run.summary(phase))]

    def missing(self, run: RunDir, phase: str) -> dict[str, list[str]]:
        """{item_set: measures whose rows file is not there}: what scoring this phase needs the model for."""
        return {name: [m for m in self.measures_at(phase) if not run.rows(phase, name, m).exists()]
                for name in self.item_sets}

    def evaluate(self, model: torch.nn.Module | None, phase: str, session: Session) -> dict[str, Any] | None:
        """Score what is missing and write the summary; None when every planned file was intact. `model`
        may be None when nothing is left to score (lbt.evaluate loads it only when needed)."""
        run = session.run
        # Rank 0 checks the phase's files; a bad one is set aside (with the summary built from it).
        incomplete = incomplete_phases({phase: self.planned_files(run, phase)}) if session.is_zero else None
        if not session.broadcast(incomplete):
            log.info("eval %s: every planned file is there, skipped", phase)
            return None
        started = time.perf_counter()
        measures = self.measures_at(phase)
        rows, metrics, seconds = self._score(model, phase, measures, session)
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
        if session.is_zero:
            write_json_once(run.summary(phase), summary)
            self.log_summary(phase, summary, session)
            log.info("eval %s: %s in %.1f s", phase, _brief(summary), summary["wall_s"])
        session.barrier()
        return summary

    def log_summary(self, phase: str, summary: Mapping[str, Any], session: Session) -> None:
        """The phase's scalars with their shift from base and, with W&B, the rows tables (rank 0)."""
        session.log_metrics({**flat_metrics(summary), keys.EVAL_SECONDS: summary["wall_s"],
                             **base_shifts(session.run, phase, summary)})
        if self.log_tables:
            log_row_tables(session, list(self.item_sets), self.measures_at(phase))

    def log_written(self, phase: str, session: Session) -> None:
        self.log_summary(phase, read_json(session.run.summary(phase)), session)

    def _score(self, model: torch.nn.Module | None, phase: str, measures: list[str], session: Session):
        run = session.run
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        rows: dict[str, dict[str, list[dict]]] = {}
        metrics: dict[str, dict[str, StanceMetric]] = {}
        seconds: dict[str, float] = {}  # per engine call, pooled over the item sets (lbt.eval.battery)
        with evaluation_mode(model) if model is not None else nullcontext():
            missing_in = {name: session.broadcast([m for m in measures if not run.rows(phase, name, m).exists()])
                          for name in self.item_sets}
            asked = {name: (items.shard(session.rank, session.world), missing_in[name])
                     for name, items in self.item_sets.items() if missing_in[name]}
            scored = score_item_sets(model, self.chat, asked, self.settings, phase, seconds) if asked else {}
            for name, items in self.item_sets.items():
                paths = {m: run.rows(phase, name, m) for m in measures}
                missing, local = missing_in[name], scored.get(name, {})
                domains = sorted({item["domain"] for item in items})
                rows[name], metrics[name] = {}, {}
                for measure in measures:
                    metric = StanceMetric(domains).to(device)
                    if measure in missing:
                        metric.update_rows(local[measure])
                        rows[name][measure] = _in_item_order(session.gather(local[measure]), items)
                        if session.is_zero:
                            write_rows(paths[measure], rows[name][measure])
                    else:  # written before a resume: read back on rank 0, which alone adds it to the metric
                        rows[name][measure] = read_rows(paths[measure]) if session.is_zero else []
                        metric.update_rows(rows[name][measure])
                    metrics[name][measure] = metric
        return rows, metrics, seconds


def _in_item_order(rows: list[dict], items: ItemSet) -> list[dict]:
    """Rows of interleaved shards back in file order (item, then template, then order)."""
    position = {item["id"]: k for k, item in enumerate(items)}
    return sorted(
        rows, key=lambda r: (position[r["item_id"]], r.get("template", 0), r["order"] != "original")
    )


def base_shifts(run: RunDir, phase: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """shift_vs_base scalars of a phase: its mean stances minus the base phase's (all 0 at base itself);
    none without a readable base summary (a standalone evaluation of one phase; a corrupt one is made again
    by the resumed job's repair)."""
    if phase == "base":
        base = summary
    elif not run.summary("base").exists():
        return {}
    else:
        try:
            base = read_json(run.summary("base"))
        except CorruptFile as err:
            log.warning("eval %s: no shift from base logged (%s)", phase, err)
            return {}
    return keys.stance_shifts(flat_metrics(summary), flat_metrics(base))


def written_phases(run: RunDir) -> list[str]:
    """The phases with an eval folder in the job directory, in training order."""
    folder = run.phase_dir("base").parent
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and is_phase(p.name)), key=phase_key)


def phase_rows_table(run: RunDir, item_sets: Sequence[str], measure: str) -> tuple[list[str], list[list]]:
    """(columns, data) of a measure's rows at every written phase and item set, `phase` and `item_set`
    first. A rows file that does not parse is left out (it is set aside and scored again on resume)."""
    rows: list[dict] = []
    for phase in written_phases(run):
        for item_set in item_sets:
            path = run.rows(phase, item_set, measure)
            if path.exists():
                try:
                    rows += read_rows(path)
                except CorruptFile as err:
                    log.warning("W&B table %s: %s left out", keys.rows_table(measure), err)
    columns = list(dict.fromkeys([*keys.ROWS_TABLE_COLUMNS, *(k for row in rows for k in row)]))
    return columns, [[row.get(c) for c in columns] for row in rows]


def log_row_tables(session: Session, item_sets: Sequence[str], measures: Sequence[str]) -> None:
    """One W&B table per measure (key eval_rows/<measure>), every phase's rows in it, when a WandbLogger is
    attached; logged again at each phase, so its latest version holds the whole run so far."""
    loggers = session.wandb_loggers()
    for measure in measures if loggers else ():
        key = keys.rows_table(measure)
        try:  # the rows are on disk already: a W&B hiccup must not stop training
            columns, data = phase_rows_table(session.run, item_sets, measure)
            if data:
                allow_rows(len(data))
                for logger in loggers:
                    logger.log_table(key=key, columns=columns, data=data, step=session.step)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B table %s not logged: %s", key, err)


def allow_rows(n_rows: int) -> None:
    """W&B cuts a logged table at wandb.Table.MAX_ROWS (10,000) rows: the study's logprob table (8 rows per
    item, six phases) passes it. Raised as far as the artifact limit W&B stores tables under."""
    import wandb

    if n_rows > wandb.Table.MAX_ROWS:
        wandb.Table.MAX_ROWS = min(n_rows, wandb.Table.MAX_ARTIFACT_ROWS)


def _brief(summary: Mapping[str, Any]) -> str:
    parts = []
    for name, item_set in summary["item_sets"].items():
        for measure, stats in item_set["measures"].items():
            if stats["mean_stance"] is not None:
                parts.append(f"{name}/{measure}={stats['mean_stance']:+.3f}")
    return ", ".join(parts) or "no scored rows"


class CapabilityEvaluator(Evaluator):
    """Perplexity, refusal rates and (when a file is given) MMLU accuracy, at the phase kinds `phases`
    (base among them: the flags compare with it)."""

    def __init__(
        self,
        chat: ChatFormat,
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

        self.chat = chat
        self.phases = check_phase_kinds("eval.capability.phases", plain(phases))
        if "base" not in self.phases:
            raise ValueError(f"eval.capability.phases must include base (the guardrails compare with it), "
                             f"got {self.phases}")
        # Files are read and checked at construction, before training starts.
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

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        return [Expected(run.capability(phase))] if phase_kind(phase) in self.phases else []

    def evaluate(self, model: torch.nn.Module, phase: str, session: Session) -> dict[str, Any] | None:
        planned = self.planned_files(session.run, phase)
        record = None
        problem = file_problem(planned[0]) if planned and session.is_zero else None
        if problem:
            out = planned[0].path
            if out.exists():  # corrupt: kept for inspection, measured again
                set_aside(out, problem)
            started = time.perf_counter()
            with evaluation_mode(model):
                record = self.measure(model, phase, session.run)
            record["wall_s"] = round(time.perf_counter() - started, 3)
            write_json_once(out, record)
            log_capability(record, session)
            log.info("capability %s: perplexity %s, refusal %s, flags %s", phase, record["perplexity"],
                     record["refusal"], record["flags"])
        if planned:
            session.barrier()
        return record

    def log_written(self, phase: str, session: Session) -> None:
        if self.planned_files(session.run, phase):
            log_capability(read_json(session.run.capability(phase)), session)

    def measure(self, model: torch.nn.Module, phase: str, run: RunDir) -> dict[str, Any]:
        from lbt.eval.capability import capability_flags, mmlu_accuracy, perplexity, refusal_rates

        record: dict[str, Any] = {
            "phase": phase,
            "perplexity": None,
            "n_tokens": 0,
            "refusal": {"comply_correct_rate": None, "refuse_correct_rate": None, "n_comply": 0, "n_refuse": 0},
            "mmlu_accuracy": None,
            "n_mmlu": len(self.mmlu),
            "paths": self.paths,
        }
        if self.texts:
            record["perplexity"], record["n_tokens"] = perplexity(
                model, self.chat.tokenizer, [t["text"] for t in self.texts], self.batch_size, self.max_length
            )
        if self.refusal:
            record["refusal"], record["refusal_rows"] = refusal_rates(
                model, self.chat, self.refusal, self.refusal_max_new_tokens, self.generation_batch_size
            )
        if self.mmlu:
            record["mmlu_accuracy"] = mmlu_accuracy(
                model, self.chat, self.mmlu, self.option_form, self.generation_batch_size
            )
        base_file = run.capability("base")
        base = None
        if phase != "base" and base_file.exists():
            base = read_json(base_file)  # a corrupt base file is an error naming it (re-run sets it aside)
        record["flags"] = capability_flags(record, base, **self.thresholds)
        record["base"] = {k: base.get(k) for k in ("perplexity", "mmlu_accuracy")} if base else None
        return record


def log_capability(record: Mapping[str, Any], session: Session) -> None:
    """A capability record's scalars (those measured) to every logger."""
    scalars = {
        keys.PERPLEXITY: record["perplexity"],
        keys.MMLU_ACCURACY: record["mmlu_accuracy"],
        keys.COMPLY_CORRECT_RATE: record["refusal"]["comply_correct_rate"],
        keys.REFUSE_CORRECT_RATE: record["refusal"]["refuse_correct_rate"],
    }
    session.log_metrics({k: float(v) for k, v in scalars.items() if v is not None})


def _spread_refusal(battery: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` prompts, taking comply and refuse prompts in turn (both kinds in small runs)."""
    if limit is None or limit >= len(battery):
        return battery
    comply = [p for p in battery if p["expect"] == "comply"]
    refuse = [p for p in battery if p["expect"] == "refuse"]
    chosen = [p for pair in zip(comply, refuse) for p in pair]
    chosen += comply[len(refuse) :] + refuse[len(comply) :]
    return chosen[:limit]
