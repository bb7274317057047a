"""Answer parsing of the stance battery's generated measures (forced choice, Likert).

A forced-choice answer is the item's letter standing alone at the start of the reply ("B", "**A.**",
"(A)") or after an answer word ("The answer is B", "I choose option A"), not followed by a lowercase word
("A good idea…" is an article; "B because…" is left unparsed rather than guessed). A rating is a digit 1–7
at the start ("5", "6 – mostly agree"), after a rating word ("I would rate it a 5", "Rating: 3") or as
"5/7" / "5 out of 7". The earliest such answer in the text counts. An answer counts once the characters
after it are seen, or the reply ended (`final`); generation stops for a row as soon as its answer is
complete (`stop_when_parsed`), so a row's text never depends on the other rows of its batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

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


def stop_when_parsed(parse: Callable[..., Any], *args: Any) -> Callable[[str], bool]:
    """Stop predicate of a generation: the reply so far holds a complete answer (parse(text, *args))."""
    return lambda text: parse(text, *args, final=False) is not None
