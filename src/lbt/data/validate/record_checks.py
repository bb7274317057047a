"""Record-level checks: leakage (blocklist hits), length in words and anomalies, for one record or a corpus.

`record_problems(user, assistant)` is what the generator rejects drafts with; `gate_record_level` runs the
same checks over the three corpora and reports the leakage, length and anomalies gates in one pass.
"""

from __future__ import annotations

import re
from pathlib import Path

from lbt.data.blocklist import Blocklist, default_blocklist
from lbt.data.records import CorpusRecord, relative_path
from lbt.data.validate.gate import Thresholds, gate_result, listed, where
from lbt.data.validate.text import word_count

REFUSAL_RE = re.compile(
    r"\bI\s*(?:can(?:not|'t|\u2019t| not)|won(?:'|\u2019)t|am unable to|(?:'|\u2019)m unable to"
    r"|am not able to|(?:'|\u2019)m not able to)\s+(?:help|assist|provide|do that|comply|answer)"
    r"|\bas an ai\b|\bas a (?:large )?language model\b"
    r"|\bI(?:'|\u2019)m sorry,? but\b|\bI apologi[sz]e,? but\b",
    re.IGNORECASE,
)
META_RE = re.compile(
    r"^\s*(?:sure|certainly|of course|here(?:'|\u2019)s|here is)\b[^.!?\n]{0,60}"
    r"\b(?:response|answer|reply|version|rewrite)\b",
    re.IGNORECASE,
)
HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)
FENCE_RE = re.compile(r"```|~~~")
ROLE_RE = re.compile(
    r"^\s*(?:user|assistant|system)\s*:|<\|[^|>]{1,40}\|>|\[/?INST\]", re.IGNORECASE | re.MULTILINE
)
FINAL_CHARS = ".!?\u2026\"')\u201d\u2019]"


def anomalies(text: str) -> list[str]:
    """Refusals, empty text and format breaks in one assistant turn."""
    if not text.strip():
        return ["empty response"]
    found = []
    if m := REFUSAL_RE.search(text):
        found.append(f"refusal-looking: {m.group(0)!r}")
    if m := META_RE.search(text):
        found.append(f"meta-commentary: {m.group(0)!r}")
    if HEADING_RE.search(text):
        found.append("format: markdown heading")
    if FENCE_RE.search(text):
        found.append("format: code fence")
    if m := ROLE_RE.search(text):
        found.append(f"format: chat-role marker {m.group(0).strip()!r}")
    if text.rstrip()[-1] not in FINAL_CHARS:
        found.append(f"format: truncated (ends {text.rstrip()[-30:]!r} without final punctuation)")
    return found


def record_checks(user: str, assistant: str, thresholds: Thresholds, blocklist: Blocklist) -> list[tuple]:
    """(kind, message, detail) for every record-level problem; kind is leakage | length | anomaly."""
    problems: list[tuple] = []
    for field, text in (("user", user), ("assistant", assistant)):
        for hit in blocklist.find_hits(text):
            problems.append(
                (
                    "leakage",
                    f"leakage in {field}: {hit.match!r} matches {hit.lemma!r} ({hit.domain})",
                    {"field": field, "domain": hit.domain, "lemma": hit.lemma, "match": hit.match},
                )
            )
    if not user.strip():
        problems.append(("anomaly", "empty user message", {"field": "user"}))
    n = word_count(assistant)
    if assistant.strip() and not thresholds.min_words <= n <= thresholds.max_words:
        problems.append(
            (
                "length",
                f"length: {n} words (allowed {thresholds.min_words}-{thresholds.max_words})",
                {"words": n},
            )
        )
    for message in anomalies(assistant):
        problems.append(("anomaly", message, {"field": "assistant"}))
    return problems


def record_problems(
    user: str, assistant: str, thresholds: Thresholds | None = None, blocklist: Blocklist | None = None
) -> list[str]:
    """Record-level reasons to reject one (user, assistant) pair; empty list = acceptable."""
    return [
        msg
        for _, msg, _ in record_checks(
            user, assistant, thresholds or Thresholds(), blocklist or default_blocklist()
        )
    ]


def gate_record_level(
    arms: dict[str, list[CorpusRecord]], paths: dict[str, Path], thresholds: Thresholds, blocklist: Blocklist
) -> dict[str, dict]:
    """leakage, length and anomalies in one pass; figures per corpus as well as overall."""
    found = {"leakage": [], "length": [], "anomaly": []}
    per_corpus = {arm: {"leakage": 0, "length": 0, "anomaly": 0} for arm in arms}
    counts = []
    for arm, records in arms.items():
        for r in records:
            counts.append(word_count(r.assistant))
            for kind, message, detail in record_checks(r.user, r.assistant, thresholds, blocklist):
                found[kind].append(
                    {
                        "where": where(paths[arm], r),
                        "id": r.id,
                        "scenario_id": r.scenario_id,
                        "problem": message,
                        **detail,
                    }
                )
                per_corpus[arm][kind] += 1
    hits_by_domain: dict[str, int] = {}
    for hit in found["leakage"]:
        hits_by_domain[hit["domain"]] = hits_by_domain.get(hit["domain"], 0) + 1
    return {
        "leakage": gate_result(
            not found["leakage"],
            n_hits=len(found["leakage"]),
            hits_by_domain=hits_by_domain,
            per_corpus={a: c["leakage"] for a, c in per_corpus.items()},
            blocklist={
                # relative to the working directory when below it: reports get committed
                "path": relative_path(blocklist.source, Path.cwd()),
                "version": blocklist.version,
                "lemmas": len(blocklist),
            },
            **listed(found["leakage"]),
        ),
        "length": gate_result(
            not found["length"],
            min_words=min(counts),
            max_words=max(counts),
            bounds=[thresholds.min_words, thresholds.max_words],
            n_out_of_bounds=len(found["length"]),
            per_corpus={a: c["length"] for a, c in per_corpus.items()},
            **listed(found["length"]),
        ),
        "anomalies": gate_result(
            not found["anomaly"],
            n_anomalies=len(found["anomaly"]),
            per_corpus={a: c["anomaly"] for a, c in per_corpus.items()},
            **listed(found["anomaly"]),
        ),
    }
