"""Two measurements the benchmarks share: GPU kernel time in a torch.profiler run, and Python's full garbage
collections (each walks every live object: a pause of the host) while some code runs."""

from __future__ import annotations

import gc
import time
from typing import Self

GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "sm90_xmma")
# Names of the benchmarks' own `torch.profiler.record_function` regions: the profiler also shows each as a GPU
# span, which is no kernel.
REGION = "bench/"


def kernel_seconds(averages, gemm_only: bool = False) -> float:
    """Seconds of GPU kernels in a profiler's `key_averages()` (only matrix-multiply kernels if `gemm_only`)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not e.key.startswith(REGION)
               and (not gemm_only or any(k in e.key.lower() for k in GEMM_KERNELS))) / 1e6


def top_kernels(averages, n: int = 8) -> list[tuple[str, float, int]]:
    """The n GPU kernels with the most time in a profiler's `key_averages()`: (name cut to 90 characters,
    seconds, calls)."""
    from torch.autograd import DeviceType

    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not e.key.startswith(REGION)]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return [(e.key[:90], e.self_device_time_total / 1e6, e.count) for e in kernels[:n]]


def idle_by_region(events) -> dict[str, tuple[float, float]]:
    """For each `record_function` region named REGION + ..., over all its occurrences in a profiler's
    `events()`: (its wall seconds, the seconds of it in which the GPU ran no kernel), plus "all" for the span
    from the first region's start to the last one's end. Where the GPU waits for the host."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(REGION))
    busy: list[list[float]] = []
    for start, end in spans:
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])

    def idle(start: float, end: float) -> float:
        return end - start - sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy if b > start and a < end)

    regions = [(e.name, e.time_range.start, e.time_range.end) for e in events
               if e.device_type == DeviceType.CPU and e.name.startswith(REGION)]
    out: dict[str, tuple[float, float]] = {}
    for name, start, end in regions:
        wall, gap = out.get(name, (0.0, 0.0))
        out[name] = (wall + (end - start) / 1e6, gap + idle(start, end) / 1e6)
    if regions:
        first, last = min(r[1] for r in regions), max(r[2] for r in regions)
        out["all"] = ((last - first) / 1e6, idle(first, last) / 1e6)
    return out


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
