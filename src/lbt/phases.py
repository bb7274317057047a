"""Evaluation points of a job and the one callback that runs the evaluators at them.

Phases: `base` (before the first optimizer step: the model before fine-tuning), `step_<n>` at each
checkpoint fraction but the last, and `final` (the 100 % checkpoint, after training ends). At each
checkpoint step the adapter is saved to checkpoints/adapter_step_<n>/ first, then every evaluator of the
job runs (stance battery, capability checks, probe: `lbt.eval.session.Evaluator`), in a `Session` made
from the trainer (ranks, loggers, step). Evaluators skip a phase whose outputs already exist: after a
resume, nothing already written is redone or overwritten. With `hardware.fast.share_base`, the base
phase's files are copied from a sweep-wide cache when another job of the same model and evaluation
settings wrote them (`lbt.eval.base_cache`), and the evaluators served so are skipped at base.

On resume, a phase already passed whose files are missing or corrupt (`Evaluator.planned_files`) runs
again with the weights it evaluates: the adapters switched off for `base` (LoRA B starts at zero, so
that is the model of step 0), the saved checkpoints/adapter_step_<n>/ for `step_<n>`. Corrupt files are
set aside first (lbt.rundir), never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lbt.eval.base_cache import BaseCache
from lbt.eval.session import Evaluator, Session
from lbt.model.lora import eager_layers
from lbt.rundir import (
    Completeness,
    Expected,
    RunDir,
    adapter_problem,
    completeness,
    incomplete_phases,
    planned_phases,
    set_aside,
)
from lbt.study import phase_step, step_phase

log = logging.getLogger(__name__)


def checkpoint_steps(total_steps: int, fractions: list[float]) -> list[int]:
    """Optimizer steps at the given fractions of training (at least step 1, no duplicates)."""
    steps = {min(total_steps, max(1, round(float(f) * total_steps))) for f in fractions}
    return sorted(steps)


def atomic_save_dir(save, target: Path) -> None:
    """Write a directory through save(tmp_dir), then move it into place; an existing target is kept
    unless it does not load (then it is set aside and written again)."""
    if target.exists():
        problem = adapter_problem(target)
        if problem is None:
            return
        set_aside(target, problem)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    os.replace(tmp, target)


class CheckpointPhases(L.Callback):
    """Saves adapters at checkpoint fractions and a resumable checkpoint, and dispatches the phases."""

    def __init__(self, job_dir: Path, total_steps: int, fractions: list[float], resume_every_steps: int,
                 evaluators: Sequence[Evaluator], base_cache: BaseCache | None = None):
        self.job_dir = Path(job_dir)
        self.total_steps = total_steps
        self.steps = checkpoint_steps(total_steps, fractions)
        self.resume_every = int(resume_every_steps or 0)
        self.evaluators = list(evaluators)
        self.base_cache = base_cache  # None: every job evaluates its own base (hardware.fast.share_base)
        self.run = RunDir(self.job_dir)
        self.phases = planned_phases(self.steps, total_steps)

    @property
    def resume_path(self) -> Path:
        return self.run.last_ckpt

    def phase_files(self, phases: list[str] | None = None) -> dict[str, list[Expected]]:
        """Every planned phase's files: the evaluators' outputs."""
        return {phase: [e for ev in self.evaluators for e in ev.planned_files(self.run, phase)]
                for phase in phases or self.phases}

    def adapter_files(self) -> dict[str, str | None]:
        """Problems of the saved step adapters (checkpoints/adapter_step_<n>/), by phase."""
        return {step_phase(s): adapter_problem(self.run.adapter_at(s)) for s in self.steps}

    def completeness(self, trained_steps: int) -> Completeness:
        """The check behind DONE for this plan (`rundir.completeness`), the step adapters included: each
        lost one is listed as `checkpoint of <phase>: <why>`."""
        result = completeness(self.run, self.total_steps, trained_steps, self.phase_files())
        result.missing += [f"checkpoint of {p}: {why}" for p, why in self.adapter_files().items() if why]
        return result

    def repair(self, trainer: L.Trainer, module: L.LightningModule, upto_step: int) -> None:
        """Run again every phase up to `upto_step` whose files are missing or corrupt (after a resume)."""
        passed = [p for p in self.phases if p != "final" and phase_step(p, self.total_steps) <= upto_step]
        todo: list[str] = []
        if trainer.is_global_zero:
            todo = incomplete_phases(self.phase_files(passed))
        todo = trainer.strategy.broadcast(todo, src=0)
        for phase in todo:
            log.warning("phase %s: files missing or corrupt; running it again", phase)
            self.rerun(trainer, module, phase)

    def rerun(self, trainer: L.Trainer, module: L.LightningModule, phase: str) -> None:
        """Dispatch a past phase with the weights it evaluates, then put the current weights back."""
        model = module.model
        if phase == "base":
            with model.disable_adapter():
                self.dispatch(trainer, module, phase)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = self.run.adapter_at(phase_step(phase, self.total_steps))
        problem = adapter_problem(folder)
        if problem:
            raise RuntimeError(f"phase {phase} cannot be evaluated again: {problem}")
        current = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        try:
            self.dispatch(trainer, module, phase)
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in current:
                        param.copy_(current[name])

    def dispatch(self, trainer: L.Trainer, module: L.LightningModule, phase: str) -> None:
        # Logged at the phase's own step, also when a resumed job evaluates a past phase again.
        session = trainer_session(trainer, self.run, phase_step(phase, self.total_steps))
        # The training forward's precision context (autocast under bf16-mixed) applies to evaluation too.
        started = time.perf_counter()
        if trainer.is_global_zero:
            log.info("phase %s: %s", phase, ", ".join(type(e).__name__ for e in self.evaluators))
        # At base, a sweep's jobs share one evaluation (lbt.eval.base_cache): the evaluators whose files were
        # copied from there are skipped, on every rank.
        shared = self.base_cache.shared(self.evaluators, session) if phase == "base" and self.base_cache \
            else nullcontext([])
        with shared as served, eager_layers(module.model), trainer.precision_plugin.forward_context():
            for evaluator in self.evaluators:
                if evaluator not in served:
                    evaluator.evaluate(module.model, phase, session)
        if trainer.is_global_zero:
            log.info("phase %s done in %.1f s", phase, time.perf_counter() - started)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._train_started = self._train_ended = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed from the last step's checkpoint, Lightning skips the training loop and its start and end
        # hooks: what they would do (repair passed phases, adapter/, final) is done here.
        if trainer.global_step >= self.total_steps and not self._train_ended:
            if not self._train_started:
                self.repair(trainer, pl_module, trainer.global_step)
            self.on_train_end(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started = True
        if trainer.global_step == 0:
            self.dispatch(trainer, pl_module, "base")
        else:
            self.repair(trainer, pl_module, trainer.global_step)

    def save_resumable(self, trainer: L.Trainer) -> None:
        """Lightning checkpoint (trainable weights, optimizer, scheduler, loop state), written atomically;
        the one it replaces is kept as prev.ckpt, the fallback if last.ckpt is ever found corrupt."""
        tmp = self.resume_path.with_name("last.ckpt.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            if self.resume_path.exists():
                os.replace(self.resume_path, self.run.prev_ckpt)
            os.replace(tmp, self.resume_path)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        at_checkpoint = step in self.steps
        if at_checkpoint:
            if trainer.is_global_zero:
                atomic_save_dir(pl_module.model.save_pretrained, self.run.adapter_at(step))
            if step != self.total_steps:
                self.dispatch(trainer, pl_module, step_phase(step))
        if at_checkpoint or (self.resume_every and step % self.resume_every == 0):
            self.save_resumable(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_ended = True
        if trainer.global_step < self.total_steps:
            return  # stopped early (preemption): no final adapter, no final phase; resume finishes them
        if trainer.is_global_zero:
            atomic_save_dir(pl_module.model.save_pretrained, self.run.adapter)
            incomplete_phases(self.phase_files(["final"]))  # sets corrupt final files aside
        trainer.strategy.barrier()
        self.dispatch(trainer, pl_module, "final")


def trainer_session(trainer: L.Trainer, run: RunDir, step: int | None = None) -> Session:
    """The evaluators' view of a trainer: its rank and world size, rank 0's loggers, the step of the scored
    model (the trainer's by default), and the strategy's broadcast and barrier (rows are gathered with
    torch.distributed)."""
    world = trainer.world_size

    def broadcast(value: Any) -> Any:
        return trainer.strategy.broadcast(value, src=0) if world > 1 else value

    def gather(rows: list) -> list:
        if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return rows
        parts: list[list | None] = [None] * world
        torch.distributed.all_gather_object(parts, rows)
        return [row for part in parts for row in (part or [])] if trainer.is_global_zero else []

    return Session(run=run, rank=trainer.global_rank, world=world,
                   step=trainer.global_step if step is None else int(step),
                   loggers=list(trainer.loggers) if trainer.is_global_zero else [], broadcast=broadcast,
                   gather=gather, barrier=trainer.strategy.barrier)
