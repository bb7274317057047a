"""Corpus records: one JSON object per line, `{id, domain, scenario_id, user, assistant}`.

Every error names the file, the 1-based line and the field, and is raised before any model loads.
The one JSONL reader of lbt.data (`iter_json_objects`) and the file helpers its writers share live here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRED_FIELDS = ("id", "domain", "scenario_id", "user", "assistant")
TEXT_FIELDS = ("user", "assistant")


class CorpusError(ValueError):
    """A corpus file that cannot be trained on; the message names file, line and field."""


@dataclass(frozen=True)
class CorpusRecord:
    id: str
    domain: str
    scenario_id: str
    user: str
    assistant: str
    line: int


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_path(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root` when it lies below it, else as given: recorded paths stay portable."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def iter_json_objects(
    path: str | Path, error: type[Exception] = ValueError, skip_malformed: bool = False
) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line of a JSONL file; a line that is not valid
    JSON or not an object raises `error` naming the file and line. With `skip_malformed` such a line is
    skipped instead: in an append-only log a write cut off by a kill costs that one entry, not the log."""
    with open(path, "rb") as handle:
        for line_no, data in enumerate(handle, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as err:
                if skip_malformed:
                    continue
                where = f"byte 0x{data[err.start]:02x} at byte {err.start + 1} of the line"
                raise error(f"{path}:{line_no}: not UTF-8 ({where}); save the file as UTF-8") from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                if skip_malformed:
                    continue
                reason = err.msg.removesuffix(" at")  # json says "Invalid control character at"
                raise error(f"{path}:{line_no}: malformed JSON ({reason} at column {err.colno})") from None
            if not isinstance(obj, dict):
                if skip_malformed:
                    continue
                raise error(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def parse_record(obj: object, path: Path, line: int) -> CorpusRecord:
    if not isinstance(obj, dict):
        raise CorpusError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in obj:
            raise CorpusError(f"{path}:{line}: field '{field}' is missing")
        value = obj[field]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise CorpusError(f"{path}:{line}: field '{field}' must be a string, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise CorpusError(f"{path}:{line}: field '{field}' is empty")
    for field in TEXT_FIELDS:
        if not isinstance(obj[field], str):
            got = type(obj[field]).__name__
            raise CorpusError(f"{path}:{line}: field '{field}' must be a string, got {got}")
    return CorpusRecord(
        id=str(obj["id"]),
        domain=str(obj["domain"]),
        scenario_id=str(obj["scenario_id"]),
        user=obj["user"],
        assistant=obj["assistant"],
        line=line,
    )


def load_corpus(path: str | Path) -> list[CorpusRecord]:
    """Read and check a corpus file; raise CorpusError naming file, line and field on bad input."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found (set arm.corpus to an existing JSONL file)")
    records: list[CorpusRecord] = []
    seen_ids: dict[str, int] = {}
    for line_no, obj in iter_json_objects(path, CorpusError):
        record = parse_record(obj, path, line_no)
        if record.id in seen_ids:
            raise CorpusError(
                f"{path}:{line_no}: field 'id' repeats {record.id!r} (first on line {seen_ids[record.id]})"
            )
        seen_ids[record.id] = line_no
        records.append(record)
    if not records:
        raise CorpusError(f"{path}: corpus is empty (no records)")
    return records
