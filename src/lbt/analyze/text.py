"""Text pieces of report.md: numbers with their reasons when missing, markdown tables, source citations."""

from __future__ import annotations

import math
from typing import Any

EXPLORATORY_STAMP = "EXPLORATORY — not the preregistered analysis (no matching preregistration lock required)"


def fmt(x: Any, digits: int = 2, why: str = "no value") -> str:
    """A number as text; a missing or non-finite one as its reason in words (`why`), never a blank."""
    if x is None:
        return f"({why})"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return f"({why})"
        return f"{x:+.{digits}f}" if digits == 2 else f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: list[float] | None, why: str = "no interval") -> str:
    if not ci or not all(isinstance(x, float) and math.isfinite(x) for x in ci):
        return f"({why})"
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_p(p: float | None, n_resamples: int, why: str = "no p-value") -> str:
    if p is None or not math.isfinite(p):
        return f"({why})"
    return f"< {1 / n_resamples:.0e}" if p == 0 else f"{p:.4f}"


def fmt_seed(seed: Any) -> str:
    return "(no seed: not a training job)" if seed is None else str(seed)


def d_reason(entry: dict) -> str:
    """Why a d of a statistics entry is not a number."""
    sd = entry.get("neutral_sd")
    if sd is not None and (not math.isfinite(sd) or sd == 0):
        return "neutral SD is 0: every neutral cell has the same stance, d is undefined"
    return "no parsed stance in an arm"


def validity_reason(v: dict[str, Any]) -> str:
    if v["n_choice_decided"] == 0:
        return "no item has a decided forced choice (none parsed, or the two orders cancel)"
    return f"no {v['measure']} value on the {v['n_choice_decided']} decided item(s)"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


class SourceIndex:
    """Numbers in report.md cite [S<n>]; the Sources section lists the rows files behind each key."""

    def __init__(self) -> None:
        self.entries: dict[str, list[str]] = {}
        self.labels: dict[str, str] = {}

    def cite(self, label: str, paths: list[str]) -> str:
        key = tuple(sorted(paths))
        for ref, existing in self.entries.items():
            if tuple(existing) == key:
                return ref
        ref = f"S{len(self.entries) + 1}"
        self.entries[ref] = list(key)
        self.labels[ref] = label
        return ref


def entry_sources(entry: dict) -> list[str]:
    return sorted({p for paths in entry.get("sources", {}).values() for p in paths})
