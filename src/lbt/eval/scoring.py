"""Scoring primitives of the stance battery: batched, left-padded, and equal to one-at-a-time scoring.

Three operations, each over many prompts at once (token ids, already rendered with the chat template):

- `next_token_logprobs`: one forward per prompt, logits at the last position only (`logits_to_keep=1`),
  log-probabilities of given token ids — the fast path for options that are one token.
- `continuation_logprobs`: per-token log-probabilities of multi-token options after a prompt. The prompt
  runs once (its key/value cache is kept) and every option's tokens then run against a copy of that
  cache, so a prompt with two options costs one prompt forward, not two.
- `greedy_generate`: batched greedy decoding with a key/value cache; a row stops at an end-of-sequence
  token or as soon as its `stop` predicate holds (e.g. an answer letter was parsed), and the batch stops
  once every row has stopped. Its decoding steps run eagerly (the reference), or as one fixed-shape step
  over a static cache, recorded in a CUDA graph on a GPU (`set_decode`, `hardware.fast.decode`): the same
  rows, without the host's ~50 ms of Python and kernel launches per step.

Why the numbers equal one-at-a-time scoring: prompts are left-padded, the attention mask hides the pads
and `position_ids` count real tokens only, so every row sees exactly its own tokens at their own
positions; rows never interact. What remains is float rounding (≈1e-6 in fp32), which the tests bound.
Prompts are sorted by length before batching (less padding) and results come back in input order.

Options are token sequences chosen by the caller; `option_text` / `encode_option` make the option form
explicit: `bare` is what a model emits right after the chat template's generation prompt ("A"),
`leading_space` is the original study's form (" A", " Approve").
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers import __version__ as transformers_version

log = logging.getLogger(__name__)

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

DECODE_MODES = ("eager", "static", "graph")

# The mode `greedy_generate` uses when a call names none (`hardware.fast.decode`, through `set_decode`).
_DECODE: str | None = None


def set_decode(mode: str | None) -> None:
    """How `greedy_generate` runs its decoding steps when a call names no mode (`hardware.fast.decode`):

    eager   the reference: a key/value cache that grows by one position a step, each step's forward issued
            from Python;
    static  a preallocated (static) key/value cache and one fixed-shape step that updates its own inputs,
            positions, mask and cache slot in place;
    graph   that static step recorded once per batch in a CUDA graph and replayed for every later step: a
            step then costs the GPU's time instead of the host's (≈ 5,000 kernel launches per 8 steps of a
            3B model); on a device without CUDA it runs as `static`.
    None    eager (graph becomes the GPU default once a whole job has run with it on a GPU).

    Every mode computes the same rows (tokens, texts, finish reasons, first-step log-probabilities): the
    prompt runs the same forward in all three, every step attends to exactly the row's own positions, and
    rows never see each other. In fp32 they are identical (tests/test_decode.py on a CPU; on a GPU
    benchmarks/decode_graph.py); in bf16 the static step's attention kernel rounds differently from the
    eager one's, so a near-tie argmax can flip, as between any two batchings (benchmarks/RESULTS.md)."""
    if mode is not None and mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r}: use one of {list(DECODE_MODES)}")
    global _DECODE
    _DECODE = mode


