"""The scoring engine: the stance battery, the capability checks, the probe's measurements and the causal
suite all read the model through `Engine`; they only build requests (and, for the causal suite, an
intervention).

Requests hold token ids, already rendered with the chat template:

- `NextToken(prompt, targets)`: log P(t | prompt) for every target id t, from one forward whose logits are
  kept at the last position only (`logits_to_keep=1`) — options that are one token (answer letters).
- `Continuation(prompt, options)`: per-token log-probabilities of multi-token options after the prompt.
  The prompt runs once (its key/value cache is kept) and every option's tokens then run against a copy of
  that cache, so a prompt with two options costs one prompt forward, not two.
- `Greedy(prompt, max_new_tokens, stop, first_targets)`: greedy text until an end-of-turn token (the
  tokenizer's and the generation config's), the request's stop predicate, or max_new_tokens
  (`lbt.eval.decode`); first_targets' log-probabilities at the first generated position come from the
  same forward that picks the first token.

Batching. Requests are sorted by prompt length (longest first: an out-of-memory error shows at once),
left-padded so that rows never see each other (`lbt.eval.batching`), and answers come back in request
order; a row's numbers equal one-at-a-time scoring up to float rounding. A call that runs out of GPU
memory is run again with half the batch, down to one prompt; the smaller batch stays with the engine, so
later calls do not fail again. Rows do not depend on the batch, so a retry changes no number.

Interventions. `intervention(batch)` returns a context manager that is entered around every forward of
one batch (the prompt's and every decoding step's): steering, directional ablation and activation
patching (`lbt.probe.hooks`). `PaddedBatch` tells it which requests the batch holds and its width: the
answer position (the last prompt token, whose output picks the first new token) is column width − 1 in
every row, generated tokens follow from column width.

Option forms: `option_text` / `encode_option` make the form explicit: `bare` is what a model emits right
after the chat template's generation prompt ("A"), `leading_space` is the original study's form (" A",
" Approve").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from lbt.choices import OPTION_FORMS
from lbt.eval import prefix
from lbt.eval.batching import (
    cache_kwargs,
    gather_logprobs,
    left_pad,
    length_batches,
    model_device,
    output_cache,
    pad_id_of,
    right_pad,
)
from lbt.eval.decode import DECODE_MODES, Generation, decode_batch, set_decode
from lbt.eval.prefix import set_share_prefix

# The engine's settings travel with it: `lbt.config` checks `hardware.fast.decode` against DECODE_MODES, and
# `lbt.train` / `lbt.evaluate` apply it and `hardware.fast.share_prefix` through
# lbt.eval.battery.apply_fast_settings (set_decode, set_share_prefix).
__all__ = [
    "DECODE_MODES",
    "OPTION_FORMS",
    "Continuation",
    "Engine",
    "Generation",
    "Greedy",
    "Intervention",
    "NextToken",
    "OptionError",
    "PaddedBatch",
    "encode_option",
    "greedy_generate",
    "no_intervention",
    "option_text",
    "set_decode",
    "set_share_prefix",
]

log = logging.getLogger(__name__)

PADDINGS = {"left": left_pad, "right": right_pad}
T = TypeVar("T")


class OptionError(ValueError):
    """An option string that the tokenizer cannot express in the form a measure needs."""


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


# -- requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextToken:
    prompt: Sequence[int]
    targets: Sequence[int]


@dataclass(frozen=True)
class Continuation:
    prompt: Sequence[int]
    options: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Greedy:
    prompt: Sequence[int]
    max_new_tokens: int
    stop: Callable[[str], bool] | None = None
    first_targets: Sequence[int] = ()


@dataclass(frozen=True)
class PaddedBatch:
    """One batch as the model sees it: requests `indices` (in batch row order), padded to `width` columns
    (left-padded unless `map_batches` was asked for right padding)."""

    indices: list[int]
    width: int


Intervention = Callable[[PaddedBatch], AbstractContextManager[Any]]


def no_intervention(batch: PaddedBatch) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


# -- the engine -----------------------------------------------------------------------------------------


class Engine:
    """Answers requests on one model in batches of up to `batch_size` prompts (halved on out-of-memory).

    tokenizer: decodes generated text and gives the pad id; `pad` overrides the pad id (log-likelihood
    requests need no tokenizer). decode: eager | static | graph for generation (None: the process
    default, `set_decode`). share_prefix: whether next_token, continuation and generate run prompts'
    shared prefixes once (`lbt.eval.prefix`; None: the process default, `set_share_prefix`). The caller
    puts the model in `lbt.model.modes.evaluation_mode`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 32,
        pad: int | None = None,
        decode: str | None = None,
        share_prefix: bool | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.decode = model, tokenizer, int(batch_size), decode
        self.pad_id = int(pad) if pad is not None else pad_id_of(tokenizer)
        self.share_prefix = share_prefix

    def _shares(self, intervention: Intervention | None) -> bool:
        """Whether this call's prompts share their prefixes (`lbt.eval.prefix`): asked for (the engine's
        setting, else the process default), no intervention, and a model that allows it."""
        asked = self.share_prefix if self.share_prefix is not None else prefix.share_prefix_default()
        return asked and intervention is None and prefix.usable(self.model)

    def next_token(
        self, requests: Sequence[NextToken], intervention: Intervention | None = None
    ) -> list[list[float]]:
        """log P(target | prompt) for every target of every request."""

        def score(batch: PaddedBatch, inputs: dict[str, Any]) -> list[list[float]]:
            logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            return gather_logprobs(logits, [requests[i].targets for i in batch.indices])

        return self.map_batches([r.prompt for r in requests], score, intervention, share=self._shares(intervention))

    def continuation(
        self, requests: Sequence[Continuation], intervention: Intervention | None = None
    ) -> list[list[list[float]]]:
        """result[i][j][t] = log P(options[j][t] | prompt + options[j][:t]) of request i."""

        def score(batch: PaddedBatch, inputs: dict[str, Any]) -> list[list[list[float]]]:
            options = [requests[i].options for i in batch.indices]
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            # The first option token is read off the prompt's last position.
            firsts = gather_logprobs(out.logits[:, -1], [[opt[0] for opt in row] for row in options])
            result = [[[value] for value in values] for values in firsts]
            # Rows for the options' later tokens: (batch row, option index) pairs with ≥ 2 tokens.
            pairs = [(row, j) for row, opts in enumerate(options) for j, opt in enumerate(opts) if len(opt) > 1]
            if pairs:
                tails = self._option_tails(output_cache(out), inputs, [list(options[r][j]) for r, j in pairs],
                                           [r for r, _ in pairs])
                for (row, j), values in zip(pairs, tails):
                    result[row][j].extend(values)
            return result

        return self.map_batches([r.prompt for r in requests], score, intervention, share=self._shares(intervention))

    def generate(self, requests: Sequence[Greedy], intervention: Intervention | None = None) -> list[Generation]:
        """Greedy continuations in request order (see `lbt.eval.decode.decode_batch`). Requests whose
        max_new_tokens lie within LENGTH_SPREAD of each other share decoding loops, each row ending at its
        own length (forced choice's 8 tokens and Likert's 12 in one loop; open-ended text's 256 in another)."""
        if self.tokenizer is None:
            raise ValueError("generation needs the engine's tokenizer")
        results: list[Generation | None] = [None] * len(requests)
        share = self._shares(intervention)
        for members in length_buckets([r.max_new_tokens for r in requests]):

            def decode(batch: PaddedBatch, inputs: dict[str, Any], members=members):
                chosen = [requests[members[i]] for i in batch.indices]
                limits = [r.max_new_tokens for r in chosen]
                return decode_batch(self.model, self.tokenizer, inputs, max(limits), [r.stop for r in chosen],
                                    [list(r.first_targets) for r in chosen], self.decode, limits)

            def around(batch: PaddedBatch, members=members) -> AbstractContextManager[Any]:
                # The intervention sees request indices, not positions within this group.
                return (intervention or no_intervention)(PaddedBatch([members[i] for i in batch.indices], batch.width))

            prompts = [requests[i].prompt for i in members]
            for i, generation in zip(members, self.map_batches(prompts, decode, None if share else around,
                                                               share=share)):
                results[i] = generation
        return results  # type: ignore[return-value]

    def map_batches(
        self,
        prompts: Sequence[Sequence[int]],
        score: Callable[[PaddedBatch, dict[str, Any]], Sequence[T]],
        intervention: Intervention | None = None,
        padding: str = "left",
        share: bool = False,
    ) -> list[T]:
        """score(batch, inputs) → one answer per row, over batches of similar length, inside
        intervention(batch), without gradients; answers in prompt order. On a GPU out-of-memory error the
        whole call runs again with half the batch. padding: "left" (prompts to continue; inputs hold
        input_ids, attention_mask and position_ids counting real tokens) or "right" (teacher-forced text
        read from column 0; input_ids and attention_mask). share: prompts that open alike run their
        common prefix once (`lbt.eval.prefix`, left padding only): inputs then also hold that prefix's
        key/value cache under the model's cache argument, and the mask covers its columns too, so `score`
        must pass `inputs` to the model whole."""
        if padding not in PADDINGS:
            raise ValueError(f"padding={padding!r}: use one of {sorted(PADDINGS)}")
        if share and padding != "left":
            raise ValueError("prefix sharing continues left-padded prompts only")
        while True:
            try:
                if share:
                    return self._map_shared(prompts, score)
                return self._map(prompts, score, intervention or no_intervention, PADDINGS[padding])
            except torch.cuda.OutOfMemoryError:
                if self.batch_size <= 1:
                    raise
                failed = self.batch_size
            # Out of the except block: the error's traceback (and the tensors its frames hold) is released.
            self.batch_size = max(1, failed // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("scoring: out of GPU memory at %d prompts per batch; retrying with %d", failed,
                        self.batch_size)

    @torch.no_grad()
    def _map(self, prompts, score, intervention: Intervention, pad: Callable[..., dict[str, torch.Tensor]]) -> list:
        device = model_device(self.model)
        results: list = [None] * len(prompts)
        for indices in length_batches([len(p) for p in prompts], self.batch_size):
            inputs = pad([prompts[i] for i in indices], self.pad_id, device)
            batch = PaddedBatch(indices, inputs["input_ids"].shape[1])
            with intervention(batch):
                answers = score(batch, inputs)
            for i, answer in zip(indices, answers):
                results[i] = answer
        return results

    @torch.no_grad()
    def _map_shared(self, prompts, score) -> list:
        """`_map` with shared prefixes: a batch keeps a group's prompts together; one that would gain too
        little (`prefix.worth_sharing`) runs its prompts whole."""
        device = model_device(self.model)
        plan = prefix.plan_prefixes(prompts)
        results: list = [None] * len(prompts)
        for indices in prefix.shared_batches(plan, prompts, self.batch_size):
            if prefix.worth_sharing(plan, prompts, indices):
                inputs = prefix.shared_inputs(self.model, plan, prompts, indices, self.pad_id, device)
            else:
                inputs = left_pad([prompts[i] for i in indices], self.pad_id, device)
            answers = score(PaddedBatch(indices, inputs["input_ids"].shape[1]), inputs)
            for i, answer in zip(indices, answers):
                results[i] = answer
        return results

    def _option_tails(
        self, cache: Any, prompt_inputs: dict[str, torch.Tensor], tails: list[list[int]], rows: list[int]
    ) -> list[list[float]]:
        """log P of option tokens [1 .. m-1], feeding tokens [0 .. m-2] after the cached prompts of `rows`
        (right-padded: pads come after every real token, so causal attention never lets them change a real
        position)."""
        device = prompt_inputs["input_ids"].device
        index = torch.tensor(rows, device=device)
        cache.batch_select_indices(index)
        width = max(len(t) for t in tails) - 1
        input_ids = torch.full((len(tails), width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(tails), width), dtype=torch.long)
        for k, tail in enumerate(tails):
            input_ids[k, : len(tail) - 1] = torch.tensor(tail[:-1])
            tail_mask[k, : len(tail) - 1] = 1
        prompt_mask = prompt_inputs["attention_mask"][index]
        start = prompt_mask.sum(-1, keepdim=True)  # the first option token's position = prompt length
        logits = self.model(
            input_ids=input_ids.to(device),
            attention_mask=torch.cat([prompt_mask, tail_mask.to(device)], dim=-1),
            position_ids=start + torch.arange(width, device=device)[None, :],
            use_cache=True,
            **cache_kwargs(self.model, cache),
        ).logits
        # Only the real (row, position) pairs go through log_softmax (each vocabulary row is normalised on
        # its own, so leaving the pad positions out changes no value), and one transfer brings all back.
        ks = [k for k, tail in enumerate(tails) for _ in tail[1:]]
        ts = [t for tail in tails for t in range(len(tail) - 1)]
        picked = logits[torch.tensor(ks, device=device), torch.tensor(ts, device=device)]
        values = gather_logprobs(picked, [[token] for tail in tails for token in tail[1:]])
        out, start_at = [], 0
        for tail in tails:
            out.append([v[0] for v in values[start_at : start_at + len(tail) - 1]])
            start_at += len(tail) - 1
        return out


