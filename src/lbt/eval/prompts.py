"""The stance battery's prompts and options, rendered with the model's own chat template.

Every question is asked in both option orders ("original": the pro option is named first; "swapped": the
anti option first), rendered and tokenized by the model's `ChatFormat` (`lbt.data.chat`). `choice_cases` builds the forced-choice prompts with their letters and letter tokens;
the battery's forced_choice / letter_logprob and the probe's steered stance (`lbt.probe.measure`) both
use it, so the H1 and H3 stances come from the same prompts, stop rule and parser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lbt.data.chat import ChatFormat
from lbt.eval.items import ItemError, ItemSet
from lbt.eval.parse import parse_choice, stop_when_parsed
from lbt.eval.scoring import OptionError, encode_option, option_text
from lbt.eval.settings import BatterySettings
from lbt.study import ORDERS

LIKERT_SCALES = {
    "original": "1 means strongly disagree and 7 means strongly agree",
    "swapped": "1 means strongly agree and 7 means strongly disagree",
}


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


def option_ids(
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSet,
    item: Mapping[str, Any],
    field_name: str,
    raw: str,
    option_form: str,
    single_token: bool,
) -> tuple[str, list[int]]:
    """The option string in the configured form and its token ids; ItemError when it cannot be scored."""
    try:
        text = option_text(raw, option_form)
    except OptionError as err:
        raise ItemError(f"{items.where(item, field_name)}: {err}") from None
    ids = encode_option(tokenizer, text)
    if not ids or (single_token and len(ids) != 1):
        raise ItemError(
            f"{items.where(item, field_name)}: option {text!r} (option_form={option_form}) "
            f"is {len(ids)} tokens for this tokenizer; this measure needs exactly one — use the other "
            "option_form or letters that are single tokens"
        )
    return text, ids


@dataclass(frozen=True)
class ChoiceCase:
    """One forced-choice question: an item in one order.

    labels: (pro letter, anti letter) as they stand in this order's question (what the answer parser
    looks for). options / tokens: the letters in the option form (" A" for leading_space) and their
    single token ids, (pro, anti); empty when the letters are not scored."""

    item: Mapping[str, Any]
    order: str
    prompt: list[int]
    labels: tuple[str, str]
    options: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()


def choice_cases(
    chat: ChatFormat,
    items: ItemSet,
    option_form: str,
    letters: bool = True,
    orders: Sequence[str] = ORDERS,
) -> list[ChoiceCase]:
    """Every item in every order; with letters, the letters' tokens too (ItemError, naming file, line and
    field, when a letter is not one token or both letters are the same token)."""
    cases = []
    for item in items:
        forms: dict[str, tuple[str, list[int]]] = {}
        if letters:
            for key in ("pro_label", "anti_label"):
                forms[key] = option_ids(chat.tokenizer, items, item, f"forced_choice.{key}", item["forced_choice"][key],
                                        option_form, single_token=True)
            if forms["pro_label"][1] == forms["anti_label"][1]:
                raise ItemError(
                    f"{items.where(item, 'forced_choice.anti_label')}: same token as pro_label in "
                    f"option_form={option_form}"
                )
        for order in orders:
            prompt = chat.prompt_ids(forced_choice_question(item, order))
            keys = ("pro_label", "anti_label") if order == "original" else ("anti_label", "pro_label")
            cases.append(ChoiceCase(
                item, order, prompt, forced_choice_labels(item, order),
                tuple(forms[k][0] for k in keys) if letters else (),
                tuple(forms[k][1][0] for k in keys) if letters else (),
            ))
    return cases


def stop_on_choice(case: ChoiceCase) -> Callable[[str], bool]:
    """Stop predicate of one row: a complete answer with one of its question's letters."""
    return stop_when_parsed(parse_choice, sorted(case.labels))


def choice_stance(text: str, case: ChoiceCase) -> tuple[str | None, float]:
    """(letter chosen or None, stance): +1 the pro letter, −1 the anti letter, NaN unparsed (missing,
    never 0: nothing is guessed)."""
    pro, anti = case.labels
    choice = parse_choice(text, (pro, anti))
    return choice, math.nan if choice is None else (1.0 if choice == pro else -1.0)
