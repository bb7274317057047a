"""Blocklist of target-domain (and off-limits) lemmas that a training corpus must never contain.

Matching rules (documented here and in data/blocklist.yaml):
- case-insensitive, on word boundaries: a hit must not be preceded or followed by a letter or digit,
  so "tram" does not match "tramp" or "tramline", and "ai" does not match "aim" or "said";
- a space or hyphen inside a lemma also matches the other separator and no separator at all:
  "e-bike" = "ebike" = "e bike" = "E-Bikes"; several spaces or a line break count as one separator;
- an apostrophe inside a lemma is optional and may be straight or curly ("residents' portal");
- inflections on the lemma's last word: plural -s/-es, -y → -ies, and the verb/agent forms -ed, -ing,
  -er, -ers (with a final silent e dropped first: "drone" → "droning", "vote" → "voted", "voter").
  Leakage is judged conservatively: a derived form such as "scootering" or "schooling" still carries
  its domain, so it counts as a hit; a rare false positive only costs a rephrase, whereas a miss would
  contaminate the held-out test. Irregular forms ("curricula") are not derived: list them explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

DEFAULT_BLOCKLIST = Path(__file__).resolve().parents[3] / "data" / "blocklist.yaml"
GROUPS = ("target_domains", "off_limits")

_SEPARATOR = r"[\s\-\u2010\u2011]*"  # space(s), ASCII or Unicode hyphen, or nothing
_APOSTROPHE = "['\u2019]?"
_VERB_SUFFIXES = "ed|ing|er|ers"


class BlocklistError(ValueError):
    """The blocklist file is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Hit:
    domain: str  # target domain slug or off-limits category
    lemma: str  # the blocklist entry that matched
    match: str  # the text as it appears in the record
    start: int = 0  # character offset in the searched text
    group: str = "target_domains"  # "target_domains" or "off_limits"


def _escape_part(part: str) -> str:
    return _APOSTROPHE.join(re.escape(piece) for piece in part.split("'"))


def _inflected_last_word(word: str) -> str:
    """Regex for the last word of a lemma with its simple inflections."""
    forms = [_escape_part(word) + "(?:s|es)?", _escape_part(word) + f"(?:{_VERB_SUFFIXES})"]
    if word.endswith("e"):
        forms.append(_escape_part(word[:-1]) + f"(?:{_VERB_SUFFIXES})")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.append(_escape_part(word[:-1]) + "ies")
    return "(?:" + "|".join(forms) + ")"


def _lemma_body(lemma: str) -> str:
    parts = [p for p in re.split(r"[\s\-\u2010\u2011]+", lemma.strip().lower()) if p]
    if not parts:
        raise BlocklistError(f"empty lemma {lemma!r}")
    return _SEPARATOR.join([_escape_part(p) for p in parts[:-1]] + [_inflected_last_word(parts[-1])])


def _anchored(body: str) -> re.Pattern[str]:
    # A hit must start and end at a word boundary: no letter or digit right before or after it.
    return re.compile(rf"(?<![^\W_])(?:{body})(?![^\W_])", re.IGNORECASE)


def lemma_pattern(lemma: str) -> re.Pattern[str]:
    """Compile one lemma into a case-insensitive, boundary-anchored, separator-tolerant matcher."""
    return _anchored(_lemma_body(lemma))


class Blocklist:
    """All lemmas of a blocklist file, compiled; `find_hits(text)` lists every match."""

    def __init__(self, entries: dict[str, dict[str, list[str]]], source: str = "<memory>", version=None):
        self.source = source
        self.version = version
        self._matchers: list[tuple[str, str, str, re.Pattern[str]]] = []
        for group, domains in entries.items():
            for domain, lemmas in domains.items():
                for lemma in lemmas:
                    self._matchers.append((group, domain, str(lemma), lemma_pattern(str(lemma))))
        # One combined pass first: most texts are clean, and a separate scan per lemma is slow.
        bodies = [_lemma_body(lemma) for _, _, lemma, _ in self._matchers]
        self._any = _anchored("|".join(f"(?:{b})" for b in bodies) or "(?!)")

    def __len__(self) -> int:
        return len(self._matchers)

    def find_hits(self, text: str) -> list[Hit]:
        if not self._any.search(text):
            return []
        hits = []
        for group, domain, lemma, pattern in self._matchers:
            for m in pattern.finditer(text):
                hits.append(Hit(domain=domain, lemma=lemma, match=m.group(0), start=m.start(), group=group))
        return sorted(hits, key=lambda h: (h.start, h.lemma))


def load_blocklist(path: str | Path = DEFAULT_BLOCKLIST) -> Blocklist:
    """Read data/blocklist.yaml (`target_domains: {domain: [lemmas]}`, `off_limits: {...}`)."""
    path = Path(path)
    if not path.is_file():
        raise BlocklistError(f"{path}: blocklist file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BlocklistError(f"{path}: malformed YAML ({err})") from None
    if not isinstance(raw, dict) or "target_domains" not in raw:
        raise BlocklistError(f"{path}: key 'target_domains' is missing")
    entries: dict[str, dict[str, list[str]]] = {}
    for group in GROUPS:
        domains = raw.get(group) or {}
        if not isinstance(domains, dict):
            raise BlocklistError(f"{path}: '{group}' must map a domain to a list of lemmas")
        for domain, lemmas in domains.items():
            if not isinstance(lemmas, list) or not all(isinstance(x, (str, int)) for x in lemmas):
                raise BlocklistError(f"{path}: '{group}.{domain}' must be a list of strings")
        entries[group] = {str(d): [str(x) for x in lemmas] for d, lemmas in domains.items()}
    return Blocklist(entries, source=str(path), version=raw.get("version"))


@lru_cache(maxsize=1)
def default_blocklist() -> Blocklist:
    """The project's data/blocklist.yaml, compiled once per process (compiling takes a while)."""
    return load_blocklist(DEFAULT_BLOCKLIST)
