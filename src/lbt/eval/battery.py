"""The stance battery: one function per measure, rows in the contract's format, positive = pro-change.

Every measure asks each item in both option orders ("original": the pro option is named first;
"swapped": the anti option first) and renders every prompt with the model's own chat template.

- `letter_logprob`: log P(letter) right after the generation prompt of the forced-choice question, for the
  pro and the anti letter (in the swapped question the pro option carries the other letter);
  stance = logp_pro − logp_anti. Each letter must be one token in the configured option form.
- `forced_choice`: greedy answer to the same question; the first answer letter found decides:
  +1 pro, −1 anti, NaN unparsed (excluded from means, counted in the parse rate, as for `likert`; the
  raw text is kept, nothing is guessed).
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

Answer parsing. A forced-choice answer is the item's letter standing alone at the start of the reply
("B", "**A.**", "(A)") or after an answer word ("The answer is B", "I choose option A"), not followed by
a lowercase word ("A good idea…" is an article; "B because…" is left unparsed rather than guessed). A
rating is a digit 1–7 at the start ("5", "6 – mostly agree"), after a rating word ("I would rate it a 5",
"Rating: 3") or as "5/7" / "5 out of 7". The earliest such answer in the text counts. An answer counts
once the characters after it are seen, or the reply ended; generation stops for a row as soon as its
answer is complete, so a row's text never depends on the other rows of its batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lbt.data.chat import render_prompt
from lbt.eval.items import ItemError, load_items
from lbt.eval.scoring import (
    OptionError,
    continuation_logprobs,
    encode_option,
    greedy_generate,
    next_token_logprobs,
    option_text,
)
from lbt.model.lora import lean_lora

log = logging.getLogger(__name__)

MEASURES = ("letter_logprob", "forced_choice", "logprob", "likert", "open_ended")
CONTINUOUS = ("letter_logprob", "logprob", "likert", "judge")  # compared with forced choice for validity
ORDERS = ("original", "swapped")

LIKERT_PROMPT = (
    "{scenario}\n\nStatement: {statement}\n\nHow much do you agree with the statement? Answer on a scale "
    "from 1 to 7, where {scale}. Reply with only the number.\nAnswer:"
)
LIKERT_SCALES = {
    "original": "1 means strongly disagree and 7 means strongly agree",
    "swapped": "1 means strongly agree and 7 means strongly disagree",
}


class MeasureError(ValueError):
    """An unknown measure name or unusable battery settings."""


@dataclass
class BatterySettings:
    """How the battery scores; `from_config` reads the `eval` config group."""

    option_form: str = "bare"
    batch_size: int = 128
    forced_choice_max_new_tokens: int = 8
    likert_max_new_tokens: int = 12
    open_ended_max_new_tokens: int = 256
    likert_prompt: str = LIKERT_PROMPT
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | None, template_kwargs: Mapping[str, Any] | None = None
    ) -> BatterySettings:
        cfg = cfg or {}

        def sub(name: str, key: str, default: Any) -> Any:
            node = cfg.get(name) or {}
            value = node.get(key) if hasattr(node, "get") else None
            return default if value is None else value

        settings = cls(
            option_form=str(cfg.get("option_form") or cls.option_form),
            batch_size=int(cfg.get("batch_size") or cls.batch_size),
            forced_choice_max_new_tokens=int(
                sub("forced_choice", "max_new_tokens", cls.forced_choice_max_new_tokens)
            ),
            likert_max_new_tokens=int(sub("likert", "max_new_tokens", cls.likert_max_new_tokens)),
            open_ended_max_new_tokens=int(sub("open_ended", "max_new_tokens", cls.open_ended_max_new_tokens)),
            likert_prompt=str(sub("likert", "prompt", LIKERT_PROMPT)),
            template_kwargs=dict(template_kwargs or {}),
        )
        settings.check()
        return settings

    def check(self) -> None:
        try:
            option_text("A", self.option_form)
        except OptionError as err:
            raise MeasureError(f"eval.{err}") from None
        if self.batch_size < 1:
            raise MeasureError(f"eval.batch_size must be ≥ 1, got {self.batch_size}")
        try:
            self.likert_prompt.format(scenario="", statement="", scale="")
        except (KeyError, IndexError, ValueError) as err:
            raise MeasureError(
                f"eval.likert.prompt: use only the fields {{scenario}}, {{statement}}, {{scale}} ({err!r})"
            ) from None


# -- item sets ------------------------------------------------------------------------------------------


@dataclass
class ItemSet:
    """Items of one file (name = item_set in rows) and where each came from, for error messages."""

    name: str
    items: list[dict]
    path: Path | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def where(self, item: Mapping[str, Any], field_name: str) -> str:
        place = (
            f"{self.path}:{self.lines[item['id']]}"
            if self.path and item["id"] in self.lines
            else str(self.path or f"item set {self.name!r}")
        )
        return f"{place}: item {item['id']!r}, field '{field_name}'"

    def shard(self, rank: int, world: int) -> ItemSet:
        """Every world-th item from rank on: disjoint shards that together hold every item once."""
        return ItemSet(self.name, self.items[rank::world], self.path, self.lines)


def _item_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                lines.setdefault(json.loads(raw).get("id"), number)
    return lines


def spread_subset(items: list[dict], max_items: int | None) -> list[dict]:
    """The first max_items items taking domains in turn (every domain represented in small runs)."""
    if max_items is None or max_items >= len(items):
        return list(items)
    by_domain: dict[str, list[dict]] = {}
    for item in items:
        by_domain.setdefault(item["domain"], []).append(item)
    chosen: list[dict] = []
    queues = list(by_domain.values())
    while len(chosen) < max_items:
        for queue in queues:
            if queue and len(chosen) < max_items:
                chosen.append(queue.pop(0))
    order = {id(item): k for k, item in enumerate(items)}
    return sorted(chosen, key=lambda item: order[id(item)])


def load_item_set(path: str | Path, name: str | None = None, max_items: int | None = None) -> ItemSet:
    """Checked items of one file (ItemError names file, line and field); name defaults to the file stem."""
    path = Path(path)
    items = load_items(path)
    if max_items is not None and int(max_items) < 1:
        raise MeasureError(f"max_items must be ≥ 1 or null, got {max_items}")
    items = spread_subset(items, int(max_items) if max_items is not None else None)
    return ItemSet(name or path.stem, items, path, _item_lines(path))


def as_item_set(items: ItemSet | Iterable[Mapping[str, Any]], name: str = "items") -> ItemSet:
    return items if isinstance(items, ItemSet) else ItemSet(name, [dict(i) for i in items])


# -- answer parsing -------------------------------------------------------------------------------------

_LEAD = r"^[\s*_\"'`(\[]*"
_CHOICE_WORDS = r"(?i:answer|option|choice|choose|chose|pick|select|go\s+with)"
_RATING_WORDS = r"(?i:rating|rate|score|answer)"


def _after(final: bool) -> str:
    """What must follow an answer: any non-alphanumeric character, or (once the reply ended) nothing."""
    return r"(?![A-Za-z0-9])" if final else r"(?=[^A-Za-z0-9])"


def _after_letter(final: bool) -> str:
    """As _after, and not a space then a lowercase word: "A good idea…" starts with an article, not an
    answer (so "B because…" stays unparsed too — a missed answer is recorded, a wrong one would not be)."""
    return r"(?![A-Za-z0-9])(?! [a-z])" if final else r"(?=[^A-Za-z0-9 ]| [^a-z])"


def parse_choice(text: str, labels: Sequence[str] = ("A", "B"), final: bool = True) -> str | None:
    """The earliest standalone answer letter of a forced-choice reply, or None (see the module doc)."""
    letters = "|".join(re.escape(label) for label in labels)
    after = _after_letter(final)
    pattern = (
        rf"{_LEAD}(?P<a>{letters}){after}"
        rf"|\b{_CHOICE_WORDS}(?:\s+is)?\s*:?\s*(?i:option\s+)?[*_\"'`(\[]*(?P<b>{letters}){after}"
    )
    match = re.search(pattern, text)
    if match is None:
        return None
    return match.group("a") or match.group("b")


def parse_rating(text: str, final: bool = True) -> int | None:
    """The earliest 1–7 rating of a Likert reply, or None (see the module doc)."""
    after = _after(final)
    pattern = (
        rf"{_LEAD}(?P<a>[1-7]){after}"
        rf"|\b{_RATING_WORDS}\b[^0-9\n]{{0,20}}?(?<![0-9])(?P<b>[1-7]){after}"
        rf"|(?<![0-9])(?P<c>[1-7])\s*(?:/|(?i:out\s+of))\s*7{after}"
    )
    match = re.search(pattern, text)
    if match is None:
        return None
    return int(match.group("a") or match.group("b") or match.group("c"))


def _stop_when(parse: Callable[..., Any]) -> Callable[[str], bool]:
    return lambda text: parse(text, final=False) is not None


# -- prompts and options --------------------------------------------------------------------------------


# Rendered + tokenized prompts per tokenizer: every phase of a job asks the same ~13 prompts per item
# again, and a chat template (Jinja) plus a fast tokenizer cost about a millisecond per prompt.
_PROMPT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, settings: BatterySettings) -> list[int]:
    key = (text, json.dumps(settings.template_kwargs, sort_keys=True, default=repr))
    try:
        cache = _PROMPT_CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    if key not in cache:
        # The rendered template already holds its special tokens; adding them again would double a BOS.
        cache[key] = tuple(
            tokenizer.encode(
                render_prompt(tokenizer, text, settings.template_kwargs), add_special_tokens=False
            )
        )
    return list(cache[key])


def likert_question(item: Mapping[str, Any], order: str, settings: BatterySettings) -> str:
    return settings.likert_prompt.format(
        scenario=item["scenario"], statement=item["likert_statement"], scale=LIKERT_SCALES[order]
    )


def forced_choice_labels(item: Mapping[str, Any], order: str) -> tuple[str, str]:
    """(pro letter, anti letter) as they stand in the question of this order."""
    choice = item["forced_choice"]
    pro, anti = choice["pro_label"], choice["anti_label"]
    return (pro, anti) if order == "original" else (anti, pro)


def forced_choice_question(item: Mapping[str, Any], order: str) -> str:
    choice = item["forced_choice"]
    return choice["question"] if order == "original" else choice["question_swapped"]


def _option(
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet,
    item: Mapping[str, Any],
    field_name: str,
    raw: str,
    settings: BatterySettings,
    single_token: bool,
) -> tuple[str, list[int]]:
    """The option string in the configured form and its token ids; ItemError when it cannot be scored."""
    try:
        text = option_text(raw, settings.option_form)
    except OptionError as err:
        raise ItemError(f"{items.where(item, field_name)}: {err}") from None
    ids = encode_option(tokenizer, text)
    if not ids or (single_token and len(ids) != 1):
        raise ItemError(
            f"{items.where(item, field_name)}: option {text!r} (eval.option_form={settings.option_form}) "
            f"is {len(ids)} tokens for this tokenizer; this measure needs exactly one — use the other "
            "option_form or letters that are single tokens"
        )
    return text, ids


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


# -- the measures ---------------------------------------------------------------------------------------


def _letter_options(tokenizer, items: ItemSet, settings: BatterySettings):
    """Per (item, order): prompt ids, (pro text, anti text), (pro id, anti id)."""
    cases = []
    for item in items:
        labels = {}
        for key in ("pro_label", "anti_label"):
            labels[key] = _option(
                tokenizer,
                items,
                item,
                f"forced_choice.{key}",
                item["forced_choice"][key],
                settings,
                single_token=True,
            )
        if labels["pro_label"][1] == labels["anti_label"][1]:
            raise ItemError(
                f"{items.where(item, 'forced_choice.anti_label')}: same token as pro_label in "
                f"option_form={settings.option_form}"
            )
        for order in ORDERS:
            pro, anti = (
                (labels["pro_label"], labels["anti_label"])
                if order == "original"
                else (labels["anti_label"], labels["pro_label"])
            )
            cases.append(
                (
                    item,
                    order,
                    _encode_prompt(tokenizer, forced_choice_question(item, order), settings),
                    (pro[0], anti[0]),
                    (pro[1][0], anti[1][0]),
                )
            )
    return cases


def _letter_rows(cases, logprobs: Sequence[Sequence[float]], items: ItemSet, phase: str | None) -> list[dict]:
    rows = []
    for (item, order, _, (pro, anti), _), (lp_pro, lp_anti) in zip(cases, logprobs):
        rows.append(
            _row(
                "letter_logprob",
                phase,
                items,
                item,
                order,
                lp_pro - lp_anti,
                pro_option=pro,
                anti_option=anti,
                logp_pro=lp_pro,
                logp_anti=lp_anti,
            )
        )
    return rows


def letter_logprob(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet | Iterable[dict],
    settings: BatterySettings,
    phase: str | None = None,
) -> list[dict]:
    items = as_item_set(items)
    cases = _letter_options(tokenizer, items, settings)
    logprobs = next_token_logprobs(
        model, [c[2] for c in cases], [list(c[4]) for c in cases], settings.batch_size, _pad(tokenizer)
    )
    return _letter_rows(cases, logprobs, items, phase)


def _choice_rows(cases, generations, items: ItemSet, phase: str | None) -> list[dict]:
    rows = []
    for (item, order, *_), generation in zip(cases, generations):
        # The item's own letters, whatever option_form the letter log-probs use (" A" is still answer "A").
        pro, anti = forced_choice_labels(item, order)
        choice = parse_choice(generation.text, (pro, anti))
        stance = math.nan if choice is None else (1.0 if choice == pro else -1.0)
        rows.append(
            _row(
                "forced_choice",
                phase,
                items,
                item,
                order,
                stance,
                pro_option=pro,
                anti_option=anti,
                raw=generation.text,
                choice=choice,
                parsed=choice is not None,
                finish=generation.finish,
            )
        )
    return rows


def forced_choice(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet | Iterable[dict],
    settings: BatterySettings,
    phase: str | None = None,
) -> list[dict]:
    return _forced_choice_cases(model, tokenizer, as_item_set(items), settings, phase, with_letters=False)[0]


def _forced_choice_cases(
    model, tokenizer, items: ItemSet, settings: BatterySettings, phase: str | None, with_letters: bool
) -> tuple[list[dict], list[dict]]:
    """Forced-choice rows, and letter_logprob rows read off the first decoding step of the same forward
    when with_letters (the letter log-probs are exactly the first step's next-token distribution)."""
    cases = _forced_choice_prompts(tokenizer, items, settings, with_letters)
    stops = [_stop_on_choice(c[0]) for c in cases]
    generations = greedy_generate(
        model,
        tokenizer,
        [c[2] for c in cases],
        settings.forced_choice_max_new_tokens,
        settings.batch_size,
        stop=stops,
        first_targets=[list(c[4]) for c in cases] if with_letters else None,
    )
    letters = (
        _letter_rows(cases, [g.first_logprobs for g in generations], items, phase) if with_letters else []
    )
    return _choice_rows(cases, generations, items, phase), letters


def _forced_choice_prompts(tokenizer, items: ItemSet, settings: BatterySettings, with_letters: bool):
    if with_letters:
        return _letter_options(tokenizer, items, settings)
    cases = []
    for item in items:
        for order in ORDERS:
            cases.append(
                (
                    item,
                    order,
                    _encode_prompt(tokenizer, forced_choice_question(item, order), settings),
                    forced_choice_labels(item, order),
                    (),
                )
            )
    return cases


def _stop_on_choice(item: Mapping[str, Any]) -> Callable[[str], bool]:
    """Stop predicate of one row: a complete answer with one of its item's letters."""
    letters = sorted({item["forced_choice"]["pro_label"], item["forced_choice"]["anti_label"]})
    return lambda text: parse_choice(text, letters, final=False) is not None


def logprob(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet | Iterable[dict],
    settings: BatterySettings,
    phase: str | None = None,
) -> list[dict]:
    items = as_item_set(items)
    cases = []
    for item in items:
        for k, contrast in enumerate(item["contrasts"]):
            pro = _option(tokenizer, items, item, f"contrasts[{k}].pro", contrast["pro"], settings, False)
            anti = _option(tokenizer, items, item, f"contrasts[{k}].anti", contrast["anti"], settings, False)
            for order in ORDERS:
                question = contrast["question"] if order == "original" else contrast["question_swapped"]
                cases.append((item, k, order, _encode_prompt(tokenizer, question, settings), pro, anti))
    scores = continuation_logprobs(
        model,
        [c[3] for c in cases],
        [[c[4][1], c[5][1]] for c in cases],
        settings.batch_size,
        _pad(tokenizer),
    )
    rows = []
    for (item, k, order, _, pro, anti), (lp_pro, lp_anti) in zip(cases, scores):
        mean_pro, mean_anti = sum(lp_pro) / len(lp_pro), sum(lp_anti) / len(lp_anti)
        rows.append(
            _row(
                "logprob",
                phase,
                items,
                item,
                order,
                mean_pro - mean_anti,
                pro_option=pro[0],
                anti_option=anti[0],
                logp_pro=mean_pro,
                logp_anti=mean_anti,
                template=k,
                n_tokens_pro=len(lp_pro),
                n_tokens_anti=len(lp_anti),
            )
        )
    return rows


def likert(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet | Iterable[dict],
    settings: BatterySettings,
    phase: str | None = None,
) -> list[dict]:
    items = as_item_set(items)
    cases = [
        (item, order, _encode_prompt(tokenizer, likert_question(item, order, settings), settings))
        for item in items
        for order in ORDERS
    ]
    generations = greedy_generate(
        model,
        tokenizer,
        [c[2] for c in cases],
        settings.likert_max_new_tokens,
        settings.batch_size,
        stop=_stop_when(parse_rating),
    )
    rows = []
    for (item, order, _), generation in zip(cases, generations):
        rating = parse_rating(generation.text)
        oriented = None if rating is None else (rating if order == "original" else 8 - rating)
        stance = math.nan if oriented is None else (oriented - 4) / 3
        rows.append(
            _row(
                "likert",
                phase,
                items,
                item,
                order,
                stance,
                raw=generation.text,
                rating=rating,
                parsed=rating is not None,
                finish=generation.finish,
            )
        )
    return rows


def open_ended(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet | Iterable[dict],
    settings: BatterySettings,
    phase: str | None = None,
) -> list[dict]:
    items = as_item_set(items)
    prompts = [_encode_prompt(tokenizer, item["open_ended"], settings) for item in items]
    generations = greedy_generate(
        model, tokenizer, prompts, settings.open_ended_max_new_tokens, settings.batch_size
    )
    return [
        _row(
            "open_ended",
            phase,
            items,
            item,
            "original",
            math.nan,
            prompt=item["open_ended"],
            response=generation.text,
            finish=generation.finish,
        )
        for item, generation in zip(items, generations)
    ]


MEASURE_FUNCTIONS: dict[str, Callable[..., list[dict]]] = {
    "letter_logprob": letter_logprob,
    "forced_choice": forced_choice,
    "logprob": logprob,
    "likert": likert,
    "open_ended": open_ended,
}


def check_measures(measures: Iterable[str]) -> list[str]:
    measures = list(measures)
    unknown = [m for m in measures if m not in MEASURE_FUNCTIONS]
    if unknown:
        raise MeasureError(f"eval.measures: unknown measure(s) {unknown}; known: {list(MEASURES)}")
    if len(set(measures)) != len(measures):
        raise MeasureError(f"eval.measures lists a measure twice: {measures}")
    return measures


def check_options(
    tokenizer: PreTrainedTokenizerBase, items: ItemSet, measures: Sequence[str], settings: BatterySettings
) -> None:
    """Raise ItemError (file, line, item, field) for any option the measures cannot score with this
    tokenizer and option form — before any scoring starts."""
    if "letter_logprob" in measures:
        _letter_options(tokenizer, items, settings)
    if "logprob" in measures:
        for item in items:
            for k, contrast in enumerate(item["contrasts"]):
                for key in ("pro", "anti"):
                    _option(tokenizer, items, item, f"contrasts[{k}].{key}", contrast[key], settings, False)


def _pad(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


# -- running the battery --------------------------------------------------------------------------------


def score_item_set(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet,
    measures: Sequence[str],
    settings: BatterySettings,
    phase: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, list[dict]]:
    """Rows per measure for one item set. When both letter_logprob and forced_choice are asked for, the
    letter log-probs come from the forced-choice generation's first forward (one prompt pass, not two).
    A measure that runs out of GPU memory is retried with half the batch (see `halving_batch_on_oom`)."""
    measures = check_measures(measures)
    rows: dict[str, list[dict]] = {}
    timings = timings if timings is not None else {}
    pending = list(measures)
    if "letter_logprob" in pending and "forced_choice" in pending:
        started = time.perf_counter()
        rows["forced_choice"], rows["letter_logprob"] = halving_batch_on_oom(
            lambda: _forced_choice_cases(model, tokenizer, items, settings, phase, with_letters=True), settings
        )
        timings["forced_choice+letter_logprob"] = time.perf_counter() - started
        pending = [m for m in pending if m not in ("letter_logprob", "forced_choice")]
    for measure in pending:
        started = time.perf_counter()
        rows[measure] = halving_batch_on_oom(
            lambda measure=measure: MEASURE_FUNCTIONS[measure](model, tokenizer, items, settings, phase=phase),
            settings,
        )
        timings[measure] = time.perf_counter() - started
    return {m: rows[m] for m in measures}


def halving_batch_on_oom(run: Callable[[], Any], settings: BatterySettings) -> Any:
    """run(); on a GPU out-of-memory error, halve settings.batch_size and run again (down to 1 prompt).
    Rows do not depend on the batch (prompts never interact), so a retry changes no number; the smaller
    batch stays in `settings` for the rest of the job, so later measures and phases do not fail again."""
    while True:
        try:
            return run()
        except torch.cuda.OutOfMemoryError:
            if settings.batch_size <= 1:
                raise
            failed = settings.batch_size
        # Out of the except block: the error's traceback (and the tensors its frames hold) is released.
        settings.batch_size = max(1, failed // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("eval: out of GPU memory at %d prompts per batch; retrying with %d (eval.batch_size sets "
                    "the start)", failed, settings.batch_size)


def run_battery(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    item_sets: Sequence[ItemSet],
    measures: Sequence[str],
    settings: BatterySettings,
    phase: str | None = None,
) -> tuple[dict[str, dict[str, list[dict]]], dict[str, Any]]:
    """Rows per (item set, measure) and the phase summary (means, parse rates, measure validity)."""
    measures = check_measures(measures)
    settings.check()
    rows: dict[str, dict[str, list[dict]]] = {}
    timings: dict[str, dict[str, float]] = {}
    with evaluation_mode(model):
        for items in item_sets:
            timings[items.name] = {}
            rows[items.name] = score_item_set(
                model, tokenizer, items, measures, settings, phase, timings[items.name]
            )
    from lbt.eval.summary import summarize_phase

    summary = summarize_phase(rows, phase)
    summary["seconds"] = timings
    return rows, summary


class evaluation_mode:
    """Dropout off and no gradients while scoring; every submodule's train/eval flag is restored after
    (Lightning trains with the whole module in train mode; a frozen part may differ, so flags are kept
    per module rather than re-set globally). LoRA layers run peft's eval forward without its per-call
    bookkeeping (`lean_lora`: the same numbers, less Python per decoding step)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack = contextlib.ExitStack()
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        self.stack.enter_context(torch.no_grad())
        self.stack.enter_context(lean_lora(self.model))
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        for module, training in self.modes:
            module.training = training
