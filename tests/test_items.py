"""Eval item sets: the builder (lbt.data.items), the freeze, and the loader (lbt.eval.items)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lbt.data.items import (
    LOCK_NAME,
    OUTPUT_FILES,
    TableError,
    build,
    build_scenario_items,
    main,
)
from lbt.eval.items import ItemError, load_items, load_refusal, load_texts

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "data" / "eval"
TABLES = EVAL / "tables"
REFERENCE = ROOT.parent / "shared" / "reference" / "seed-eval"
TARGET_DOMAINS = {
    "urban_transit",
    "workplace_policy",
    "smart_home",
    "park_rules",
    "school_timetable",
    "council_services",
}
SOURCE_DOMAINS = {
    "cooking",
    "gardening",
    "home_renovation",
    "personal_fitness",
    "software_development",
    "board_games_hobbies",
    "travel_planning",
    "small_business",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    build(TABLES, out)
    return out


@pytest.fixture(scope="module")
def target() -> list[dict]:
    return load_items(EVAL / "target_items.jsonl")


@pytest.fixture(scope="module")
def source() -> list[dict]:
    return load_items(EVAL / "source_items.jsonl")


def item_strings(item: dict) -> list[str]:
    """Every text of an item that a model could be shown."""
    texts = [item["scenario"], item["likert_statement"], item["open_ended"]]
    texts += [c[key] for c in item["contrasts"] for key in ("question", "question_swapped")]
    texts += [item["forced_choice"]["question"], item["forced_choice"]["question_swapped"]]
    return texts


def lemma_regex(lemma: str) -> re.Pattern[str]:
    """Simple, independent matcher: word boundaries, space/hyphen/nothing between parts, -s/-es/-ed/-ing."""
    parts = [re.escape(p) for p in re.split(r"[\s-]+", lemma.lower()) if p]
    return re.compile(r"\b" + r"[\s-]?".join(parts) + r"(?:s|es|ed|ing)?\b", re.IGNORECASE)


def blocklist_patterns(group: str) -> list[tuple[str, re.Pattern[str]]]:
    raw = yaml.safe_load((ROOT / "data" / "blocklist.yaml").read_text(encoding="utf-8"))
    return [(lemma, lemma_regex(lemma)) for lemmas in raw[group].values() for lemma in lemmas]


# --- the committed files are what the tables build ---------------------------------------------------


def test_builder_reproduces_committed_files_bit_for_bit(built: Path) -> None:
    for name in OUTPUT_FILES:
        assert (built / name).read_bytes() == (EVAL / name).read_bytes(), f"{name} differs from its tables"
    built_lock = json.loads((built / LOCK_NAME).read_text(encoding="utf-8"))
    committed_lock = json.loads((EVAL / LOCK_NAME).read_text(encoding="utf-8"))
    assert built_lock["files"] == committed_lock["files"]


def test_output_format_is_one_compact_object_per_line(built: Path) -> None:
    data = (built / "target_items.jsonl").read_bytes()
    assert data.endswith(b"\n") and not data.endswith(b"\n\n")
    first = data.decode("utf-8").splitlines()[0]
    assert list(json.loads(first)) == [
        "id",
        "domain",
        "base_item",
        "paraphrase_idx",
        "scenario",
        "contrasts",
        "forced_choice",
        "likert_statement",
        "open_ended",
    ]
    assert "£" in (built / "target_items.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False


def test_counts_and_domains(target: list[dict], source: list[dict]) -> None:
    assert len(target) >= 144 and len(source) >= 72
    for items, domains, min_bases in ((target, TARGET_DOMAINS, 8), (source, SOURCE_DOMAINS, 3)):
        assert {it["domain"] for it in items} == domains
        for domain in domains:
            bases = {it["base_item"] for it in items if it["domain"] == domain}
            assert len(bases) >= min_bases, domain
        for base in {it["base_item"] for it in items}:
            assert sorted(it["paraphrase_idx"] for it in items if it["base_item"] == base) == [0, 1, 2]
    assert len(load_refusal(EVAL / "refusal_battery.jsonl")) >= 40
    passages = load_texts(EVAL / "heldout_neutral.jsonl")
    assert len(passages) >= 30
    for passage in passages:
        assert 80 <= len(passage["text"].split()) <= 150, passage["id"]


def test_refusal_battery_has_both_expectations() -> None:
    expects = [row["expect"] for row in load_refusal(EVAL / "refusal_battery.jsonl")]
    assert expects.count("comply") >= 20 and expects.count("refuse") >= 12


def test_ids_unique_and_well_formed(target: list[dict], source: list[dict]) -> None:
    ids = [it["id"] for it in target + source]
    assert len(ids) == len(set(ids))
    for it in target + source:
        assert it["id"] == f"{it['base_item']}-p{it['paraphrase_idx']}"
        assert re.fullmatch(rf"{it['domain']}-\d{{3}}", it["base_item"])
    for loader, name in ((load_refusal, "refusal_battery.jsonl"), (load_texts, "heldout_neutral.jsonl")):
        row_ids = [row["id"] for row in loader(EVAL / name)]
        assert len(row_ids) == len(set(row_ids))


# --- item structure ------------------------------------------------------------------------------------


def first_position(text: str, word: str) -> int:
    match = re.search(rf"\b{re.escape(word.strip())}\b", text, re.IGNORECASE)
    assert match, f"option {word!r} not named in {text!r}"
    return match.start()


def test_every_item_has_four_contrasts_whose_swap_reverses_the_options(
    target: list[dict], source: list[dict]
) -> None:
    for it in target + source:
        assert len(it["contrasts"]) == 4
        assert len({(c["pro"], c["anti"]) for c in it["contrasts"]}) == 4
        for c in it["contrasts"]:
            assert c["pro"].startswith(" ") and c["anti"].startswith(" ")
            assert len(c["pro"].split()) == 1 and len(c["anti"].split()) == 1
            for key in ("question", "question_swapped"):
                assert c[key].startswith(it["scenario"] + " ") and c[key].endswith("Answer:")
            tail = c["question"][len(it["scenario"]) :]
            tail_swapped = c["question_swapped"][len(it["scenario"]) :]
            assert first_position(tail, c["pro"]) < first_position(tail, c["anti"]), it["id"]
            assert first_position(tail_swapped, c["anti"]) < first_position(tail_swapped, c["pro"]), it["id"]


def test_forced_choice_lists_pro_as_a_then_swaps(target: list[dict], source: list[dict]) -> None:
    for it in target + source:
        fc = it["forced_choice"]
        assert (fc["pro_label"], fc["anti_label"]) == ("A", "B")
        pro = it["likert_statement"]
        anti_line = re.search(r"\nB\. (.*)\n", fc["question"]).group(1)
        assert f"\nA. {pro}\nB. {anti_line}\nAnswer:" in fc["question"]
        assert f"\nA. {anti_line}\nB. {pro}\nAnswer:" in fc["question_swapped"]
        assert anti_line != pro and "letter" in fc["question"] and fc["question"].startswith(it["scenario"])
        assert it["open_ended"].startswith(it["scenario"]) and "advice" in it["open_ended"]


# --- target/source separation ------------------------------------------------------------------------


def test_no_target_text_in_source_set(target: list[dict], source: list[dict]) -> None:
    source_text = "\n".join(s for it in source for s in item_strings(it))
    for it in target:
        assert it["scenario"] not in source_text
        assert it["likert_statement"] not in source_text


def test_source_items_use_no_target_domain_lemma(source: list[dict]) -> None:
    patterns = blocklist_patterns("target_domains") + blocklist_patterns("off_limits")
    for it in source:
        for text in item_strings(it):
            hits = [lemma for lemma, pattern in patterns if pattern.search(text)]
            assert not hits, f"{it['id']}: {hits}"


def test_heldout_neutral_passages_avoid_target_domains() -> None:
    patterns = blocklist_patterns("target_domains") + blocklist_patterns("off_limits")
    for passage in load_texts(EVAL / "heldout_neutral.jsonl"):
        hits = [lemma for lemma, pattern in patterns if pattern.search(passage["text"])]
        assert not hits, f"{passage['id']}: {hits}"


def test_lemma_regex_catches_variants() -> None:  # the helper above must be able to fail
    assert lemma_regex("e-bike").search("two E bikes")
    assert lemma_regex("tram").search("Trams ran") and not lemma_regex("tram").search("a tramp")


# --- freezing ----------------------------------------------------------------------------------------


def test_rebuild_of_unchanged_tables_is_a_noop(built: Path) -> None:
    lock_before = (built / LOCK_NAME).read_bytes()
    assert main(["--tables", str(TABLES), "--out", str(built)]) == 0
    assert (built / LOCK_NAME).read_bytes() == lock_before


def test_freeze_refuses_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tables, out = tmp_path / "tables", tmp_path / "out"
    shutil.copytree(TABLES, tables)
    assert main(["--tables", str(tables), "--out", str(out)]) == 0
    frozen = (out / "source_items.jsonl").read_bytes()
    text = (tables / "source.yaml").read_text(encoding="utf-8")
    (tables / "source.yaml").write_text(text.replace("supper club", "dinner club"), encoding="utf-8")

    assert main(["--tables", str(tables), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "source_items.jsonl" in err and "frozen" in err and "--force" in err
    assert (out / "source_items.jsonl").read_bytes() == frozen
    assert json.loads((out / LOCK_NAME).read_text())["version"] == 1

    assert main(["--tables", str(tables), "--out", str(out), "--force"]) == 0
    assert b"dinner club" in (out / "source_items.jsonl").read_bytes()
    lock = json.loads((out / LOCK_NAME).read_text())
    assert lock["version"] == 2
    assert lock["files"]["source_items.jsonl"]["n_items"] == len(load_items(out / "source_items.jsonl"))


def test_builder_rejects_verdict_word_in_proposal(tmp_path: Path) -> None:
    table = {
        "version": 1,
        "domains": {
            "cooking": [
                {
                    "id": "cooking-000",
                    "actor": "the cook",
                    "proposal": "a good new menu",
                    "scenarios": ["A cook weighs a new menu."],
                    "pro": "Yes.",
                    "anti": "No.",
                }
            ]
        },
    }
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(table), encoding="utf-8")
    with pytest.raises(TableError, match=r"cooking-000.*'proposal'.*'good'"):
        build_scenario_items(path)


# --- loader ------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_loader_names_file_line_and_missing_field(tmp_path: Path, target: list[dict]) -> None:
    broken = dict(target[1])
    del broken["likert_statement"]
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(target[0]), json.dumps(broken)])
    with pytest.raises(ItemError, match=re.escape(f"{path}:2: field 'likert_statement' is missing")):
        load_items(path)


def test_loader_names_nested_field(tmp_path: Path, target: list[dict]) -> None:
    broken = json.loads(json.dumps(target[0]))
    del broken["contrasts"][2]["anti"]
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(broken)])
    with pytest.raises(ItemError, match=re.escape(f"{path}:1: field 'contrasts[2].anti' is missing")):
        load_items(path)
    broken = json.loads(json.dumps(target[0]))
    broken["paraphrase_idx"] = "1"
    write_lines(path, [json.dumps(broken)])
    with pytest.raises(ItemError, match=re.escape(f"{path}:1: field 'paraphrase_idx'")):
        load_items(path)


def test_loader_rejects_malformed_json_and_empty_file(tmp_path: Path, target: list[dict]) -> None:
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(target[0]), "", '{"id": "x",'])
    with pytest.raises(ItemError, match=re.escape(f"{path}:3: malformed JSON")):
        load_items(path)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    for loader in (load_items, load_refusal, load_texts):
        with pytest.raises(ItemError, match=re.escape(f"{empty}: ") + ".*empty"):
            loader(empty)


def test_loader_rejects_duplicate_ids(tmp_path: Path, target: list[dict]) -> None:
    path = write_lines(tmp_path / "items.jsonl", [json.dumps(target[0])] * 2)
    with pytest.raises(ItemError, match=re.escape(f"{path}:2: field 'id' repeats")):
        load_items(path)


def test_refusal_and_text_loaders_check_fields(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "refusal.jsonl", [json.dumps({"id": "r1", "expect": "maybe", "prompt": "Hi"})]
    )
    with pytest.raises(ItemError, match=re.escape(f"{path}:1: field 'expect'")):
        load_refusal(path)
    path = write_lines(
        tmp_path / "texts.jsonl", [json.dumps({"id": "t1", "text": "Fine."}), json.dumps({"id": "t2"})]
    )
    with pytest.raises(ItemError, match=re.escape(f"{path}:2: field 'text' is missing")):
        load_texts(path)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference folder ../shared/reference/seed-eval absent")
def test_reference_files_load_unchanged() -> None:
    assert len(load_items(REFERENCE / "target_items.jsonl")) == 54
    assert len(load_items(REFERENCE / "source_items.jsonl")) == 24
    assert len(load_refusal(REFERENCE / "refusal_battery.jsonl")) == 35
