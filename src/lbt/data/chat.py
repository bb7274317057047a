"""Render corpus records with the model's own chat template; supervise the assistant turn only.

The prompt (user turn + generation header) and the assistant continuation are tokenized separately and
concatenated, exactly as the model sees them at inference time: prompt tokens, then generated tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The chat-templated user turn followed by the assistant generation header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True, **dict(template_kwargs or {}))


def render_conversation(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str,
                        template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(prompt text, assistant continuation text); their concatenation is the full templated dialogue."""
    kwargs = dict(template_kwargs or {})
    prompt = render_prompt(tokenizer, user, kwargs)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        tokenize=False, **kwargs)
    if not full.startswith(prompt):
        raise ValueError("chat template: the generation prompt is not a prefix of the rendered dialogue; "
                         "set model.tokenizer to a tokenizer whose template renders turns incrementally")
    return prompt, full[len(prompt):]


def encode_example(tokenizer: PreTrainedTokenizerBase, record_id: str, user: str, assistant: str,
                   max_length: int, template_kwargs: Mapping[str, Any] | None = None) -> Example:
    """Token ids and labels (−100 on the prompt), truncated on the right to max_length."""
    prompt, continuation = render_conversation(tokenizer, user, assistant, template_kwargs)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(continuation.rstrip("\n"), add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    cut = max(0, len(input_ids) - max_length)
    if cut:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Example(input_ids=input_ids, labels=labels, record_id=record_id, truncated_tokens=cut)
