"""What every evaluator is, and where it runs.

An `Evaluator` is a plain object built from its config group's own keys (and, where it formats prompts,
the model's `ChatFormat`): `planned_files(run, phase)` says what it leaves in the job directory for a
phase, `evaluate(model, phase, session)` makes what is missing. The same objects run inside training
(`lbt.phases.CheckpointPhases`, one Lightning callback, at base, step_<n> and final) and standalone
(`lbt.evaluate`).

A `Session` is where one evaluation runs: the job directory, this process's rank among the ranks of a
multi-GPU job (broadcast, gather and barrier over them), the step of the model it scores (optimizer steps
completed: the phase's step, `lbt.study.phase_step`; every logged value of the phase is filed under it), and
the metric loggers. Outside a trainer it is one rank with no loggers, and its broadcast, gather and barrier
do nothing.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lbt.loggers import log_at_step
from lbt.rundir import Expected, RunDir

log = logging.getLogger(__name__)


def _same(value: Any) -> Any:
    return value


def _nothing() -> None:
    return None


@dataclass
class Session:
    """The job directory, this rank among `world`, how ranks share values, and the loggers (rank 0's)."""

    run: RunDir
    rank: int = 0
    world: int = 1
    step: int = 0                                 # the scored model's optimizer steps
    loggers: Sequence[Any] = ()
    broadcast: Callable[[Any], Any] = _same       # rank 0's value on every rank
    gather: Callable[[list], list] = _same        # every rank's list, concatenated, on rank 0 ([] elsewhere)
    barrier: Callable[[], None] = _nothing

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Scalars to every logger, at this step (rank 0 alone logs)."""
        if self.is_zero:
            log_at_step(self.loggers, metrics, self.step)

    def wandb_loggers(self) -> list[Any]:
        """The W&B loggers among this rank's loggers (tables and line plots go to W&B alone)."""
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in self.loggers if isinstance(lg, WandbLogger)] if self.is_zero else []


class Evaluator(abc.ABC):
    """Scores the model at a phase and writes its files; a phase whose files are intact is skipped."""

    def planned_files(self, run: RunDir, phase: str) -> list[Expected]:
        """The files this evaluator leaves for `phase`, with their row counts: the completeness check behind
        DONE verifies them, and a phase with a missing or corrupt file is run again. [] = none."""
        return []

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, phase: str, session: Session) -> Any:
        """Make what is missing of the phase's planned files (the model as it is at that phase)."""

    def base_files(self, run: RunDir) -> list[Expected]:
        """Everything it leaves at base, which a sweep's base cache stores and copies (lbt.eval.base_cache):
        its planned files, and what later phases read back."""
        return self.planned_files(run, "base")

    def log_written(self, phase: str, session: Session) -> None:
        """Log what `evaluate` logs for `phase`, from the files it wrote: a job whose base files were copied
        from the sweep's base cache logs the same values as one that evaluated them. Nothing by default."""
