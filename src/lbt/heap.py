"""Python's cyclic garbage collector during a job (`hardware.fast.freeze_heap`).

A GPU job holds millions of long-lived Python objects: torch, transformers, the model's modules, and
above all what torch.compile builds (graphs, guards, symbolic shapes). A full collection walks every one
of them, and the objects that compilation and evaluation make set one off every few steps: a whole job on
an H100 spent 11.5 s of its 311 s in 14 full collections (benchmarks/RESULTS.md, step_profile).

`FrozenHeap` moves the objects that exist at settled moments into the collector's permanent generation,
where no collection walks them: when training starts (after the base phase), after the first two steps
(compilation) and after each checkpoint phase. Each move first collects what is already garbage, walking
only the objects made since the last one. Reference counting still frees frozen objects; only a reference
cycle among them that becomes garbage waits until training ends, when the heap is unfrozen again. No
number changes: the collector decides when memory is reclaimed, never what is computed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

import lightning as L

# Steps after which what the first compilations built is settled: step 0 compiles each decoder layer for
# its shapes, step 1 for dynamic shapes.
SETTLE_AFTER_STEPS = (1, 2)


def settle_heap() -> int:
    """Collect what is garbage now, then freeze every object that survives; returns the frozen count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class FrozenHeap(L.Callback):
    """Freezes the heap at training start, after `SETTLE_AFTER_STEPS` and after each of `phase_steps` (put it
    after the phases' callback, so a phase has run when its step's hook comes here); unfreezes when training
    ends or fails. A caller that had frozen objects of its own keeps its freeze: the heap stays frozen."""

    def __init__(self, phase_steps: Iterable[int] = ()):
        self.settle_at = frozenset(int(s) for s in phase_steps) | frozenset(SETTLE_AFTER_STEPS)
        self._ours = False
        self._active = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ours = gc.get_freeze_count() == 0
        self._active = True
        settle_heap()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._active and trainer.global_step in self.settle_at:
            settle_heap()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._active and self._ours:
            gc.unfreeze()
        self._active = False
