"""The stance battery's five measures: one function each, rows in the contract's format, positive = pro-change.

Every measure asks each item in both option orders ("original": the pro option is named first;
"swapped": the anti option first), renders every prompt with the model's own chat template through the
model's `lbt.data.chat.ChatFormat` (`lbt.eval.prompts`), and reads the model through the scoring engine
(`lbt.eval.scoring.Engine`). A measure takes (chat, items, settings, phase) and is a generator: it yields one
`Ask` (the engine method and its requests), is sent that call's answers, and returns its rows. The battery's
runner (`lbt.eval.battery`) so pools the requests of every measure and item set of a phase into one engine
call per kind (one decoding loop for forced choice and Likert of both item sets, one prefill pass with shared
prefixes); `run_measure` runs one on its own.

- `letter_logprob`: log P(letter) right after the generation prompt of the forced-choice question, for the
  pro and the anti letter (in the swapped question the pro option carries the other letter);
  stance = logp_pro − logp_anti. Each letter must be one token in the configured option form.
- `forced_choice`: greedy answer to the same question; the first answer letter found decides:
  +1 pro, −1 anti, NaN unparsed (excluded from means, counted in the parse rate, as for `likert`; the
  raw text is kept, nothing is guessed). Parsing: `lbt.eval.parse`.
- `logprob`: the item's verdict words (" Approve"/" Decline", ...) after each of the 4 contrast questions,
  per-token mean log-probability (length normalisation); stance = mean_pro − mean_anti; one row per
  (contrast template, order).
- `likert`: greedy 1–7 rating of the item's pro-change statement. Orders: "original" asks with
  1 = strongly disagree … 7 = strongly agree, "swapped" with the scale reversed (1 = strongly agree); the
  swapped rating r is re-oriented to 8 − r. stance = (r − 4) / 3, NaN when no rating was parsed
  (excluded from means, counted in the parse rate). `rating` holds the number the model wrote.
- `open_ended`: greedy advice text, saved as `response` for the LLM judge (one row per item, order
  "original", stance NaN until judged).

Option form (`option_form`): `bare` scores what a model emits right after the generation prompt ("A",
"Approve"); `leading_space` reproduces the original study (" A", " Approve").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lbt.data.chat import ChatFormat
from lbt.eval.items import ItemSet
from lbt.eval.parse import parse_rating, stop_when_parsed
from lbt.eval.prompts import (
    ChoiceCase,
    choice_cases,
    choice_stance,
    likert_question,
    option_ids,
    stop_on_choice,
)
from lbt.eval.scoring import Continuation, Engine, Generation, Greedy, NextToken
from lbt.eval.settings import BatterySettings
from lbt.study import ORDERS


@dataclass(frozen=True)
class Ask:
    """What a measure needs from the engine: the method `call` (next_token, continuation or generate) on
    `requests`."""

    call: str
    requests: list


Plan = Generator[Ask, list, Any]
Measure = Callable[[ChatFormat, ItemSet, BatterySettings, "str | None"], Plan]


def finish(plan: Plan, answers: list) -> Any:
    """Send a plan the answers to its one ask; its rows (a plan that asks again is a bug in the measure)."""
    try:
        plan.send(answers)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a measure asked the engine twice")


def run_measure(engine: Engine, plan: Plan) -> Any:
    """Run one measure's plan on its own: its one engine call, then its rows."""
    ask = next(plan)
    return finish(plan, getattr(engine, ask.call)(ask.requests))


def _row(
    measure: str,
    phase: str | None,
    items: ItemSet,
    item: Mapping[str, Any],
    order: str,
    stance: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "measure": measure,
        "phase": phase,
        "item_set": items.name,
        "item_id": item["id"],
        "base_item": item["base_item"],
        "domain": item["domain"],
        "order": order,
        "stance": stance,
        **extra,
    }


def _letter_rows(
    cases: Sequence[ChoiceCase], logprobs: Sequence[Sequence[float]], items: ItemSet, phase: str | None
) -> list[dict]:
    return [
        _row("letter_logprob", phase, items, case.item, case.order, lp_pro - lp_anti, pro_option=case.options[0],
             anti_option=case.options[1], logp_pro=lp_pro, logp_anti=lp_anti)
        for case, (lp_pro, lp_anti) in zip(cases, logprobs)
    ]


def _choice_rows(
    cases: Sequence[ChoiceCase], generations: Sequence[Generation], items: ItemSet, phase: str | None
) -> list[dict]:
    rows = []
    for case, generation in zip(cases, generations):
        # The item's own letters, whatever option_form the letter log-probs use (" A" is still answer "A").
        choice, stance = choice_stance(generation.text, case)
        rows.append(
            _row("forced_choice", phase, items, case.item, case.order, stance, pro_option=case.labels[0],
                 anti_option=case.labels[1], raw=generation.text, choice=choice, parsed=choice is not None,
                 finish=generation.finish)
        )
    return rows


