"""Row files on disk: `<run dir>/eval/<phase>/<item_set>/<measure>.jsonl` (see lbt.rundir, their owner)."""

from __future__ import annotations

from pathlib import Path

from lbt.rundir import RunDir, read_rows, write_json_once, write_rows

__all__ = ["phase_dir", "rows_path", "read_rows", "write_rows", "write_json_once"]


def phase_dir(run_dir: Path, phase: str) -> Path:
    return RunDir(run_dir).phase_dir(phase)


def rows_path(run_dir: Path, phase: str, item_set: str, measure: str) -> Path:
    return RunDir(run_dir).rows(phase, item_set, measure)
