"""Two measurements the benchmarks share: GPU kernel time in a torch.profiler run, and Python's full garbage
collections (each walks every live object: a pause of the host) while some code runs."""

from __future__ import annotations

import gc
import time
from typing import Self

GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "sm90_xmma")


def kernel_seconds(averages, gemm_only: bool = False) -> float:
    """Seconds of GPU kernels in a profiler's `key_averages()` (only matrix-multiply kernels if `gemm_only`)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA and
               (not gemm_only or any(k in e.key.lower() for k in GEMM_KERNELS))) / 1e6


class FullCollections:
    """Records each full (generation 2) collection's seconds in `pauses` from `start()` to `stop()`, or inside
    a `with` block."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._began = 0.0

    def _watch(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._began)

    def start(self) -> None:
        gc.callbacks.append(self._watch)

    def stop(self) -> None:
        if self._watch in gc.callbacks:
            gc.callbacks.remove(self._watch)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
