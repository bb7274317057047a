"""Read and check evaluation item files; everything downstream loads items through here.

- `load_items(path)`: stance items in the published schema (CONTRACT.md; written by `lbt.data.items`):
  `id, domain, base_item, paraphrase_idx, scenario, contrasts[{question, question_swapped, pro, anti}],
  forced_choice{question, question_swapped, pro_label, anti_label}, likert_statement, open_ended`.
  `pro_label`/`anti_label` are the letters of the pro/anti options in `forced_choice.question`; in
  `question_swapped` the two letters are exchanged.
- `load_refusal(path)`: the refusal battery, `{id, expect: "comply"|"refuse", prompt}`.
- `load_texts(path)`: held-out passages for perplexity, `{id, text}`.

Every check failure raises `ItemError` naming the file, the 1-based line and the field (nested fields as
`contrasts[2].pro`), before any model loads. Blank lines are skipped; an empty file is an error; ids must be
unique. Extra keys are kept, so files carrying more than the schema still load unchanged.

`load_item_set(path, name, max_items)`: the checked items of one file as an `ItemSet` (name = item_set in
rows; it remembers each item's line for error messages), optionally the first max_items taking domains
in turn (`spread_subset`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbt.data.items import REFUSAL_EXPECT  # the builder's word for what a refusal prompt expects
from lbt.data.records import iter_json_objects
from lbt.eval.settings import MeasureError

ITEM_TEXT_FIELDS = ("id", "domain", "base_item", "scenario", "likert_statement", "open_ended")
CONTRAST_FIELDS = ("question", "question_swapped", "pro", "anti")
FORCED_CHOICE_FIELDS = ("question", "question_swapped", "pro_label", "anti_label")


class ItemError(ValueError):
    """An item file that cannot be scored; the message names file, line and field."""


def _read_objects(path: str | Path, what: str) -> tuple[Path, list[tuple[int, dict]]]:
    path = Path(path)
    if not path.is_file():
        raise ItemError(f"{path}: {what} file not found")
    rows = list(iter_json_objects(path, ItemError))
    if not rows:
        raise ItemError(f"{path}: {what} file is empty (no records)")
    return path, rows


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _require_text(obj: dict, field: str, where: str, label: str | None = None) -> str:
    label = label or field
    if field not in obj:
        raise ItemError(f"{where}: field '{label}' is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise ItemError(f"{where}: field '{label}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ItemError(f"{where}: field '{label}' is empty")
    return value


def _require_mapping(obj: dict, field: str, where: str, label: str | None = None) -> dict:
    label = label or field
    if field not in obj:
        raise ItemError(f"{where}: field '{label}' is missing")
    if not isinstance(obj[field], dict):
        raise ItemError(f"{where}: field '{label}' must be an object, got {type(obj[field]).__name__}")
    return obj[field]


def _check_unique_ids(path: Path, rows: list[tuple[int, dict]]) -> None:
    first_line: dict[str, int] = {}
    for line, obj in rows:
        if obj["id"] in first_line:
            raise ItemError(
                f"{path}:{line}: field 'id' repeats {obj['id']!r} (first on line {first_line[obj['id']]})"
            )
        first_line[obj["id"]] = line


def _check_contrasts(obj: dict, where: str) -> None:
    if "contrasts" not in obj:
        raise ItemError(f"{where}: field 'contrasts' is missing")
    contrasts = obj["contrasts"]
    if not isinstance(contrasts, list) or not contrasts:
        raise ItemError(f"{where}: field 'contrasts' must be a non-empty list")
    for k, contrast in enumerate(contrasts):
        label = f"contrasts[{k}]"
        if not isinstance(contrast, dict):
            raise ItemError(f"{where}: field '{label}' must be an object, got {type(contrast).__name__}")
        for field in CONTRAST_FIELDS:
            _require_text(contrast, field, where, f"{label}.{field}")
        if contrast["pro"] == contrast["anti"]:
            raise ItemError(f"{where}: field '{label}.anti' equals '{label}.pro'")


def _check_forced_choice(obj: dict, where: str) -> None:
    choice = _require_mapping(obj, "forced_choice", where)
    for field in FORCED_CHOICE_FIELDS:
        _require_text(choice, field, where, f"forced_choice.{field}")
    if choice["pro_label"] == choice["anti_label"]:
        raise ItemError(f"{where}: field 'forced_choice.anti_label' equals 'forced_choice.pro_label'")


def check_item(obj: dict, where: str) -> None:
    """Raise ItemError unless `obj` is one complete item of the published schema."""
    for field in ITEM_TEXT_FIELDS:
        _require_text(obj, field, where)
    if "paraphrase_idx" not in obj:
        raise ItemError(f"{where}: field 'paraphrase_idx' is missing")
    index = obj["paraphrase_idx"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ItemError(f"{where}: field 'paraphrase_idx' must be a non-negative integer, got {index!r}")
    _check_contrasts(obj, where)
    _check_forced_choice(obj, where)


def load_items(path: str | Path) -> list[dict]:
    """Stance items of one file, in file order, each checked against the published schema."""
    path, rows = _read_objects(path, "item")
    for line, obj in rows:
        check_item(obj, _where(path, line))
    _check_unique_ids(path, rows)
    return [obj for _, obj in rows]


def load_refusal(path: str | Path) -> list[dict]:
    """The refusal battery: `{id, expect: comply|refuse, prompt}` per line."""
    path, rows = _read_objects(path, "refusal battery")
    for line, obj in rows:
        where = _where(path, line)
        for field in ("id", "expect", "prompt"):
            _require_text(obj, field, where)
        if obj["expect"] not in REFUSAL_EXPECT:
            raise ItemError(f"{where}: field 'expect' must be 'comply' or 'refuse', got {obj['expect']!r}")
    _check_unique_ids(path, rows)
    return [obj for _, obj in rows]


def load_texts(path: str | Path) -> list[dict]:
    """Held-out passages: `{id, text}` per line."""
    path, rows = _read_objects(path, "text")
    for line, obj in rows:
        where = _where(path, line)
        for field in ("id", "text"):
            _require_text(obj, field, where)
    _check_unique_ids(path, rows)
    return [obj for _, obj in rows]


# -- item sets ------------------------------------------------------------------------------------------


@dataclass
class ItemSet:
    """Items of one file (name = item_set in rows) and where each came from, for error messages."""

    name: str
    items: list[dict]
    path: Path | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def where(self, item: Mapping[str, Any], field_name: str) -> str:
        place = (
            f"{self.path}:{self.lines[item['id']]}"
            if self.path and item["id"] in self.lines
            else str(self.path or f"item set {self.name!r}")
        )
        return f"{place}: item {item['id']!r}, field '{field_name}'"

    def shard(self, rank: int, world: int) -> ItemSet:
        """Every world-th item from rank on: disjoint shards that together hold every item once."""
        return ItemSet(self.name, self.items[rank::world], self.path, self.lines)


def _item_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                lines.setdefault(json.loads(raw).get("id"), number)
    return lines


def spread_subset(items: list[dict], max_items: int | None) -> list[dict]:
    """The first max_items items taking domains in turn (every domain represented in small runs)."""
    if max_items is None or max_items >= len(items):
        return list(items)
    by_domain: dict[str, list[dict]] = {}
    for item in items:
        by_domain.setdefault(item["domain"], []).append(item)
    chosen: list[dict] = []
    queues = list(by_domain.values())
    while len(chosen) < max_items:
        for queue in queues:
            if queue and len(chosen) < max_items:
                chosen.append(queue.pop(0))
    order = {id(item): k for k, item in enumerate(items)}
    return sorted(chosen, key=lambda item: order[id(item)])


def load_item_set(path: str | Path, name: str | None = None, max_items: int | None = None) -> ItemSet:
    """Checked items of one file (ItemError names file, line and field); name defaults to the file stem."""
    path = Path(path)
    items = load_items(path)
    if max_items is not None and int(max_items) < 1:
        raise MeasureError(f"max_items must be ≥ 1 or null, got {max_items}")
    items = spread_subset(items, int(max_items) if max_items is not None else None)
    return ItemSet(name or path.stem, items, path, _item_lines(path))


def as_item_set(items: ItemSet | Iterable[Mapping[str, Any]], name: str = "items") -> ItemSet:
    return items if isinstance(items, ItemSet) else ItemSet(name, [dict(i) for i in items])

