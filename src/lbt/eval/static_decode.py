"""Static-cache greedy decoding, optionally recorded in a CUDA graph (`hardware.fast.decode`: static, graph).

The prompt runs exactly as on the eager path; its keys and values are then copied into a preallocated
cache, and every later step is one fixed-shape `_StaticStep` that updates its own inputs, positions, mask
and cache slot in place, so one recorded CUDA graph replays every step. The rows are those of the eager
path (`lbt.eval.decode`); see `set_decode` there for when each mode runs.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import __version__ as transformers_version

from lbt.eval.batching import attention_kinds, base_model_of, cache_kwargs, gather_logprobs, output_cache


def static_unsupported(model: torch.nn.Module) -> str | None:
    """Why the static path cannot serve this model, or None. It relies on transformers 5's StaticCache
    (one write position for all rows, kept on the device), sdpa's boolean masks and full attention in
    every layer, and runs the model in eval mode (dropout would need the graph's own RNG)."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return "transformers has no StaticCache"
    if int(transformers_version.split(".")[0]) < 5:
        return f"transformers {transformers_version} < 5"
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is None:
        return "the model has no config"
    if model.training:
        return "the model is in training mode"
    if getattr(base, "hf_quantizer", None) is not None:
        return "quantized weights"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(config, '_attn_implementation', None)!r} (static decoding passes sdpa masks)"
    kinds = attention_kinds(config)
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (static decoding masks full attention only)"
    return None


# GPU), so that the stop predicates (a decode of every open row's text) run while the GPU works. Steps
# issued past the batch's end are discarded (at most this many forwards). Without stop predicates it
# made no measurable difference (benchmarks/RESULTS.md, graph-ahead0).
_STEPS_AHEAD = 3
# Fewer decoding steps than this after the prompt run as `static`: recording the graph costs about as
# much host time as one eager step, so it repays itself from the third step on.
_MIN_GRAPH_STEPS = 3


def greedy_batch_static(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos: torch.Tensor,
    rows: Any,  # lbt.eval.decode._Rows: the host side of the batch
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
        rows.first = gather_logprobs(logits, first_targets)
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

        n, width = inputs["attention_mask"].shape  # wider than input_ids when a shared prefix is cached
        device = chosen.device
        self.model, self.eos = model, eos
        self.cache = StaticCache(config=base_model_of(model).config, max_cache_len=width + steps)
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
    config = base_model_of(model).config
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
