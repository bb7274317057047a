"""Preregistration lock: the analysis settings and the frozen item files, hashed before target items
are scored.

`python -m lbt.analyze prereg-lock` writes the lock; `python -m lbt.analyze <sweep>` recomputes both
hashes and refuses to score target items when they differ (or the lock is missing) unless the run is
declared exploratory. Hashes are SHA-256 over canonical JSON (sorted keys) and over file bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from lbt.data.records import file_sha256

LOCK_KIND = "lbt-prereg-lock"
LOCK_VERSION = 1


class LockError(RuntimeError):
    """Target items would be scored without a matching preregistration lock."""


def canonical_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def item_hashes(items_dir: Path) -> dict[str, str]:
    """SHA-256 of every frozen item file (*.jsonl) in the items directory, by file name."""
    items_dir = Path(items_dir)
    if not items_dir.is_dir():
        raise LockError(f"items directory {items_dir} does not exist")
    files = sorted(items_dir.glob("*.jsonl"))
    if not files:
        raise LockError(f"no item files (*.jsonl) in {items_dir}")
    return {path.name: file_sha256(path) for path in files}


def build_lock(settings: dict[str, Any], items_dir: Path) -> dict[str, Any]:
    items = item_hashes(items_dir)
    return {
        "kind": LOCK_KIND,
        "version": LOCK_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "settings_sha256": canonical_sha256(settings),
        "items_dir": str(items_dir),
        "items": items,
        "items_sha256": canonical_sha256(items),
    }


def write_lock(path: Path, settings: dict[str, Any], items_dir: Path) -> dict[str, Any]:
    """Write a new lock; an existing lock is never overwritten (a preregistration is written once)."""
    path = Path(path)
    if path.exists():
        raise LockError(f"{path} already exists; a preregistration lock is never overwritten")
    lock = build_lock(settings, items_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(lock, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return lock


def check_lock(path: Path, settings: dict[str, Any], items_dir: Path) -> dict[str, Any]:
    """The lock, if it matches the current settings and item files; otherwise LockError saying why."""
    path = Path(path)
    if not path.exists():
        raise LockError(f"no preregistration lock at {path}")
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LockError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(lock, dict) or lock.get("kind") != LOCK_KIND:
        raise LockError(f"{path}: not an lbt preregistration lock (field 'kind' != {LOCK_KIND!r})")
    problems = []
    if lock.get("settings_sha256") != canonical_sha256(settings):
        locked = lock.get("settings", {})
        changed = sorted(k for k in set(locked) | set(settings) if locked.get(k) != settings.get(k))
        problems.append(f"analysis settings differ from the locked ones in {changed}")
    current = item_hashes(items_dir)
    locked_items = lock.get("items", {})
    changed_items = sorted(
        n for n in set(current) | set(locked_items) if current.get(n) != locked_items.get(n)
    )
    if changed_items:
        problems.append(f"item files in {items_dir} differ from the locked ones: {changed_items}")
    if problems:
        raise LockError(f"{path} does not match: " + "; ".join(problems))
    return lock
