"""The documents point at things that exist: every test a doc names as evidence, every module path."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
# `tests/test_x.py::test_name`, or `::test_name` continuing the last file named on the same line.
TEST_REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|::(\w+)")
SRC_REF = re.compile(r"`(src/lbt/[\w/.*]+)`")


def test_references(text: str) -> list[tuple[str, str | None]]:
    refs, current = [], None
    for line in text.splitlines():
        current = None
        for match in TEST_REF.finditer(line):
            if match.group(1):
                current = match.group(1)
                refs.append((current, match.group(2)))
            elif current:
                refs.append((current, match.group(3)))
    return refs


test_references.__test__ = False  # a helper, not a test


def test_the_reference_finder_reads_both_forms():
    text = "see `tests/test_a.py::test_one`, `::test_two` and tests/test_b.py\n`::test_orphan`"
    assert test_references(text) == [("tests/test_a.py", "test_one"), ("tests/test_a.py", "test_two"),
                                      ("tests/test_b.py", None)]


def test_every_test_a_document_names_exists():
    missing = []
    for doc in DOCS:
        for path, name in test_references(doc.read_text(encoding="utf-8")):
            file = ROOT / path
            if not file.exists():
                missing.append(f"{doc.name}: {path}")
            elif name and not re.search(rf"def {name}\(", file.read_text(encoding="utf-8")):
                missing.append(f"{doc.name}: {path}::{name}")
    assert missing == []


def test_every_source_path_a_document_names_exists():
    def exists(path: str) -> bool:
        return any(ROOT.glob(path.rstrip("/"))) if "*" in path else (ROOT / path).exists()

    missing = [f"{doc.name}: {path}" for doc in DOCS for path in SRC_REF.findall(doc.read_text(encoding="utf-8"))
               if not exists(path)]
    assert missing == []
