"""The stance battery's runner: the asked measures of one item set, scored through one engine.

The parts live in their own modules: settings (`lbt.eval.settings`), item sets (`lbt.eval.items`), answer
parsers (`lbt.eval.parse`), prompts and options (`lbt.eval.prompts`), the five measures
(`lbt.eval.measures`) and the scoring engine (`lbt.eval.scoring`). The callers (the evaluation callback and
`lbt.evaluate`) put the model in `evaluation_mode`, check the measures and options before any scoring
starts, and call `score_item_set` per item set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from lbt.data.chat import ChatFormat
from lbt.eval.items import ItemSet
from lbt.eval.measures import MEASURE_FUNCTIONS, forced_choice_with_letters
from lbt.eval.scoring import Engine
from lbt.eval.settings import BatterySettings, MeasureError
from lbt.study import MEASURES


def check_measures(measures: Iterable[str]) -> list[str]:
    measures = list(measures)
    unknown = [m for m in measures if m not in MEASURE_FUNCTIONS]
    if unknown:
        raise MeasureError(f"eval.measures: unknown measure(s) {unknown}; known: {list(MEASURES)}")
    if len(set(measures)) != len(measures):
        raise MeasureError(f"eval.measures lists a measure twice: {measures}")
    return measures


def score_item_set(
    model: torch.nn.Module,
    chat: ChatFormat,
    items: ItemSet,
    measures: Sequence[str],
    settings: BatterySettings,
    phase: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, list[dict]]:
    """Rows per measure for one item set. When both letter_logprob and forced_choice are asked for, the
    letter log-probs come from the forced-choice generation's first forward (one prompt pass, not two).
    A call that runs out of GPU memory is retried with half the batch (`Engine.map_batches`); the smaller
    batch is kept in `settings` for the rest of the job, so later measures and phases do not fail again."""
    measures = check_measures(measures)
    engine = Engine(model, chat.tokenizer, settings.batch_size)
    rows: dict[str, list[dict]] = {}
    timings = timings if timings is not None else {}
    pending = list(measures)
    try:
        if "letter_logprob" in pending and "forced_choice" in pending:
            started = time.perf_counter()
            rows["forced_choice"], rows["letter_logprob"] = forced_choice_with_letters(engine, chat, items, settings, phase)
            timings["forced_choice+letter_logprob"] = time.perf_counter() - started
            pending = [m for m in pending if m not in ("letter_logprob", "forced_choice")]
        for measure in pending:
            started = time.perf_counter()
            rows[measure] = MEASURE_FUNCTIONS[measure](engine, chat, items, settings, phase)
            timings[measure] = time.perf_counter() - started
    finally:
        settings.batch_size = engine.batch_size
    return {m: rows[m] for m in measures}
