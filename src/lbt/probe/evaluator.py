"""The representational shift, measured at every phase (config group `probe`), and where the base model's
direction set comes from (config group `directions`).

At each phase (`base`, `step_<n>`, `final`) the held-out target items' forced-choice prompts (chat-templated,
original option order) run through the model once; their residual stream at every layer — at the answer
position (the last prompt token) and averaged over the prompt tokens — is projected on the base model's
unit direction of that layer (towards FRAME−, pro-change; see `directions.py`). Written to
`<job dir>/probe/<phase>.json` (CONTRACT.md format): per-layer mean projection, the paired shift against
`base` (mean over prompts of phase − base) and its standard error (SD of the paired differences / √n).
The per-prompt base projections are kept in `probe/base_values.pt` to pair later phases with; if they are
missing (a job resumed after `base`), they are recomputed with the adapters switched off, which is the
base model (as is an unreadable file, which is set aside). A phase whose file exists and parses is skipped;
one that does not parse is set aside and measured again (`planned_files` declares the file for the
completeness check behind DONE). Projections are dot products with the unit direction,
in residual-stream units; `direction_norm` (the class-mean difference per layer) rescales them.

Logged (names from lbt.wandb_keys, at the phase's step): scalars at ℓ* (projection and shift, both
positions) to every logger, and with W&B a line plot of the layerwise projection and shift per phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbt import wandb_keys as keys
from lbt.data.chat import ChatFormat
from lbt.eval.evaluators import plain
from lbt.eval.items import load_items, spread_subset
from lbt.eval.session import Evaluator, Session
from lbt.model.modes import evaluation_mode
from lbt.probe.directions import Directions, DirectionSettings, get_directions
from lbt.probe.measure import answer_activations, forced_choice_prompts
from lbt.rundir import Expected, RunDir, atomic_save, file_problem, read_json, set_aside, write_json_once
from lbt.study import FRAMED_ARMS, arm_name

log = logging.getLogger(__name__)

# The positions and quantities of the record are the ones the W&B keys name.
POSITIONS, QUANTITIES = keys.PROBE_POSITIONS, keys.PROBE_QUANTITIES


@dataclass(frozen=True)
class DirectionSource:
    """Where a base model's direction set comes from: the FRAME+ and FRAME− corpora, the variant, the
    extraction's batching and truncation, and the cache folder (the `directions` config section)."""

    corpora: Mapping[str, str]          # {plus: path, minus: path}
    cache_dir: str
    variant: str = "assistant_mean"
    batch_size: int = 8
    max_length: int = 1024

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> DirectionSource:
        """From a `directions` section: its `arms` entries are arm configs (name, corpus); a run card of a
        job trained before issue 16 names them frame_plus/frame_minus, read as today's names."""
        section = plain(section)
        corpora = {str(arm_name(str(arm["name"]))): str(arm["corpus"]) for arm in section["arms"].values()}
        missing = [name for name in FRAMED_ARMS if name not in corpora]
        if missing:
            raise ValueError(f"directions.arms: {missing} missing (the direction needs both framed corpora)")
        return cls(corpora=corpora, cache_dir=str(section["cache_dir"]), variant=str(section["variant"]),
                   batch_size=int(section["batch_size"]), max_length=int(section["max_length"]))

    def check(self) -> None:
        """Fail on a missing corpus before training starts."""
        missing = [f"{arm}: {path}" for arm, path in self.corpora.items() if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"direction corpora not found ({'; '.join(missing)})")

    def load(self, model: torch.nn.Module, chat: ChatFormat, base: Mapping[str, Any]) -> Directions:
        """The direction set of the base model `base` (its model config), from the cache or computed now."""
        settings = DirectionSettings(variant=self.variant, max_length=self.max_length, batch_size=self.batch_size)
        return get_directions(model, chat, base, self.corpora, self.cache_dir, settings)


def probe_file(run: RunDir, name: str) -> Path:
    """A file of the probe/ folder besides the phase files (base_values.pt, train_intervention.json)."""
    return run.probe("base").with_name(name)


