"""Corpus records and the data package's file helpers: the JSONL reader, sha256, relative paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lbt.data.records import (
    CorpusError,
    file_sha256,
    iter_json_objects,
    load_corpus,
    relative_path,
)


def record(k: int, **changes) -> dict:
    base = {"id": f"r{k}", "domain": "cooking", "scenario_id": f"s{k}", "user": "Q?", "assistant": "A."}
    return {**base, **changes}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_iter_json_objects_numbers_lines_and_skips_blank_ones(tmp_path):
    path = write(tmp_path / "a.jsonl", [json.dumps({"a": 1}), "", "  ", json.dumps({"b": 2})])
    assert list(iter_json_objects(path)) == [(1, {"a": 1}), (4, {"b": 2})]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{oops", r"a.jsonl:2: malformed JSON \(.* at column 2\)"),
        ("[1, 2]", r"a.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_iter_json_objects_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "a.jsonl", [json.dumps({"a": 1}), bad])
    with pytest.raises(CorpusError, match=message):
        list(iter_json_objects(path, CorpusError))


def test_a_line_that_is_not_utf8_is_named_by_file_line_and_byte(tmp_path):
    path = write(tmp_path / "a.jsonl", [json.dumps({"a": 1}), json.dumps({"b": 2})])
    path.write_bytes(path.read_bytes() + b'{"c": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"a.jsonl:3: not UTF-8 \(byte 0xe9 at byte 11 of the line\)"):
        list(iter_json_objects(path, CorpusError))
    assert list(iter_json_objects(path, skip_malformed=True)) == [(1, {"a": 1}), (2, {"b": 2})]


def test_a_control_character_is_named_once(tmp_path):
    path = write(tmp_path / "a.jsonl", ['{"a": "x\ty"}'])
    named = r"a.jsonl:1: malformed JSON \(Invalid control character at column 9\)"
    with pytest.raises(CorpusError, match=named):
        list(iter_json_objects(path, CorpusError))


def test_iter_json_objects_can_skip_cut_off_lines(tmp_path):
    # A log line cut off by a kill, with the next run's entry appended to it, then a whole entry.
    path = write(tmp_path / "log.jsonl", ['{"a": 1}', '{"cut{"b": 2}', "[3]", '{"c": 3}'])
    assert list(iter_json_objects(path, skip_malformed=True)) == [(1, {"a": 1}), (4, {"c": 3})]


def test_load_corpus_errors_name_file_line_and_field(tmp_path):
    path = write(tmp_path / "c.jsonl", [json.dumps(record(1)), json.dumps(record(2, user=" "))])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: field 'user' is empty"):
        load_corpus(path)
    write(path, [json.dumps(record(1)), json.dumps(record(2, domain=""))])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: field 'domain' is empty"):
        load_corpus(path)
    write(path, [json.dumps(record(1)), json.dumps(record(2, user=5))])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: field 'user' must be a string, got int"):
        load_corpus(path)
    write(path, [json.dumps(record(1)), json.dumps({k: v for k, v in record(2).items() if k != "domain"})])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: field 'domain' is missing"):
        load_corpus(path)
    write(path, [json.dumps(record(1)), json.dumps(record(1))])
    with pytest.raises(CorpusError, match=r"c.jsonl:2: field 'id' repeats 'r1' \(first on line 1\)"):
        load_corpus(path)
    write(path, [json.dumps(record(1)), json.dumps(record(2))])
    assert [(r.id, r.line) for r in load_corpus(path)] == [("r1", 1), ("r2", 2)]


def test_file_sha256_and_relative_path(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * 3_000_000)  # more than one read block
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert relative_path(path, tmp_path) == "sub/f.bin"
    assert relative_path(path, tmp_path / "other") == str(path)
