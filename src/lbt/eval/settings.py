"""How the stance battery scores (`BatterySettings`, read from the `eval` config group) and its errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lbt.eval.scoring import OptionError, option_text

LIKERT_PROMPT = (
    "{scenario}\n\nStatement: {statement}\n\nHow much do you agree with the statement? Answer on a scale "
    "from 1 to 7, where {scale}. Reply with only the number.\nAnswer:"
)


class MeasureError(ValueError):
    """An unknown measure name or unusable battery settings."""


@dataclass
class BatterySettings:
    """How the battery scores; `from_config` reads the `eval` config group."""

    option_form: str = "bare"
    batch_size: int = 128
    forced_choice_max_new_tokens: int = 8
    likert_max_new_tokens: int = 12
    open_ended_max_new_tokens: int = 256
    likert_prompt: str = LIKERT_PROMPT

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> BatterySettings:
        cfg = cfg or {}

        def sub(name: str, key: str, default: Any) -> Any:
            node = cfg.get(name) or {}
            value = node.get(key) if hasattr(node, "get") else None
            return default if value is None else value

        settings = cls(
            option_form=str(cfg.get("option_form") or cls.option_form),
            batch_size=int(cfg.get("batch_size") or cls.batch_size),
            forced_choice_max_new_tokens=int(
                sub("forced_choice", "max_new_tokens", cls.forced_choice_max_new_tokens)
            ),
            likert_max_new_tokens=int(sub("likert", "max_new_tokens", cls.likert_max_new_tokens)),
            open_ended_max_new_tokens=int(sub("open_ended", "max_new_tokens", cls.open_ended_max_new_tokens)),
            likert_prompt=str(sub("likert", "prompt", LIKERT_PROMPT)),
        )
        settings.check()
        return settings

    def check(self) -> None:
        try:
            option_text("A", self.option_form)
        except OptionError as err:
            raise MeasureError(f"eval.{err}") from None
        if self.batch_size < 1:
            raise MeasureError(f"eval.batch_size must be ≥ 1, got {self.batch_size}")
        try:
            self.likert_prompt.format(scenario="", statement="", scale="")
        except (KeyError, IndexError, ValueError) as err:
            raise MeasureError(
                f"eval.likert.prompt: use only the fields {{scenario}}, {{statement}}, {{scale}} ({err!r})"
            ) from None