def decode_mode(model: torch.nn.Module, mode: str | None = None) -> str:
    """The mode a generation runs in: `mode`, else the `set_decode` mode, else eager; a model the static cache cannot serve runs eager; graph off CUDA, or on a model with
    forward hooks, runs static."""
    device = model_device(model)
    chosen = mode or _DECODE or "eager"
    if chosen not in DECODE_MODES:
        raise ValueError(f"decode={chosen!r}: use one of {list(DECODE_MODES)}")
    if chosen == "eager":
        return chosen
    reason = _static_unsupported(model)
    if reason is not None:
        _log_once(f"decode={chosen}: {reason}; decoding eagerly")
        return "eager"
    if chosen == "graph" and device.type != "cuda":
        return "static"
    if chosen == "graph" and any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        # A hook's Python runs once, while the graph is recorded (e.g. a probe intervention's on/off
        # predicate or position offsets); uncaptured steps run it every step.
        _log_once("decode=graph: the model has forward hooks; decoding static steps without a CUDA graph")
        return "static"
    return chosen


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _static_unsupported(model: torch.nn.Module) -> str | None:
    """Why the static path cannot serve this model, or None. It relies on transformers 5's StaticCache
    (one write position for all rows, kept on the device), sdpa's boolean masks and full attention in
    every layer, and runs the model in eval mode (dropout would need the graph's own RNG)."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return "transformers has no StaticCache"
    if int(transformers_version.split(".")[0]) < 5:
        return f"transformers {transformers_version} < 5"
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return "the model has no config"
    if model.training:
        return "the model is in training mode"
    if getattr(base, "hf_quantizer", None) is not None:
        return "quantized weights"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(config, '_attn_implementation', None)!r} (static decoding passes sdpa masks)"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} (static decoding masks full attention only)"
    return None


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    stop: Callable[[str], bool] | Sequence[Callable[[str], bool]] | None = None,
    first_targets: Sequence[Sequence[int]] | None = None,
    decode: str | None = None,
) -> list[Generation]:
    """Greedy continuations of every prompt, in input order.

    A row ends at an end-of-turn token (not included in its text), when `stop(text so far)` holds (one
    predicate for all rows, or one per prompt), or after max_new_tokens; the batch ends when all rows
    have. Because a row's text is cut exactly where its own stop condition first holds, the result does
    not depend on which rows share its batch.
    first_targets: token ids whose log-probabilities at the first generated position are returned too
    (the same forward that picks the first token: forced choice gets its letter log-probs for free).
    decode: eager | static | graph (see `set_decode`); None: the process default."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = model_device(model)
    mode = decode_mode(model, decode)
    pad_id = _pad_id(tokenizer)
    eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    results: list[Generation | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        inputs = left_pad([prompts[i] for i in batch], pad_id, device)
        targets = [first_targets[i] for i in batch] if first_targets is not None else None
        stops = [stop[i] for i in batch] if isinstance(stop, Sequence) else [stop] * len(batch)
        rows = _Rows(len(batch), tokenizer, stops)
        if mode == "eager":
            _greedy_batch(model, inputs, max_new_tokens, eos, rows, targets)
        else:
            _greedy_batch_static(model, inputs, max_new_tokens, eos, rows, targets, graph=mode == "graph")
        for i, generation in zip(batch, rows.generations()):
            results[i] = generation
    return results  # type: ignore[return-value]


class _Rows:
    """The host side of a batch's greedy decoding, the same in every mode: each row's tokens, why it
    ended, and its stop predicate, fed one step's chosen token and end flag per row at a time."""

    def __init__(self, n: int, tokenizer: PreTrainedTokenizerBase, stops: Sequence[Callable[[str], bool] | None]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.first: list[list[float]] = [[] for _ in range(n)]
        self.open = list(range(n))

    def take(self, chosen_ids: list[int], ended: list[int]) -> bool:
        """Record one step; True while some row is still open."""
        still_open = []
        for row in self.open:
            if ended[row]:
                self.finish[row] = "eos"
                continue
            self.tokens[row].append(chosen_ids[row])
            stop = self.stops[row]
            if stop is not None and stop(self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)):
                self.finish[row] = "stop"
                continue
            still_open.append(row)
        self.open = still_open
        return bool(still_open)

    def generations(self) -> list[Generation]:
        return [
            Generation(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=tokens,
                finish=finish or "length",
                first_logprobs=first,
            )
            for tokens, finish, first in zip(self.tokens, self.finish, self.first)
        ]


# Queue the next decoding step before reading the current one on CPU too (off: on a CPU nothing runs
# asynchronously, so it would only add a discarded forward); tests switch it on to check that path.
_QUEUE_AHEAD = False


def _greedy_batch(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: torch.Tensor,
    rows: _Rows,
    first_targets: list[Sequence[int]] | None,
) -> None:
    """Greedy decoding of one left-padded batch, eagerly (the reference path).

    Speed without changing a number: every step runs the same forward on the same rows as a plain loop
    would (finished rows are still fed, so no tensor shape changes), the step's token ids and end flags
    come to the host in one transfer, and on a GPU the next step's forward is queued before the host
    reads the current step's tokens, so the stop predicates and row bookkeeping run while the GPU works
    (when every row has ended, that one queued forward is discarded)."""
    n = inputs["input_ids"].shape[0]
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
            rows.first = _gather_logprobs(logits, first_targets)
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
        if not rows.take(chosen_ids, ended) or last:
            break
        out = queued if queued is not None else forward(chosen[:, None], mask, positions, cache)


# Decoding steps the host issues ahead of the one whose tokens it reads (static and graph modes on a
# GPU), so that the stop predicates (a decode of every open row's text) run while the GPU works. Steps
# issued past the batch's end are discarded (at most this many forwards). Without stop predicates it
# made no measurable difference (benchmarks/RESULTS.md, graph-ahead0).
_STEPS_AHEAD = 3
# Fewer decoding steps than this after the prompt run as `static`: recording the graph costs about as
# much host time as one eager step, so it repays itself from the third step on.
_MIN_GRAPH_STEPS = 3


def _greedy_batch_static(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: torch.Tensor,
    rows: _Rows,
    first_targets: list[Sequence[int]] | None,
    graph: bool,
) -> None:
    """Greedy decoding of one left-padded batch over a static key/value cache, the step optionally
    recorded in a CUDA graph.

    The prompt runs exactly as in `_greedy_batch` (same forward, same cache, so the first token and
    `first_targets` log-probabilities are the same numbers); its keys and values are then copied into a
    static cache of prompt width + max_new_tokens - 1 positions, and every later step is one fixed-shape
    `_StaticStep`. Tokens reach the host through pinned memory, read a few steps behind the GPU."""
    n = inputs["input_ids"].shape[0]
    device = inputs["input_ids"].device
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    if first_targets is not None:
        rows.first = _gather_logprobs(logits, first_targets)
    chosen = logits.argmax(-1)
    chosen_ids, ended = torch.stack([chosen, torch.isin(chosen, eos).long()]).tolist()
    if not rows.take(chosen_ids, ended) or max_new_tokens == 1:
        return
    steps = max_new_tokens - 1  # forwards after the prompt's
    step = _StaticStep(model, output_cache(out), inputs, chosen, eos, steps)
    del out, logits
    if device.type != "cuda":
        for _ in range(steps):
            step()
            if not rows.take(*step.picked.tolist()):
                return
        return
    host = torch.empty((steps, 2, n), dtype=torch.long, pin_memory=True)
    replay: Callable[[], object] = step
    pending: collections.deque[tuple[int, torch.cuda.Event]] = collections.deque()
    issued = 0
    while True:
        while issued < steps and len(pending) <= _STEPS_AHEAD:
            if issued == 0 and graph and steps >= _MIN_GRAPH_STEPS:
                replay = _record(step)  # runs the first step, then records it
            else:
                replay()
            host[issued].copy_(step.picked, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            pending.append((issued, copied))
            issued += 1
        if not pending:
            break
        index, copied = pending.popleft()
        copied.synchronize()
        if not rows.take(*host[index].tolist()):
            break
    # Steps queued past the end still run: let them finish before their graph and cache are freed.
    torch.cuda.current_stream(device).synchronize()


class _StaticStep:
    """One decoding step with fixed shapes and addresses: it reads the previous step's tokens from `ids`,
    writes its own there (and tokens + end flags to `picked`), and advances positions, mask and cache
    slot in place, so the same call, recorded once in a CUDA graph, replays every later step.

    Every row writes its new key/value at the same slot (prompt width + step; the prompts are
    left-padded to one width), and a boolean mask over the whole static cache lets each row see its
    own prompt tokens and the generated slots so far, as the eager path's growing 2D mask does."""

    def __init__(self, model: torch.nn.Module, prompt_cache: Any, inputs: dict[str, torch.Tensor],
                 chosen: torch.Tensor, eos: torch.Tensor, steps: int):
        from transformers import StaticCache

        n, width = inputs["input_ids"].shape
        device = chosen.device
        self.model, self.eos = model, eos
        self.cache = StaticCache(config=_base_model(model).config, max_cache_len=width + steps)
        for index, layer in enumerate(prompt_cache.layers):
            self.cache.update(layer.keys, layer.values, index)
        self.ids = chosen[:, None].clone()
        self.positions = inputs["position_ids"][:, -1:] + 1
        self.valid = torch.zeros((n, width + steps), dtype=torch.bool, device=device)
        self.valid[:, :width] = inputs["attention_mask"].bool()
        self.slot = torch.full((1,), width, dtype=torch.long, device=device)
        self.picked = torch.empty((2, n), dtype=torch.long, device=device)

    def __call__(self) -> torch.Tensor:
        """One step; returns its last-position logits (a graph's replay returns nothing: read `picked`)."""
        self.valid.index_fill_(1, self.slot, True)
        with _grouped_attention(self.model) if _GROUPED_ATTENTION else contextlib.nullcontext():
            logits = self.model(
                input_ids=self.ids,
                attention_mask=self.valid[:, None, None, :],
                position_ids=self.positions,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, self.cache),
            ).logits[:, -1]
        chosen = logits.argmax(-1)
        self.ids.copy_(chosen[:, None])
        self.picked[0].copy_(chosen)
        self.picked[1].copy_(torch.isin(chosen, self.eos))
        self.positions.add_(1)
        self.slot.add_(1)
        return logits


# The static step's attention reads each key/value head once for all the query heads that share it
# (`_grouped_decode_attention`); off: transformers' sdpa path, which copies keys and values to every
# query head whenever a mask is given (8x the cache traffic for Qwen2.5-3B's 16 query / 2 key-value heads).
_GROUPED_ATTENTION = True
_GROUPED = "lbt_grouped_decode"


def _grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa for one new position per row: the query heads that share a key/value head become that head's
    query rows, (batch, kv_heads, heads/kv_heads, dim), so the same scores come from keys and values read
    in place. A mask of shape (batch, 1, 1, keys) applies to every one of those rows alike."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads % kv_heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _grouped_attention(model: torch.nn.Module):
    """Inside the block the model's attention layers call `_grouped_decode_attention` (transformers looks
    the attention function up by the config's name on every forward; a CUDA graph keeps what it recorded)."""
    from transformers import AttentionInterface

    if _GROUPED not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GROUPED, _grouped_decode_attention)
    config = _base_model(model).config
    saved = config._attn_implementation
    config._attn_implementation = _GROUPED
    try:
        yield
    finally:
        config._attn_implementation = saved


def _record(step: _StaticStep) -> Callable[[], object]:
    """Run `step` once on a side stream (the real first decoding step, and the warm-up a CUDA graph
    needs), then record it in a graph; returns the graph's replay. Autocast (a training job evaluates
    under bf16 autocast) caches no weight casts while recording: the graph casts the adapters' fp32
    weights itself, instead of reading a cached copy that autocast frees when its block ends."""
    device = step.ids.device
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    autocast = (
        torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        if torch.is_autocast_enabled("cuda")
        else contextlib.nullcontext()
    )
    with torch.cuda.stream(side), autocast:
        step()
        side.synchronize()
        graph.capture_begin(capture_error_mode="thread_local")  # other threads' CUDA calls stay allowed
        try:
            step()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph.replay
