"""Scoring primitives of the stance battery: batched, left-padded, and equal to one-at-a-time scoring.

Three operations, each over many prompts at once (token ids, already rendered with the chat template):

- `next_token_logprobs`: one forward per prompt, logits at the last position only (`logits_to_keep=1`),
  log-probabilities of given token ids — the fast path for options that are one token.
- `continuation_logprobs`: per-token log-probabilities of multi-token options after a prompt. The prompt
  runs once (its key/value cache is kept) and every option's tokens then run against a copy of that
  cache, so a prompt with two options costs one prompt forward, not two.
- `greedy_generate`: batched greedy decoding with a key/value cache; a row stops at an end-of-sequence
  token or as soon as its `stop` predicate holds (e.g. an answer letter was parsed), and the batch stops
  once every row has stopped.

Why the numbers equal one-at-a-time scoring: prompts are left-padded, the attention mask hides the pads
and `position_ids` count real tokens only, so every row sees exactly its own tokens at their own
positions; rows never interact. What remains is float rounding (≈1e-6 in fp32), which the tests bound.
Prompts are sorted by length before batching (less padding) and results come back in input order.

Options are token sequences chosen by the caller; `option_text` / `encode_option` make the option form
explicit: `bare` is what a model emits right after the chat template's generation prompt ("A"),
`leading_space` is the original study's form (" A", " Approve").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

OPTION_FORMS = ("bare", "leading_space")


class OptionError(ValueError):
    """An option string that the tokenizer cannot express in the form a measure needs."""


@dataclass(frozen=True)
class Generation:
    """One greedy continuation: decoded text (special tokens dropped), its token ids, why it ended
    ("eos", "stop": the stop predicate held, "length": max_new_tokens reached), and, when asked for,
    the log-probabilities of given tokens at the first generated position."""

    text: str
    token_ids: list[int]
    finish: str
    first_logprobs: list[float] = field(default_factory=list)


# -- option forms ---------------------------------------------------------------------------------------


def option_text(option: str, form: str) -> str:
    """The option string in the configured form: "A"/"Approve" (bare) or " A"/" Approve" (leading_space)."""
    if form not in OPTION_FORMS:
        raise OptionError(f"option_form={form!r}: use one of {list(OPTION_FORMS)}")
    core = option.strip()
    if not core:
        raise OptionError("option is empty")
    return core if form == "bare" else " " + core


def encode_option(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an option as the model would emit them after the prompt (no special tokens)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_kwarg_of(type(base)): cache}


def output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# -- batching -------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows; positions count real tokens."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty prompt")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


def _pad_id(tokenizer_or_id: PreTrainedTokenizerBase | int) -> int:
    if isinstance(tokenizer_or_id, int):
        return tokenizer_or_id
    pad = tokenizer_or_id.pad_token_id
    return int(pad if pad is not None else tokenizer_or_id.eos_token_id)


# -- scoring --------------------------------------------------------------------------------------------


@torch.no_grad()
def next_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[list[float]]:
    """log P(token | prompt) for every token id in targets[i], one forward per prompt."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = model_device(model)
    result: list[list[float]] = [[] for _ in prompts]
    for batch in length_batches([len(p) for p in prompts], batch_size):
        inputs = left_pad([prompts[i] for i in batch], pad_id, device)
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        for i, values in zip(batch, _gather_logprobs(logits, [targets[i] for i in batch])):
            result[i] = values
    return result


def _gather_logprobs(logits: torch.Tensor, targets: Sequence[Sequence[int]]) -> list[list[float]]:
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


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[list[list[float]]]:
    """Per-token log-probabilities of each option after its prompt: result[i][j][t] is
    log P(options[i][j][t] | prompts[i] + options[i][j][:t]).

    The prompt runs once with a key/value cache; each option's tokens but its last then run against the
    cached prompt (the first option token is read off the prompt's last position)."""
    if len(prompts) != len(options):
        raise ValueError("prompts and options differ in length")
    device = model_device(model)
    result: list[list[list[float]]] = [[] for _ in prompts]
    for batch in length_batches([len(p) for p in prompts], batch_size):
        inputs = left_pad([prompts[i] for i in batch], pad_id, device)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        firsts = _gather_logprobs(out.logits[:, -1], [[opt[0] for opt in options[i]] for i in batch])
        for i, values in zip(batch, firsts):
            result[i] = [[value] for value in values]
        # Rows for the options' later tokens: (prompt row, option index) pairs with ≥ 2 tokens.
        pairs = [(row, j) for row, i in enumerate(batch) for j, opt in enumerate(options[i]) if len(opt) > 1]
        if pairs:
            _score_option_tails(model, cache, inputs, batch, options, pairs, pad_id, result)
    return result


