"""The model's chat format: render corpus records and prompts with its own chat template.

`ChatFormat` is the tokenizer bound to the model's own template arguments (`model.chat_template_kwargs`,
e.g. Llama's pinned date): the DataModule, the evaluators and the probes take one `ChatFormat` instead of
a tokenizer and a dict passed side by side, so no prompt can be rendered without the model's arguments.

The prompt (user turn + generation header) and the assistant continuation are tokenized separately and
concatenated, exactly as the model sees them at inference time: prompt tokens, then generated tokens.
Only the assistant turn is supervised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    record_id: str
    truncated_tokens: int

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True, eq=False)
class ChatFormat:
    """A tokenizer bound to the template arguments its chat template is rendered with."""

    tokenizer: PreTrainedTokenizerBase
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Token ids per prompt text: every phase of a job asks the same ~13 prompts per item again, and a chat
    # template (Jinja) plus a fast tokenizer cost about a millisecond per prompt.
    _prompt_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, model_cfg: Mapping[str, Any] | DictConfig) -> ChatFormat:
        """The chat format of a `model` config section (its chat_template_kwargs; none when absent)."""
        kwargs = model_cfg.get("chat_template_kwargs")
        if isinstance(kwargs, DictConfig):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        return cls(tokenizer, dict(kwargs or {}))

    def prompt(self, user: str) -> str:
        """The chat-templated user turn followed by the assistant generation header."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True, **self.template_kwargs)

    def prompt_ids(self, user: str) -> list[int]:
        """Token ids of `prompt(user)` (cached per text)."""
        if user not in self._prompt_ids:
            # The rendered template already holds its special tokens; adding them again would double a BOS.
            self._prompt_ids[user] = tuple(self.tokenizer.encode(self.prompt(user), add_special_tokens=False))
        return list(self._prompt_ids[user])

    def conversation(self, user: str, assistant: str) -> tuple[str, str]:
        """(prompt text, assistant continuation text); their concatenation is the full templated dialogue."""
        prompt = self.prompt(user)
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            tokenize=False, **self.template_kwargs)
        if not full.startswith(prompt):
            raise ValueError("chat template: the generation prompt is not a prefix of the rendered dialogue; "
                             "set model.tokenizer to a tokenizer whose template renders turns incrementally")
        return prompt, full[len(prompt):]

    def example(self, record_id: str, user: str, assistant: str, max_length: int) -> Example:
        """Token ids and labels (−100 on the prompt) of one exchange, truncated on the right to max_length."""
        prompt, continuation = self.conversation(user, assistant)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(continuation.rstrip("\n"), add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
        cut = max(0, len(input_ids) - max_length)
        if cut:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        return Example(input_ids=input_ids, labels=labels, record_id=record_id, truncated_tokens=cut)
