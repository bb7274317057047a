"""Row files on disk: `<run dir>/eval/<phase>/<item_set>/<measure>.jsonl` (see lbt.rundir, their owner),
and how many rows the battery leaves in each (the completeness check behind DONE compares them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lbt.rundir import RunDir, read_rows, write_json_once, write_rows
from lbt.study import MEASURES, ORDERS

__all__ = ["expected_rows", "phase_dir", "read_rows", "rows_path", "write_json_once", "write_rows"]


def phase_dir(run_dir: Path, phase: str) -> Path:
    return RunDir(run_dir).phase_dir(phase)


def rows_path(run_dir: Path, phase: str, item_set: str, measure: str) -> Path:
    return RunDir(run_dir).rows(phase, item_set, measure)


def expected_rows(items: Iterable[Mapping[str, Any]], measure: str) -> int:
    """Rows `lbt.eval.battery` writes for `measure` on these items: one per question and option order.
    One question per item, except `logprob` (one per contrast template); every order of `ORDERS`,
    except `open_ended` (the advice is asked once, in the original order)."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; known: {list(MEASURES)}")
    orders = 1 if measure == "open_ended" else len(ORDERS)
    if measure == "logprob":
        return sum(len(item["contrasts"]) for item in items) * orders
    return sum(1 for _ in items) * orders