# Requests whose max_new_tokens are at most this factor apart decode in one loop: a short request then
# costs at most this many times its own steps, and a loop's fixed cost (the prompt's forward is not one,
# but recording a CUDA graph and the host's bookkeeping are) is paid once.
LENGTH_SPREAD = 2


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Request indices grouped by max_new_tokens: ascending lengths, a new group once a length exceeds
    LENGTH_SPREAD times its group's shortest."""
    buckets: list[tuple[int, list[int]]] = []
    for length in sorted(set(lengths)):
        if not buckets or length > LENGTH_SPREAD * buckets[-1][0]:
            buckets.append((length, []))
        buckets[-1][1].append(length)
    bucket_of = {length: k for k, (_, members) in enumerate(buckets) for length in members}
    out: list[list[int]] = [[] for _ in buckets]
    for i, length in enumerate(lengths):
        out[bucket_of[length]].append(i)
    return out


# -- one call ---------------------------------------------------------------------------------------------


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
    """`Engine.generate` in one call (the benchmarks' and tests' form): one stop predicate for all prompts
    or one per prompt."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    stops = list(stop) if isinstance(stop, Sequence) else [stop] * len(prompts)
    firsts = first_targets if first_targets is not None else [()] * len(prompts)
    engine = Engine(model, tokenizer, batch_size, decode=decode)
    return engine.generate([Greedy(p, max_new_tokens, s, f) for p, s, f in zip(prompts, stops, firsts)])