class ProbeEvaluator(Evaluator):
    """chat: the model's chat format; base_model: the model config (the direction cache's identity);
    directions: the `directions` section; items: target item file; max_items: items taken (domains in
    turn; None = all); batch_size: prompts per forward."""

    def __init__(self, chat: ChatFormat, base_model: Mapping[str, Any], directions: Mapping[str, Any],
                 items: str, max_items: int | None = None, batch_size: int = 16):
        self.chat = chat
        self.base_model = plain(base_model)
        self.source = DirectionSource.from_config(directions)
        self.source.check()
        self.batch_size = int(batch_size)
        # Read and checked now (errors name file, line, field), before training starts.
        chosen = spread_subset(load_items(str(items)), int(max_items) if max_items else None)
        self.prompts = forced_choice_prompts(chosen, chat, orders=("original",))
        self._directions: Directions | None = None

    def directions(self, model: torch.nn.Module) -> Directions:
        if self._directions is None:
            self._directions = self.source.load(model, self.chat, self.base_model)
        return self._directions

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        """probe/<phase>.json (rank 0 writes it; base_values.pt is a cache, recomputed when missing)."""
        return [Expected(run.probe(phase))]

    def base_files(self, run: RunDir) -> list[Expected]:
        """probe/base.json and the per-prompt base projections later phases pair with."""
        return [*self.planned_files(run, "base"), Expected(probe_file(run, "base_values.pt"))]

    def log_written(self, phase: str, session: Session) -> None:
        log_phase(session, phase, read_json(session.run.probe(phase)))

    def project(self, model: torch.nn.Module, directions: Directions, adapters: bool = True
                ) -> dict[str, torch.Tensor]:
        units = directions.unit()
        with evaluation_mode(model, adapters=adapters):
            return answer_activations(model, self.chat.tokenizer, self.prompts.ids, self.batch_size, units)

    def store_base(self, run: RunDir, values: dict[str, torch.Tensor], directions: Directions) -> dict[str, Any]:
        """Keep the per-prompt base projections (probe/base_values.pt) to pair later phases with."""
        saved = {**values, "direction_key": directions.key, "item_ids": self.prompts.item_ids}
        path = probe_file(run, "base_values.pt")
        if not path.exists():
            atomic_save(path, lambda tmp: torch.save(saved, tmp))
        return saved

    def load_base(self, run: RunDir, model: torch.nn.Module, directions: Directions) -> dict[str, Any]:
        path = probe_file(run, "base_values.pt")
        if path.exists():
            try:
                saved = torch.load(path, weights_only=False)
            except Exception as err:  # noqa: BLE001 -- truncated or foreign: recomputed below
                set_aside(path, f"does not load: {type(err).__name__}: {err}")
                saved = {}
            if saved.get("direction_key") == directions.key and saved.get("item_ids") == self.prompts.item_ids:
                return saved
            if saved:
                log.warning("probe: %s belongs to other directions or items; using recomputed base values", path)
        # Adapters off = the base model: the same numbers the base phase would have stored.
        return self.store_base(run, self.project(model, directions, adapters=False), directions)

    def evaluate(self, model: torch.nn.Module, phase: str, session: Session) -> dict[str, Any] | None:
        if not session.is_zero:
            return None
        run = session.run
        (planned,) = self.planned_files(run, phase)
        problem = file_problem(planned)
        if problem is None:
            log.info("probe: %s exists, phase %s skipped", planned.path, phase)
            return None
        if planned.path.exists():  # corrupt: kept for inspection, measured again
            set_aside(planned.path, problem)
        started = time.perf_counter()
        directions = self.directions(model)
        values = self.project(model, directions)
        base = self.store_base(run, values, directions) if phase == "base" else self.load_base(run, model, directions)
        record = phase_record(phase, values, base, directions)
        record["wall_time_s"] = round(time.perf_counter() - started, 3)
        write_json_once(planned.path, record)
        log_phase(session, phase, record)
        star = record["l_star"]
        log.info("probe %s: ℓ*=%d answer projection %.4f shift %.4f (%.2f s)", phase, star,
                 record["projection"]["answer"][star], record["shift"]["answer"][star], record["wall_time_s"])
        return record


def phase_record(phase: str, values: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                 directions: Directions) -> dict[str, Any]:
    """The contract's probe/<phase>.json from per-prompt projections (N, L) at this phase and at base."""
    projection, shift, shift_se = {}, {}, {}
    for pos in POSITIONS:
        now = values[pos].double().numpy()
        diff = now - base[pos].double().numpy()
        n = diff.shape[0]
        projection[pos] = now.mean(0).tolist()
        shift[pos] = diff.mean(0).tolist()
        shift_se[pos] = (diff.std(0, ddof=1) / np.sqrt(n)).tolist() if n > 1 else [float("nan")] * diff.shape[1]
    n_layers = directions.n_layers
    return {"phase": phase, "layers": list(range(n_layers)), "l_star": directions.l_star(),
            "direction_key": directions.key, "projection": projection, "shift": shift, "shift_se": shift_se,
            "n_prompts": int(values["answer"].shape[0]), "variant": directions.variant,
            "direction_norm": [float(x) for x in directions.norm()],
            "probe_accuracy": directions.accuracy()}


def log_phase(session: Session, phase: str, record: dict[str, Any]) -> None:
    """Scalars at ℓ* to every logger; with W&B, the layerwise line plots (all at the phase's step)."""
    star = record["l_star"]
    session.log_metrics({keys.probe_at_l_star(pos, what): float(record[what][pos][star])
                         for pos in POSITIONS for what in QUANTITIES})
    for logger in session.wandb_loggers():
        log_wandb_lines(logger, phase, record, session.step)


def log_wandb_lines(logger: Any, phase: str, record: dict[str, Any], step: int) -> None:
    import wandb

    rows = [[layer] + [record[key][pos][layer] for key in QUANTITIES for pos in POSITIONS]
            for layer in record["layers"]]
    columns = ["layer"] + [f"{pos}_{key}" for key in QUANTITIES for pos in POSITIONS]
    table = wandb.Table(columns=columns, data=rows)
    plots = {keys.probe_layer_plot(phase, col): wandb.plot.line(table, "layer", col,
                                                                title=f"probe {col} by layer ({phase})")
             for col in columns[1:]}
    logger.experiment.log({**plots, keys.STEP: step})
