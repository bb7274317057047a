"""Training progress on the console: step, loss, tokens/s and ETA.

In a terminal (stderr is a TTY) one line is redrawn in place with a bar; elsewhere (a log file, SLURM,
CI) a plain log line is written every `every` steps and at the last, so a log stays readable. Lightning's
own bar stays off: it counts batches, not optimizer steps, and knows nothing of tokens.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import IO, Any

import lightning as L

log = logging.getLogger("lbt.progress")
BAR = 20   # characters of the terminal bar


def default_every(total_steps: int) -> int:
    """About one line per 10 % of training (at least every step of a short job)."""
    return max(1, math.ceil(total_steps / 10))


def clock(seconds: float) -> str:
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(step: int, total: int, loss: float | None, tokens_per_s: float, elapsed_s: float,
                  done_here: int) -> str:
    """`step 12/40 (30%)  loss 2.3140  1830 tokens/s  ETA 0:41`; the ETA extrapolates this run's pace
    (evaluation phases included) over the steps left; `done_here` is the steps this process trained."""
    eta = elapsed_s / done_here * (total - step) if done_here else None
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
             f"loss {loss:.4f}" if loss is not None else "loss -",
             f"{tokens_per_s:.0f} tokens/s",
             f"ETA {clock(eta)}" if eta is not None else "ETA -"]
    return "  ".join(parts)


class Progress(L.Callback):
    """Rank 0 reports progress after every optimizer step (a terminal) or every `every` steps (elsewhere)."""

    def __init__(self, every: int | None = None, stream: IO[str] | None = None, tty: bool | None = None):
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._started = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step   # a resumed job's ETA counts only what it trained itself
        if not self.every:
            self.every = default_every(int(trainer.max_steps))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The bar is cleared while a step (and its phase's evaluation) runs, so that their log lines start
        # on a line of their own; it is drawn again when the step ends.
        if self.tty and trainer.is_global_zero:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        step, total = trainer.global_step, int(trainer.max_steps)
        history = getattr(pl_module, "loss_history", None) or []
        line = progress_line(step, total, history[-1] if history else None,
                             float(getattr(pl_module, "tokens_per_second", 0.0)),
                             time.perf_counter() - self._started, step - self._first_step)
        if self.tty:
            filled = BAR * step // max(total, 1)
            end = "\n" if step >= total else ""   # the finished bar stays, on a line of its own
            self.stream.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {line}\x1b[K{end}")
            self.stream.flush()
        elif step % int(self.every or 1) == 0 or step == total:
            log.info("train %s", line)
