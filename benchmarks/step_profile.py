"""Where a whole job's training steps go: a Lightning callback for `python -m lbt.train` (benchmarks only).

    PYTHONPATH=benchmarks:$PYTHONPATH python -m lbt.train ... +callbacks.steps._target_=step_profile.StepProfile \
        +callbacks.steps.profile_from=60 +callbacks.steps.profile_steps=2

At the end of training it logs each step's wall time (the GPU synchronized at every step's start, so a
step's time is its own), their median and spread, the slowest steps with the part spent inside
training_step (the rest is data, evaluation phases, checkpoints and callbacks), Python's full garbage
collections (count and seconds), and, for `profile_steps` steps from `profile_from` on (0: none), the GPU
kernels' busy time against the wall and the top kernels and host operations. `benchmarks/train_throughput.py` times the same training step outside Lightning.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import lightning as L
import torch
from profiling import FullCollections, kernel_seconds

log = logging.getLogger("step_profile")


class StepProfile(L.Callback):
    def __init__(self, profile_from: int = 60, profile_steps: int = 2, **_: Any):
        self.profile_from, self.profile_steps = int(profile_from), int(profile_steps)
        self.starts: list[tuple[int, float]] = []
        self.inside: dict[int, float] = {}  # step -> seconds inside training_step (LoRAModule's own clock)
        self._clock = 0.0
        self.collections = FullCollections()
        self._profiler = None
        self._profile_started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.collections.start()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        step = trainer.global_step
        if step == self.profile_from and self.profile_steps > 0 and torch.cuda.is_available():
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA])
            self._profiler.__enter__()
            self._profile_started = now
        elif step == self.profile_from + self.profile_steps and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._report_profile(now - self._profile_started)
            self._profiler = None
            now = time.perf_counter()  # the profiler's teardown (seconds) belongs to no step
        self.starts.append((step, now))
        self._clock = float(getattr(pl_module, "_train_seconds", 0.0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # training_step's own seconds (forward, backward, optimizer, validation; not synchronized, so a step's
        # queued GPU work may land in the next): the rest of a step is data, phases, checkpoints, callbacks.
        step = self.starts[-1][0] if self.starts else trainer.global_step
        self.inside[step] = float(getattr(pl_module, "_train_seconds", 0.0)) - self._clock

    def _report_profile(self, wall: float) -> None:
        averages = self._profiler.key_averages()
        busy = kernel_seconds(averages)
        log.info("profiled steps %d-%d: wall %.3f s, GPU kernels %.3f s (%.0f %%)", self.profile_from,
                 self.profile_from + self.profile_steps - 1, wall, busy, 100 * busy / wall)
        log.info("top kernels:\n%s", averages.table(sort_by="self_device_time_total", row_limit=15,
                                                     max_name_column_width=60))
        log.info("top host operations:\n%s", averages.table(sort_by="self_cpu_time_total", row_limit=15,
                                                             max_name_column_width=60))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.collections.stop()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ends = [t for _, t in self.starts[1:]] + [time.perf_counter()]
        steps = [(step, end - start) for (step, start), end in zip(self.starts, ends)]
        if not steps:
            return
        times = sorted(seconds for _, seconds in steps)
        slow = sorted(steps, key=lambda s: -s[1])[:8]
        log.info("steps: %d, wall %.1f s; median %.3f s, 10th-90th percentile %.3f-%.3f s; slowest (step: s, "
                 "including any phase or checkpoint after it): %s", len(steps), sum(times),
                 statistics.median(times), times[len(times) // 10], times[(9 * len(times)) // 10],
                 ", ".join(f"{step}: {seconds:.2f} ({self.inside.get(step, float('nan')):.2f} in training_step)"
                           for step, seconds in slow))
        pauses = self.collections.pauses
        log.info("full garbage collections during training: %d, %.3f s", len(pauses), sum(pauses))
