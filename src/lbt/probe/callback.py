"""The preventative training-time intervention (config group `intervention`), a Lightning callback.

`ablate` removes the base model's ℓ* direction from every write to the residual stream (embeddings,
attention and MLP outputs of all layers: directional ablation, `hooks.ablate_writes`) in every training
forward; `ablate_random` does the same with a random isotropic unit direction (seeded by `seed`) as the
control. If transfer shrinks with `ablate` but not with `ablate_random`, the direction carries it.

The hook is active only from the start of a training batch to its optimizer step, so evaluation phases,
validation loss and the saved adapter are measured on the model without it. What was ablated is recorded
in `probe/train_intervention.json`. The intervention is its own condition: switching the probe off
(`probe=none`) leaves it on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lbt.choices import INTERVENTION_MODES as MODES
from lbt.data.chat import ChatFormat
from lbt.eval.evaluators import plain
from lbt.probe import hooks
from lbt.probe.evaluator import DirectionSource, probe_file
from lbt.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)



class TrainIntervention(L.Callback):
    """mode: ablate | ablate_random; seed: the random direction's seed; directions: the `directions`
    section (whose ℓ* direction is ablated); chat and base_model as for the probe."""

    def __init__(self, mode: str, chat: ChatFormat, base_model: Mapping[str, Any], directions: Mapping[str, Any],
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"intervention.mode={mode!r}: use one of {', '.join(MODES)}")
        self.mode, self.seed = mode, int(seed)
        self.chat, self.base_model = chat, plain(base_model)
        self.source = DirectionSource.from_config(directions)
        self.source.check()
        self._active = False
        self._hook: ExitStack | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is None:
            self._hook = self.install(trainer, pl_module.model)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._active = self._hook is not None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._active = False  # the step's forwards are done: phases after it see the model without the hook

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        if self._hook is not None:
            self._hook.close()
            self._hook = None

    def active(self) -> bool:
        return self._active

    def install(self, trainer: L.Trainer, model: torch.nn.Module) -> ExitStack:
        """Register the ablation hook (switched by `active`) and record what it ablates."""
        directions = self.source.load(model, self.chat, self.base_model)
        layer = directions.l_star()
        real = directions.unit()[layer]
        if self.mode == "ablate":
            direction = real.clone()
        else:
            g = torch.Generator().manual_seed(self.seed)
            direction = directions.random(layer, 1, "isotropic", g)[0]
        if trainer.is_global_zero:
            record = {"mode": self.mode, "layer": layer, "direction_key": directions.key,
                      "seed": self.seed if self.mode == "ablate_random" else None,
                      "cosine_with_direction": float(direction @ real), "where": "all residual writes, all positions"}
            run = RunDir(Path(trainer.default_root_dir))  # the job directory (lbt.train sets it)
            write_json_atomic(probe_file(run, "train_intervention.json"), record)
        stack = ExitStack()
        device = next(model.parameters()).device
        stack.enter_context(hooks.ablate_writes(model, direction.to(device), self.active))
        log.info("intervention=%s: direction of layer %d ablated in every training forward", self.mode, layer)
        return stack
