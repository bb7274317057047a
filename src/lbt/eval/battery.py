"""The stance battery's runner: the asked measures of a phase's item sets, scored through one engine.

The parts live in their own modules: settings (`lbt.eval.settings`), item sets (`lbt.eval.items`), answer
parsers (`lbt.eval.parse`), prompts and options (`lbt.eval.prompts`), the five measures
(`lbt.eval.measures`) and the scoring engine (`lbt.eval.scoring`). The callers (the evaluation callback and
`lbt.evaluate`) put the model in `evaluation_mode`, check the measures and options before any scoring
starts, and call `score_item_sets` once per phase (`score_item_set` for one set).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lbt.data.chat import ChatFormat
from lbt.eval.decode import DECODE
from lbt.eval.items import ItemSet
from lbt.eval.measures import MEASURE_FUNCTIONS, Ask, Plan, finish, forced_choice_with_letters
from lbt.eval.prefix import SHARE_PREFIX
from lbt.eval.scoring import Engine, length_buckets
from lbt.eval.settings import BatterySettings, MeasureError
from lbt.fast_settings import FastSetting
from lbt.study import MEASURES


def check_measures(measures: Iterable[str]) -> list[str]:
    measures = list(measures)
    unknown = [m for m in measures if m not in MEASURE_FUNCTIONS]
    if unknown:
        raise MeasureError(f"eval.measures: unknown measure(s) {unknown}; known: {list(MEASURES)}")
    if len(set(measures)) != len(measures):
        raise MeasureError(f"eval.measures lists a measure twice: {measures}")
    return measures


# Whether a phase's asks are pooled into few engine calls (`hardware.fast.pool_measures`; None: the default,
# on); off, every measure of every item set makes its own call, as before the pooling.
POOL_MEASURES = FastSetting("pool_measures", True)
set_pool_measures = POOL_MEASURES.set


def apply_fast_settings(fast: Mapping[str, Any]) -> None:
    """The process-wide evaluation settings of `hardware.fast`: how greedy decoding runs (`decode`),
    whether shared prompt openings run once (`share_prefix`) and whether a phase's measures share engine
    calls (`pool_measures`), whether the model's RMSNorms run in one kernel (`fused_norm`,
    `lbt.model.fused_norm`), whether each LoRA delta is added inside its B GEMM (`addmm_lora`,
    `lbt.model.lora.delta_in_gemm`) and whether masked prompt forwards keep grouped key/value heads
    (`sdpa_gqa`, `lbt.model.gqa`). `lbt.train` and `lbt.evaluate` apply them before any scoring. Each is a
    `lbt.fast_settings.FastSetting` of the module that reads it; a key missing in `fast`, or None, takes its
    default."""
    from lbt.model.fused_norm import FUSED_NORM
    from lbt.model.gqa import SDPA_GQA
    from lbt.model.lora import ADDMM_LORA

    for setting in (DECODE, SHARE_PREFIX, POOL_MEASURES, FUSED_NORM, SDPA_GQA, ADDMM_LORA):
        setting.set(fast.get(setting.key))


def score_item_set(
    model: torch.nn.Module,
    chat: ChatFormat,
    items: ItemSet,
    measures: Sequence[str],
    settings: BatterySettings,
    phase: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, list[dict]]:
    """Rows per measure for one item set (`score_item_sets` with one set)."""
    return score_item_sets(model, chat, {items.name: (items, measures)}, settings, phase, timings)[items.name]


def score_item_sets(
    model: torch.nn.Module,
    chat: ChatFormat,
    asked: Mapping[str, tuple[ItemSet, Sequence[str]]],
    settings: BatterySettings,
    phase: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, dict[str, list[dict]]]:
    """Rows per item set and measure, for the measures asked of each set ({name: (items, measures)}).

    Every measure of every set is a plan that asks the engine once (`lbt.eval.measures`); the asks are
    pooled into one engine call per kind, and for generation per loop length (`Engine.generate`'s
    LENGTH_SPREAD: forced choice and Likert of both item sets decode in one loop, open-ended text in its
    own), so a phase records few CUDA graphs and its shared prefixes meet in one pass. When both
    letter_logprob and forced_choice are asked for, the letter log-probs come from the forced-choice
    generation's first forward (one prompt pass, not two). timings: seconds per engine call, under the
    names of the measures it served ("forced_choice+letter_logprob+likert"). A call that runs out of GPU
    memory is retried with half the batch (`Engine.map_batches`); the smaller batch is kept in `settings`
    for the rest of the job, so later measures and phases do not fail again."""
    units: list[tuple[str, tuple[str, ...], Plan]] = []  # (item set, measures it yields, plan)
    for name, (items, measures) in asked.items():
        pending = check_measures(measures)
        if "letter_logprob" in pending and "forced_choice" in pending:
            units.append((name, ("forced_choice", "letter_logprob"),
                          forced_choice_with_letters(chat, items, settings, phase)))
            pending = [m for m in pending if m not in ("letter_logprob", "forced_choice")]
        units.extend((name, (m,), MEASURE_FUNCTIONS[m](chat, items, settings, phase)) for m in pending)
    asks = [next(plan) for _, _, plan in units]
    results: list[Any] = [None] * len(units)
    timings = timings if timings is not None else {}
    engine = Engine(model, chat.tokenizer, settings.batch_size)
    try:
        for members in _engine_calls(asks):
            call = asks[members[0]].call
            requests = [r for k in members for r in asks[k].requests]
            started = time.perf_counter()
            answers = getattr(engine, call)(requests)
            label = "+".join(dict.fromkeys(m for k in members for m in units[k][1]))
            timings[label] = timings.get(label, 0.0) + time.perf_counter() - started
            start = 0
            for k in members:
                size = len(asks[k].requests)
                results[k] = finish(units[k][2], answers[start:start + size])
                start += size
    finally:
        settings.batch_size = engine.batch_size
    rows: dict[str, dict[str, list[dict]]] = {name: {} for name in asked}
    for (name, produced, _), result in zip(units, results):
        rows[name].update(zip(produced, result) if len(produced) > 1 else [(produced[0], result)])
    return {name: {m: rows[name][m] for m in measures} for name, (_, measures) in asked.items()}


def _engine_calls(asks: Sequence[Ask]) -> list[list[int]]:
    """Indices of the asks answered by one engine call: one call per kind, and generation split where
    `Engine.generate` would decode in separate loops anyway (so each call's time is its own loop's); one
    call per ask when pooling is off."""
    if not POOL_MEASURES.get():
        return [[k] for k in range(len(asks))]
    calls: dict[tuple[str, int], list[int]] = {}
    generation = [k for k, ask in enumerate(asks) if ask.call == "generate"]
    loop_of = {}
    lengths = [max((r.max_new_tokens for r in asks[k].requests), default=1) for k in generation]
    for loop, members in enumerate(length_buckets(lengths)):
        loop_of.update({generation[m]: loop for m in members})
    for k, ask in enumerate(asks):
        calls.setdefault((ask.call, loop_of.get(k, 0)), []).append(k)
    return list(calls.values())
