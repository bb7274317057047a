"""The model's chat format: its tokenizer's chat template with the model's own template arguments.

`model.chat_template_kwargs` (e.g. Llama's pinned date) belongs with the tokenizer it formats for: one
`ChatFormat` made from both is what the DataModule, the evaluators and the probes take, instead of a
tokenizer and a dict passed side by side. The rendering itself is `lbt.data.chat`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from lbt.data.chat import Example, encode_example, render_conversation, render_prompt


@dataclass(frozen=True, eq=False)
class ChatFormat:
    """A tokenizer bound to the template arguments its chat template is rendered with."""

    tokenizer: PreTrainedTokenizerBase
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, model_cfg: Mapping[str, Any] | DictConfig) -> ChatFormat:
        """The chat format of a `model` config section (its chat_template_kwargs; none when absent)."""
        kwargs = model_cfg.get("chat_template_kwargs")
        if isinstance(kwargs, DictConfig):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        return cls(tokenizer, dict(kwargs or {}))

    def prompt(self, user: str) -> str:
        """The user turn followed by the assistant generation header."""
        return render_prompt(self.tokenizer, user, self.template_kwargs)

    def prompt_ids(self, user: str) -> list[int]:
        return self.tokenizer.encode(self.prompt(user), add_special_tokens=False)

    def conversation(self, user: str, assistant: str) -> tuple[str, str]:
        """(prompt text, assistant continuation text) of one exchange."""
        return render_conversation(self.tokenizer, user, assistant, self.template_kwargs)

    def example(self, record_id: str, user: str, assistant: str, max_length: int) -> Example:
        """Token ids and labels of one exchange, the assistant turn supervised."""
        return encode_example(self.tokenizer, record_id, user, assistant, max_length, self.template_kwargs)
