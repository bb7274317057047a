"""ProbeCallback (config group `probe`): the representational shift, measured live at every phase.

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

Logged: scalars at ℓ* (projection and shift, both positions) to every logger, and with W&B a line plot of
the layerwise projection and shift per phase.

Optional preventative variant (`probe.train_intervention`): `ablate` removes the ℓ* direction from every
write to the residual stream (embeddings, attention and MLP outputs of all layers: directional ablation,
`hooks.ablate_writes`) in every training forward; `ablate_random` does the same with a random isotropic
unit direction (seeded by `probe.intervention_seed`) as the control. The hook is active only from the
start of a training batch to its optimizer step, so evaluation phases, validation loss and the saved
adapter are measured on the model without it. If transfer shrinks with `ablate` but not with
`ablate_random`, the direction carries it. What was ablated is recorded in `probe/train_intervention.json`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from lbt.eval.battery import spread_subset
from lbt.eval.items import load_items
from lbt.phases import PhaseHook
from lbt.probe import hooks
from lbt.probe.directions import Directions, DirectionSettings, base_model, get_directions
from lbt.probe.measure import answer_activations, forced_choice_prompts
from lbt.rundir import Expected, RunDir, file_problem, set_aside, write_json_atomic, write_json_once

log = logging.getLogger(__name__)

POSITIONS = ("answer", "prompt_mean")
INTERVENTIONS = (None, "none", "ablate", "ablate_random")


def probe_file(run: RunDir, name: str) -> Path:
    """A file of the probe/ folder besides the phase files (base_values.pt, train_intervention.json)."""
    return run.probe("base").with_name(name)


class ProbeCallback(PhaseHook):
    """items: target item file; corpora: {frame_plus, frame_minus} paths for the directions; cache_dir:
    where direction sets are cached; variant: which direction (assistant_mean | assistant_last |
    user_mean); max_items: items taken (domains in turn; None = all); batch_size: prompts per forward;
    direction_batch_size / direction_max_length: the direction extraction's batching and truncation;
    train_intervention / intervention_seed: the preventative variant (module docstring)."""

    def __init__(self, items: str, corpora: Mapping[str, str], cache_dir: str, variant: str = "assistant_mean",
                 max_items: int | None = None, batch_size: int = 16, direction_batch_size: int = 8,
                 direction_max_length: int = 1024, train_intervention: str | None = None,
                 intervention_seed: int = 0):
        if train_intervention not in INTERVENTIONS:
            raise ValueError(f"probe.train_intervention={train_intervention!r}: use null, ablate or ablate_random")
        self.items_path = str(items)
        self.corpora = {k: str(v) for k, v in dict(corpora).items()}
        self.cache_dir = str(cache_dir)
        self.variant = variant
        self.max_items = int(max_items) if max_items else None
        self.batch_size = int(batch_size)
        self.direction_batch_size = int(direction_batch_size)
        self.direction_max_length = int(direction_max_length)
        self.train_intervention = None if train_intervention in (None, "none") else train_intervention
        self.intervention_seed = int(intervention_seed)
        self._directions: Directions | None = None
        self._prompts = None
        self._active = False
        self._intervention: ExitStack | None = None
        self.intervention_calls = 0

    # -- inputs ------------------------------------------------------------------------------------------
    @property
    def job_dir(self) -> Path:
        if self.context is None:
            raise RuntimeError("ProbeCallback used without a PhaseContext (needs CheckpointPhases)")
        return Path(self.context.job_dir)

    @property
    def base_values_path(self) -> Path:
        return probe_file(RunDir(self.job_dir), "base_values.pt")

    def planned_files(self, phase: str) -> list[Expected]:
        """probe/<phase>.json (rank 0 writes it; base_values.pt is a cache, recomputed when missing)."""
        return [Expected(RunDir(self.job_dir).probe(phase))]

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = self.context.cfg.model.get("chat_template_kwargs") if self.context else None
        return OmegaConf.to_container(kwargs, resolve=True) if kwargs is not None else {}

    def directions(self, model: torch.nn.Module) -> Directions:
        if self._directions is None:
            settings = DirectionSettings(variant=self.variant, max_length=self.direction_max_length,
                                         batch_size=self.direction_batch_size, template_kwargs=self.template_kwargs())
            self._directions = get_directions(model, self.context.tokenizer, self.context.cfg.model, self.corpora,
                                              self.cache_dir, settings)
        return self._directions

    def prompts(self):
        if self._prompts is None:
            items = spread_subset(load_items(self.items_path), self.max_items)  # domains in turn, as the battery
            self._prompts = forced_choice_prompts(items, self.context.tokenizer, self.template_kwargs(),
                                                  orders=("original",))
        return self._prompts

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail on a bad item file or a missing corpus before training starts.
        missing = [f"{arm}: {path}" for arm, path in self.corpora.items() if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"probe corpora not found ({'; '.join(missing)})")
        if self.context is not None:
            self.prompts()

    # -- the phase ---------------------------------------------------------------------------------------
    def project(self, model: torch.nn.Module, directions: Directions, adapters: bool = True
                ) -> dict[str, torch.Tensor]:
        prompts = self.prompts()
        units = directions.unit()
        if not adapters:
            with base_model(model):
                return answer_activations(model, self.context.tokenizer, prompts.ids, self.batch_size, units)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return answer_activations(model, self.context.tokenizer, prompts.ids, self.batch_size, units)
        finally:
            model.train(was_training)

    def store_base(self, values: dict[str, torch.Tensor], directions: Directions) -> dict[str, Any]:
        """Keep the per-prompt base projections (probe/base_values.pt) to pair later phases with."""
        saved = {**values, "direction_key": directions.key, "item_ids": self.prompts().item_ids}
        path = self.base_values_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(saved, tmp)
            os.replace(tmp, path)
        return saved

    def load_base(self, model: torch.nn.Module, directions: Directions) -> dict[str, Any]:
        path = self.base_values_path
        if path.exists():
            try:
                saved = torch.load(path, weights_only=False)
            except Exception as err:  # noqa: BLE001 -- truncated or foreign: recomputed below
                set_aside(path, f"does not load: {type(err).__name__}: {err}")
                saved = {}
            if saved.get("direction_key") == directions.key and saved.get("item_ids") == self.prompts().item_ids:
                return saved
            if saved:
                log.warning("probe: %s belongs to other directions or items; using recomputed base values", path)
        # Adapters off = the base model: the same numbers the base phase would have stored.
        return self.store_base(self.project(model, directions, adapters=False), directions)

    def run_phase(self, trainer: L.Trainer, module: L.LightningModule, phase: str) -> None:
        if not trainer.is_global_zero:
            return
        (planned,) = self.planned_files(phase)
        out = planned.path
        problem = file_problem(planned)
        if problem is None:
            log.info("probe: %s exists, phase %s skipped", out, phase)
            return
        if out.exists():  # corrupt: kept for inspection, measured again
            set_aside(out, problem)
        started = time.perf_counter()
        model = module.model
        directions = self.directions(model)
        values = self.project(model, directions)
        base = self.store_base(values, directions) if phase == "base" else self.load_base(model, directions)
        record = phase_record(phase, values, base, directions)
        record["wall_time_s"] = round(time.perf_counter() - started, 3)
        write_json_once(out, record)
        self.log_phase(trainer, phase, record)
        star = record["l_star"]
        log.info("probe %s: ℓ*=%d answer projection %.4f shift %.4f (%.2f s)", phase, star,
                 record["projection"]["answer"][star], record["shift"]["answer"][star], record["wall_time_s"])

    # -- the preventative training-time intervention -------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_intervention and self._intervention is None:
            self._intervention = install_train_intervention(self, trainer, pl_module.model)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._active = self._intervention is not None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._active = False  # the step's forwards are done: phases after it see the model without the hook

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        if self._intervention is not None:
            self._intervention.close()
            self._intervention = None

    def intervention_enabled(self) -> bool:
        if self._active:
            self.intervention_calls += 1
        return self._active

    def log_phase(self, trainer: L.Trainer, phase: str, record: dict[str, Any]) -> None:
        star = record["l_star"]
        metrics = {f"probe/{pos}_{what}_lstar": float(record[key][pos][star])
                   for pos in POSITIONS for what, key in (("projection", "projection"), ("shift", "shift"))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                log_wandb_lines(logger, phase, record)


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


def log_wandb_lines(logger: Any, phase: str, record: dict[str, Any]) -> None:
    import wandb

    rows = [[layer] + [record[key][pos][layer] for key in ("projection", "shift") for pos in POSITIONS]
            for layer in record["layers"]]
    columns = ["layer"] + [f"{pos}_{key}" for key in ("projection", "shift") for pos in POSITIONS]
    table = wandb.Table(columns=columns, data=rows)
    plots = {f"probe/{phase}/{col}": wandb.plot.line(table, "layer", col, title=f"probe {col} by layer ({phase})")
             for col in columns[1:]}
    logger.experiment.log(plots)


def install_train_intervention(callback: ProbeCallback, trainer: L.Trainer, model: torch.nn.Module) -> ExitStack:
    """Register the ablation hook (switched by callback.intervention_enabled) and record what it ablates."""
    directions = callback.directions(model)
    layer = directions.l_star()
    real = directions.unit()[layer]
    if callback.train_intervention == "ablate":
        direction = real.clone()
    else:
        g = torch.Generator().manual_seed(callback.intervention_seed)
        direction = directions.random(layer, 1, "isotropic", g)[0]
    if trainer.is_global_zero:
        record = {"mode": callback.train_intervention, "layer": layer, "direction_key": directions.key,
                  "seed": callback.intervention_seed if callback.train_intervention == "ablate_random" else None,
                  "cosine_with_direction": float(direction @ real), "where": "all residual writes, all positions"}
        write_json_atomic(probe_file(RunDir(callback.job_dir), "train_intervention.json"), record)
    stack = ExitStack()
    device = next(model.parameters()).device
    stack.enter_context(hooks.ablate_writes(model, direction.to(device), callback.intervention_enabled))
    log.info("probe.train_intervention=%s: direction of layer %d ablated in every training forward",
             callback.train_intervention, layer)
    return stack
