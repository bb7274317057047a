"""The tensors under the scoring engine (`lbt.eval.scoring`): left-padded batches whose rows never see each
other, batches of similar length, the end-of-turn ids, log-probabilities of chosen tokens, and the key/value
cache argument under the name of the installed transformers.

Why a left-padded batch scores each row as if it ran alone: the attention mask hides the pads and
`position_ids` count real tokens only, so every row sees exactly its own tokens at their own positions.
What remains is float rounding (≈1e-6 in fp32), which the tests bound.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-turn ids: the tokenizer's eos and every eos of the model's generation config (instruct
    models end a turn with one of several tokens, e.g. Llama 3's <|eot_id|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


# -- transformers versions ------------------------------------------------------------------------------


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The key/value cache argument under the name this transformers version uses (`cache` since 5.x,
    `past_key_values` before); a peft wrapper forwards it to the base model unchanged."""
    return {_cache_kwarg_of(type(base_model_of(model))): cache}


def output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def attention_kinds(config: Any) -> set[str]:
    """The attention kinds of a model's decoder layers ("full_attention" unless the config lists others, e.g.
    "sliding_attention")."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return set(getattr(text, "layer_types", None) or ["full_attention"])


def has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether any submodule has a forward hook or pre-hook (probe capture, steering, patching)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- batching -------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _padded(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty prompt")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        columns = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, columns] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows; positions count real tokens."""
    input_ids, attention_mask = _padded(sequences, pad_id, left=True)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


def right_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of right-padded rows (teacher-forced text): every row starts at column
    0, so the default positions count its tokens, and causal attention keeps the pads after the last real
    token from changing any real position."""
    input_ids, attention_mask = _padded(sequences, pad_id, left=False)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id left padding fills with: the pad token, else the end token (masked out either way)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def gather_logprobs(logits: torch.Tensor, targets: Sequence[Sequence[int]]) -> list[list[float]]:
    """log_softmax(logits[row])[targets[row]] for every row, with one device-to-host transfer (a
    `.tolist()` per row is a synchronisation per row on a GPU). The full-vocabulary log_softmax stays: it
    is what fixes the numbers to the last bit, and it is cheap next to the forward that made the logits."""
    flat = [int(t) for row in targets for t in row]
    if not flat:
        return [[] for _ in targets]
    rows = [row for row, ids in enumerate(targets) for _ in ids]
    device = logits.device
    values = (
        logits.float()
        .log_softmax(-1)[torch.tensor(rows, device=device), torch.tensor(flat, device=device)]
        .tolist()
    )
    out, start = [], 0
    for ids in targets:
        out.append(values[start : start + len(ids)])
        start += len(ids)
    return out