def _score_option_tails(
    model: torch.nn.Module,
    cache,
    prompt_inputs: dict[str, torch.Tensor],
    batch: list[int],
    options: Sequence[Sequence[Sequence[int]]],
    pairs: list[tuple[int, int]],
    pad_id: int,
    result: list[list[list[float]]],
) -> None:
    """Feed option tokens [0 .. m-2] after the cached prompts (right-padded: pads come after every real
    token, so causal attention never lets them change a real position) and read tokens [1 .. m-1]."""
    device = prompt_inputs["input_ids"].device
    cache.batch_select_indices(torch.tensor([row for row, _ in pairs], device=device))
    tails = [list(options[batch[row]][j]) for row, j in pairs]
    width = max(len(t) for t in tails) - 1
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for k, tail in enumerate(tails):
        input_ids[k, : len(tail) - 1] = torch.tensor(tail[:-1])
        tail_mask[k, : len(tail) - 1] = 1
    rows = torch.tensor([row for row, _ in pairs], device=device)
    prompt_mask = prompt_inputs["attention_mask"][rows]
    start = prompt_mask.sum(-1, keepdim=True)  # the first option token's position = prompt length
    position_ids = start + torch.arange(width, device=device)[None, :]
    attention_mask = torch.cat([prompt_mask, tail_mask.to(device)], dim=-1)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **cache_kwargs(model, cache),
    ).logits
    # Only the real (row, position) pairs go through log_softmax (each vocabulary row is normalised on
    # its own, so leaving the pad positions out changes no value), and one transfer brings all back.
    ks = [k for k, tail in enumerate(tails) for _ in tail[1:]]
    ts = [t for tail in tails for t in range(len(tail) - 1)]
    following = [token for tail in tails for token in tail[1:]]
    picked = logits[torch.tensor(ks, device=device), torch.tensor(ts, device=device)]
    values = _gather_logprobs(picked, [[token] for token in following])
    start = 0
    for (row, j), tail in zip(pairs, tails):
        result[batch[row]][j].extend(v[0] for v in values[start : start + len(tail) - 1])
        start += len(tail) - 1


# -- generation -----------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    stop: Callable[[str], bool] | Sequence[Callable[[str], bool]] | None = None,
    first_targets: Sequence[Sequence[int]] | None = None,
) -> list[Generation]:
    """Greedy continuations of every prompt, in input order.

    A row ends at an end-of-turn token (not included in its text), when `stop(text so far)` holds (one
    predicate for all rows, or one per prompt), or after max_new_tokens; the batch ends when all rows
    have. Because a row's text is cut exactly where its own stop condition first holds, the result does
    not depend on which rows share its batch.
    first_targets: token ids whose log-probabilities at the first generated position are returned too
    (the same forward that picks the first token: forced choice gets its letter log-probs for free)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    results: list[Generation | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        inputs = left_pad([prompts[i] for i in batch], pad_id, device)
        targets = [first_targets[i] for i in batch] if first_targets is not None else None
        stops = [stop[i] for i in batch] if isinstance(stop, Sequence) else [stop] * len(batch)
        for i, generation in zip(
            batch, _greedy_batch(model, tokenizer, inputs, max_new_tokens, eos, stops, targets)
        ):
            results[i] = generation
    return results  # type: ignore[return-value]


# Queue the next decoding step before reading the current one on CPU too (off: on a CPU nothing runs
# asynchronously, so it would only add a discarded forward); tests switch it on to check that path.
_QUEUE_AHEAD = False


def _greedy_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: torch.Tensor,
    stops: Sequence[Callable[[str], bool] | None],
    first_targets: list[Sequence[int]] | None,
) -> list[Generation]:
    """Greedy decoding of one left-padded batch.

    Speed without changing a number: every step runs the same forward on the same rows as a plain loop
    would (finished rows are still fed, so no tensor shape changes), the step's token ids and end flags
    come to the host in one transfer, and on a GPU the next step's forward is queued before the host
    reads the current step's tokens, so the stop predicates and row bookkeeping run while the GPU works
    (when every row has ended, that one queued forward is discarded)."""
    n = inputs["input_ids"].shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    first: list[list[float]] = [[] for _ in range(n)]
    open_rows = list(range(n))
    overlap = inputs["input_ids"].device.type == "cuda"
    host = torch.empty((2, n), dtype=torch.long, pin_memory=True) if overlap else None

    def forward(step_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        return model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )

    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    out = forward(inputs["input_ids"], mask, positions, None)
    for step in range(max_new_tokens):
        cache = output_cache(out)
        logits = out.logits[:, -1]
        if step == 0 and first_targets is not None:
            first = _gather_logprobs(logits, first_targets)
        chosen = logits.argmax(-1)
        picked = torch.stack([chosen, torch.isin(chosen, eos).long()])
        last = step + 1 == max_new_tokens
        if not last:
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
            positions = positions[:, -1:] + 1
        queued = None
        if overlap:
            host.copy_(picked, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if (overlap or _QUEUE_AHEAD) and not last:
            queued = forward(chosen[:, None], mask, positions, cache)
        if overlap:
            copied.synchronize()
            chosen_ids, ended = host.tolist()
        else:
            chosen_ids, ended = picked.tolist()
        still_open = []
        for row in open_rows:
            if ended[row]:
                finish[row] = "eos"
                continue
            tokens[row].append(chosen_ids[row])
            if stops[row] is not None and stops[row](tokenizer.decode(tokens[row], skip_special_tokens=True)):
                finish[row] = "stop"
                continue
            still_open.append(row)
        open_rows = still_open
        if not open_rows or last:
            break
        out = queued if queued is not None else forward(chosen[:, None], mask, positions, cache)
    return [
        Generation(
            text=tokenizer.decode(tokens[row], skip_special_tokens=True),
            token_ids=tokens[row],
            finish=finish[row] or "length",
            first_logprobs=first[row],
        )
        for row in range(n)
    ]