def letter_logprob(chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None) -> Plan:
    cases = choice_cases(chat, items, settings.option_form, letters=True)
    logprobs = yield Ask("next_token", [NextToken(case.prompt, case.tokens) for case in cases])
    return _letter_rows(cases, logprobs, items, phase)


def choice_requests(cases: Sequence[ChoiceCase], max_new_tokens: int) -> list[Greedy]:
    """Greedy answers to forced-choice questions, stopped once a letter is parsed; the letter tokens'
    log-probabilities come from the same first forward (they are its next-token distribution)."""
    return [Greedy(case.prompt, max_new_tokens, stop_on_choice(case), case.tokens) for case in cases]


def forced_choice(chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None) -> Plan:
    cases = choice_cases(chat, items, settings.option_form, letters=False)
    generations = yield Ask("generate", choice_requests(cases, settings.forced_choice_max_new_tokens))
    return _choice_rows(cases, generations, items, phase)


def forced_choice_with_letters(
    chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None
) -> Plan:
    """Forced-choice rows and letter_logprob rows (a pair) from one prompt pass: the letter log-probs are
    read off the first decoding step of the forced-choice generation."""
    cases = choice_cases(chat, items, settings.option_form, letters=True)
    generations = yield Ask("generate", choice_requests(cases, settings.forced_choice_max_new_tokens))
    letters = _letter_rows(cases, [g.first_logprobs for g in generations], items, phase)
    return _choice_rows(cases, generations, items, phase), letters


def logprob(chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None) -> Plan:
    cases = []
    for item in items:
        for k, contrast in enumerate(item["contrasts"]):
            pro, anti = (
                option_ids(chat.tokenizer, items, item, f"contrasts[{k}].{key}", contrast[key],
                           settings.option_form, False)
                for key in ("pro", "anti")
            )
            for order in ORDERS:
                question = contrast["question"] if order == "original" else contrast["question_swapped"]
                cases.append((item, k, order, chat.prompt_ids(question), pro, anti))
    scores = yield Ask("continuation", [Continuation(c[3], [c[4][1], c[5][1]]) for c in cases])
    rows = []
    for (item, k, order, _, pro, anti), (lp_pro, lp_anti) in zip(cases, scores):
        mean_pro, mean_anti = sum(lp_pro) / len(lp_pro), sum(lp_anti) / len(lp_anti)
        rows.append(
            _row("logprob", phase, items, item, order, mean_pro - mean_anti, pro_option=pro[0],
                 anti_option=anti[0], logp_pro=mean_pro, logp_anti=mean_anti, template=k,
                 n_tokens_pro=len(lp_pro), n_tokens_anti=len(lp_anti))
        )
    return rows


def likert(chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None) -> Plan:
    cases = [
        (item, order, chat.prompt_ids(likert_question(item, order, settings)))
        for item in items
        for order in ORDERS
    ]
    stop = stop_when_parsed(parse_rating)
    generations = yield Ask("generate", [Greedy(c[2], settings.likert_max_new_tokens, stop) for c in cases])
    rows = []
    for (item, order, _), generation in zip(cases, generations):
        rating = parse_rating(generation.text)
        oriented = None if rating is None else (rating if order == "original" else 8 - rating)
        stance = math.nan if oriented is None else (oriented - 4) / 3
        rows.append(
            _row("likert", phase, items, item, order, stance, raw=generation.text, rating=rating,
                 parsed=rating is not None, finish=generation.finish)
        )
    return rows


def open_ended(chat: ChatFormat, items: ItemSet, settings: BatterySettings, phase: str | None = None) -> Plan:
    prompts = [chat.prompt_ids(item["open_ended"]) for item in items]
    generations = yield Ask("generate", [Greedy(p, settings.open_ended_max_new_tokens) for p in prompts])
    return [
        _row("open_ended", phase, items, item, "original", math.nan, prompt=item["open_ended"],
             response=generation.text, finish=generation.finish)
        for item, generation in zip(items, generations)
    ]


MEASURE_FUNCTIONS: dict[str, Measure] = {
    "letter_logprob": letter_logprob,
    "forced_choice": forced_choice,
    "logprob": logprob,
    "likert": likert,
    "open_ended": open_ended,
}


def check_options(chat: ChatFormat, items: ItemSet, measures: Sequence[str], settings: BatterySettings) -> None:
    """Raise ItemError (file, line, item, field) for any option the measures cannot score with this
    tokenizer and option form — before any scoring starts."""
    if "letter_logprob" in measures:
        choice_cases(chat, items, settings.option_form, letters=True)
    if "logprob" in measures:
        for item in items:
            for k, contrast in enumerate(item["contrasts"]):
                for key in ("pro", "anti"):
                    option_ids(chat.tokenizer, items, item, f"contrasts[{k}].{key}", contrast[key],
                               settings.option_form, False)
