"""The process-wide evaluation settings of `hardware.fast`.

How greedy decoding runs, whether prompts share their openings, whether a phase's measures share engine
calls, and the three forward levers that change rounding only (one-kernel norms, grouped heads read in place,
the LoRA delta inside its GEMM) are read deep inside scoring, far from the job's config. Each is one
`FastSetting`, kept by the module that acts on it; `lbt.eval.battery.apply_fast_settings` sets them all
from a job's `hardware.fast` before any scoring, and a key that is missing there (or None) takes the
setting's default.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class FastSetting(Generic[T]):
    """One process-wide setting named by its `hardware.fast` key. Without `choices` it is a switch (any value
    is read as a bool); with them, a value outside them is refused, naming the key and the allowed values."""

    def __init__(self, key: str, default: T, choices: Collection[T] | None = None):
        self.key = key
        self.default = default
        self.choices = tuple(choices) if choices is not None else None
        self._value = default

    def set(self, value: T | None) -> None:
        """The setting from now on; None restores its default."""
        if value is None:
            self._value = self.default
        elif self.choices is None:
            self._value = bool(value)  # type: ignore[assignment]
        elif value in self.choices:
            self._value = value
        else:
            raise ValueError(f"{self.key}={value!r}: use one of {list(self.choices)}")

    def get(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return f"FastSetting({self.key}={self._value!r})"
