"""Row files on disk: `<run dir>/eval/<phase>/<item_set>/<measure>.jsonl`, one JSON object per row.

Files are written once, atomically (a temporary file renamed into place), and never overwritten: a
phase or measure whose file exists is read back instead of scored again. Unscored stances are written
as NaN (Python's json reads and writes it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def phase_dir(run_dir: Path, phase: str) -> Path:
    return Path(run_dir) / "eval" / phase


def rows_path(run_dir: Path, phase: str, item_set: str, measure: str) -> Path:
    return phase_dir(run_dir, phase) / item_set / f"{measure}.jsonl"


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows once; an existing file is an error (run directories are append-only)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; rows are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json_once(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file written atomically, only if it does not exist yet."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; it is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
