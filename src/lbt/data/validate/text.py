"""Text measures the gates and the generator share: words, MATTR, the normalised hash behind dedup."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

# A word: a run of letters/digits, inner apostrophes and hyphens allowed ("e-bike" and "don't" count once).
WORD_RE = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def word_count(text: str) -> int:
    return len(words(text))


def mattr(tokens: list[str], window: int) -> float:
    """Moving-average type-token ratio; plain TTR when the text is shorter than the window."""
    if not tokens:
        return 0.0
    if len(tokens) <= window:
        return len(set(tokens)) / len(tokens)
    counts: dict[str, int] = {}
    for tok in tokens[:window]:
        counts[tok] = counts.get(tok, 0) + 1
    ratios = [len(counts) / window]
    for i in range(window, len(tokens)):
        old, new = tokens[i - window], tokens[i]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        counts[new] = counts.get(new, 0) + 1
        ratios.append(len(counts) / window)
    return float(np.mean(ratios))


def normalise(text: str) -> str:
    """Lower-cased, punctuation stripped, whitespace collapsed: texts that differ only so are duplicates."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()
