"""Greedy decoding of one left-padded batch: the generation half of the scoring engine (`lbt.eval.scoring`).

A row stops at an end-of-turn token (the tokenizer's and the generation config's, `eos_token_ids`) or as
soon as its stop predicate holds on its text so far (e.g. an answer letter was parsed), and the batch
stops once every row has. Because a row's text is cut exactly where its own stop condition first holds,
the result does not depend on which rows share its batch.

The decoding steps run eagerly (the reference, `_greedy_batch`), or as one fixed-shape step over a static
cache, recorded in a CUDA graph on a GPU (`lbt.eval.static_decode`; `set_decode`, `hardware.fast.decode`):
the same rows, without the host's ~50 ms of Python and kernel launches per step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lbt.choices import DECODE_MODES
from lbt.eval.batching import (
    cache_kwargs,
    eos_token_ids,
    gather_logprobs,
    has_forward_hooks,
    model_device,
    output_cache,
)
from lbt.eval.static_decode import greedy_batch_static, static_unsupported
from lbt.fast_settings import FastSetting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One greedy continuation: decoded text (special tokens dropped), its token ids, why it ended
    ("eos", "stop": the stop predicate held, "length": max_new_tokens reached), and, when asked for,
    the log-probabilities of given tokens at the first generated position."""

    text: str
    token_ids: list[int]
    finish: str
    first_logprobs: list[float] = field(default_factory=list)



# The mode generation uses when the engine names none (`hardware.fast.decode`, through `set_decode`).
DECODE = FastSetting("decode", "eager", DECODE_MODES)


def set_decode(mode: str | None) -> None:
    """How generation runs its decoding steps when the engine names no mode (`hardware.fast.decode`):

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
    DECODE.set(mode)


def decode_mode(model: torch.nn.Module, mode: str | None = None) -> str:
    """The mode a generation runs in: `mode`, else the `set_decode` mode (eager by default); a model the
    static cache cannot serve runs eager; graph off CUDA, or on a model with forward hooks, runs static."""
    device = model_device(model)
    chosen = mode or DECODE.get()
    if chosen not in DECODE_MODES:
        raise ValueError(f"decode={chosen!r}: use one of {list(DECODE_MODES)}")
    if chosen == "eager":
        return chosen
    reason = static_unsupported(model)
    if reason is not None:
        _log_once(f"decode={chosen}: {reason}; decoding eagerly")
        return "eager"
    if chosen == "graph" and device.type != "cuda":
        return "static"
    if chosen == "graph" and has_forward_hooks(model):
        # A hook's Python runs once, while the graph is recorded (e.g. a probe intervention's on/off
        # predicate or position offsets); uncaptured steps run it every step.
        _log_once("decode=graph: the model has forward hooks; decoding static steps without a CUDA graph")
        return "static"
    return chosen


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def decode_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    stops: Sequence[Callable[[str], bool] | None],
    first_targets: list[Sequence[int]] | None = None,
    mode: str | None = None,
    limits: Sequence[int] | None = None,
) -> list[Generation]:
    """Greedy continuations of one left-padded batch (`inputs` from `left_pad`), one per row.
    first_targets: per row, token ids whose log-probabilities at the first generated position come back
    too (the forward that picks the first token: forced choice gets its letter log-probs for free).
    mode: eager | static | graph (see `set_decode`); None: the process default. It is resolved here, inside
    whatever intervention the caller entered, so a model with hooks is never recorded in a CUDA graph.
    limits: per row, its own max_new_tokens (≤ max_new_tokens): a row ends at its limit exactly as it would
    in a batch decoded to that length, so requests of different lengths share one decoding loop."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    n = inputs["input_ids"].shape[0]
    limits = list(limits) if limits is not None else [max_new_tokens] * n
    if len(limits) != n or not all(1 <= limit <= max_new_tokens for limit in limits):
        raise ValueError(f"limits must give each of the {n} rows a length in 1..{max_new_tokens}")
    resolved = decode_mode(model, mode)
    eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=inputs["input_ids"].device)
    rows = _Rows(n, tokenizer, stops, limits)
    if resolved == "eager":
        _greedy_batch(model, inputs, max_new_tokens, eos, rows, first_targets)
    else:
        greedy_batch_static(model, inputs, max_new_tokens, eos, rows, first_targets, graph=resolved == "graph")
    return rows.generations()


class _Rows:
    """The host side of a batch's greedy decoding, the same in every mode: each row's tokens, why it
    ended, its stop predicate and its length limit, fed one step's chosen token and end flag per row at a
    time."""

    def __init__(self, n: int, tokenizer: PreTrainedTokenizerBase, stops: Sequence[Callable[[str], bool] | None],
                 limits: Sequence[int]):
        self.tokenizer, self.stops, self.limits = tokenizer, stops, limits
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
            if len(self.tokens[row]) < self.limits[row]:
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
    # The prompt's forward takes `inputs` whole: with shared prefixes they hold the prefixes' cache too.
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    for step in range(max_new_tokens):
        cache = output_cache(out)
        logits = out.logits[:, -1]
        if step == 0 and first_targets is not None:
            rows.first = gather_logprobs(logits, first_targets)
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


