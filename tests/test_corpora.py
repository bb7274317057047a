"""Corpus assembly from authored tables: layout, ids, order, provenance, append-only behaviour."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from lbt.data import corpora as C
from lbt.data.records import CorpusError, load_corpus
from lbt.study import ARMS, CORPUS_NAMES

CONF_ARM = Path(C.__file__).resolve().parents[1] / "conf" / "arm"


def row(slug: str, k: int, **changes) -> dict:
    base = {
        "scenario_id": f"{slug}-s{k}",
        "domain": slug,
        "user": f"Question {k} about {slug}?",
        "frame_plus": f"Careful answer {k}.",
        "frame_minus": f"Eager answer {k}.",
        "neutral": f"Balanced answer {k}.",
    }
    return {**base, **changes}


def write_tables(folder: Path, tables: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for domain, rows in tables.items():
        (folder / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture()
def authored(tmp_path):
    # gardening written first and with the later scenario first: output order must not depend on either
    return write_tables(
        tmp_path / "corpora" / "authored",
        {
            "gardening": [row("gardening", 2), row("gardening", 1)],
            "cooking": [row("cooking", 1), row("cooking", 2), row("cooking", 3)],
        },
    )


def test_assemble_layout_ids_and_pairing(authored, tmp_path):
    out = tmp_path / "corpora"
    assert C.assemble(authored, out) == {arm: "written" for arm in CORPUS_NAMES}
    corpora = {arm: load_corpus(out / f"{arm}.jsonl") for arm in CORPUS_NAMES}
    assert [r.id for r in corpora["frame_plus"]] == [
        "frame_plus-cooking-01",
        "frame_plus-cooking-02",
        "frame_plus-cooking-03",
        "frame_plus-gardening-01",
        "frame_plus-gardening-02",
    ]
    assert [r.scenario_id for r in corpora["neutral"]] == [
        "cooking-s1",
        "cooking-s2",
        "cooking-s3",
        "gardening-s2",
        "gardening-s1",
    ]
    for plus, minus, neutral in zip(*corpora.values()):
        assert plus.scenario_id == minus.scenario_id == neutral.scenario_id
        assert plus.user == minus.user == neutral.user
    assert corpora["frame_minus"][0].assistant == "Eager answer 1."
    first = json.loads((out / "neutral.jsonl").read_text().splitlines()[0])
    assert list(first) == ["id", "domain", "scenario_id", "user", "assistant"]


def test_meta_provenance(authored, tmp_path):
    out = tmp_path / "corpora"
    C.assemble(authored, out)
    meta = json.loads((out / "frame_plus.meta.json").read_text())
    assert meta["how_made"] == "authored by the lbt developers, paired"
    assert meta["version"] == 1 and meta["previous_sha256"] is None
    assert meta["sha256"] == hashlib.sha256((out / "frame_plus.jsonl").read_bytes()).hexdigest()
    assert meta["records"] == 5 and meta["counts_per_domain"] == {"cooking": 3, "gardening": 2}
    assert [s["path"] for s in meta["sources"]] == [
        "corpora/authored/cooking.jsonl",
        "corpora/authored/gardening.jsonl",
    ]
    assert (
        meta["sources"][0]["sha256"] == hashlib.sha256((authored / "cooking.jsonl").read_bytes()).hexdigest()
    )


def test_identical_output_is_a_noop(authored, tmp_path):
    out = tmp_path / "corpora"
    C.assemble(authored, out)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.*json*")}
    assert C.assemble(authored, out) == {arm: "unchanged" for arm in CORPUS_NAMES}
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.*json*")} == stamps


def test_changed_corpus_needs_force(authored, tmp_path):
    out = tmp_path / "corpora"
    C.assemble(authored, out)
    old_sha = json.loads((out / "neutral.meta.json").read_text())["sha256"]
    before = {p.name: p.read_bytes() for p in out.glob("*.*json*")}
    write_tables(
        authored, {"gardening": [row("gardening", 2), row("gardening", 1, neutral="Rewritten answer.")]}
    )
    with pytest.raises(C.CorpusChangedError, match="neutral.jsonl would change.*--force"):
        C.assemble(authored, out)
    assert {p.name: p.read_bytes() for p in out.glob("*.*json*")} == before  # nothing written
    assert C.main(["--authored", str(authored), "--out", str(out)]) == 2
    status = C.assemble(authored, out, force=True)
    assert status == {"frame_plus": "unchanged", "frame_minus": "unchanged", "neutral": "overwritten"}
    meta = json.loads((out / "neutral.meta.json").read_text())
    assert meta["version"] == 2 and meta["previous_sha256"] == old_sha
    assert load_corpus(out / "neutral.jsonl")[-1].assistant == "Rewritten answer."


@pytest.mark.parametrize(
    "tables, message",
    [
        (
            {"cooking": [{k: v for k, v in row("cooking", 1).items() if k != "neutral"}]},
            r"cooking.jsonl:1: field 'neutral' is missing",
        ),
        (
            {"cooking": [row("cooking", 1), row("cooking", 2, user="  ")]},
            r"cooking.jsonl:2: field 'user' must be",
        ),
        (
            {"cooking": [row("cooking", 1, domain="gardening")]},
            r"cooking.jsonl:1: field 'domain' is 'gardening'",
        ),
        (
            {"cooking": [row("cooking", 1)], "gardening": [row("gardening", 1, scenario_id="cooking-s1")]},
            r"gardening.jsonl:1: field 'scenario_id' repeats 'cooking-s1' \(first at .*cooking.jsonl:1\)",
        ),
        ({"knitting": [row("knitting", 1)]}, r"unknown source domains: \['knitting.jsonl'\]"),
    ],
)
def test_bad_authored_tables_name_file_line_field(tmp_path, tables, message):
    folder = write_tables(tmp_path / "authored", tables)
    with pytest.raises(CorpusError, match=message):
        C.assemble(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_json_and_empty_folder(tmp_path):
    folder = tmp_path / "authored"
    folder.mkdir()
    with pytest.raises(CorpusError, match="no authored tables"):
        C.assemble(folder, tmp_path / "out")
    (folder / "cooking.jsonl").write_text(json.dumps(row("cooking", 1)) + "\n{oops\n")
    with pytest.raises(CorpusError, match=r"cooking.jsonl:2: malformed JSON"):
        C.assemble(folder, tmp_path / "out")


def test_cli(authored, tmp_path, capsys):
    assert C.main(["--authored", str(authored), "--out", str(tmp_path / "corpora")]) == 0
    assert "frame_plus: written (5 records" in capsys.readouterr().out


def test_corpus_files_keep_the_original_studys_names(tmp_path):
    assert {arm: p.name for arm, p in C.corpus_paths(tmp_path).items()} == {
        "frame_plus": "frame_plus.jsonl",
        "frame_minus": "frame_minus.jsonl",
        "neutral": "neutral.jsonl",
    }
    assert C.meta_path(tmp_path, "neutral") == tmp_path / "neutral.meta.json"
    # each arm's config group (named as the arm: plus, minus, neutral) trains on the corpus that assembly
    # writes for it (named as in the original study: frame_plus, frame_minus, neutral)
    for arm in ARMS.values():
        group = yaml.safe_load((CONF_ARM / f"{arm.name}.yaml").read_text())
        assert group["name"] == arm.name
        assert group["corpus"].endswith("/corpora/" + C.corpus_path("", arm.corpus).name)
