"""Blocklist matching: separators, inflections, word boundaries, and the project's own file."""

from __future__ import annotations

import pytest

from lbt.data.blocklist import (
    Blocklist,
    BlocklistError,
    default_blocklist,
    lemma_pattern,
    load_blocklist,
)


def small() -> Blocklist:
    return Blocklist(
        {
            "target_domains": {
                "park_rules": ["e-bike", "drone"],
                "urban_transit": ["tram", "bus lane", "scooter"],
                "council_services": ["residents' portal", "council"],
                "workplace_policy": ["4-day week"],
            },
            "off_limits": {"ai": ["ai"], "politics": ["vote"]},
        }
    )


@pytest.mark.parametrize(
    "text",
    [
        "e-bike",
        "ebike",
        "e bike",
        "E-Bike",
        "EBIKES",
        "e  bike",
        "e\u2011bike",
        "e-bikes on the path",
        "an e-biker",
        "the e-bike's battery",
    ],
)
def test_separator_and_case_variants_match(text):
    hits = small().find_hits(text)
    assert [h.lemma for h in hits] == ["e-bike"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("two trams", "trams"),
        ("new bus lanes", "bus lanes"),
        ("a buslane", "buslane"),
        ("bus-lane", "bus-lane"),
        ("scootering", "scootering"),
        ("scooters", "scooters"),
        ("droning on", "droning"),
        ("droned", "droned"),
        ("voters", "voters"),
        ("voting", "voting"),
        ("Councils", "Councils"),
        ("the council's", "council"),
        ("residents portal", "residents portal"),
        ("residents\u2019 portal", "residents\u2019 portal"),
        ("a 4 day week", "4 day week"),
        ("4day week", "4day week"),
        ("AI", "AI"),
        ("AIs", "AIs"),
    ],
)
def test_inflections_and_variants_match(text, match):
    assert [h.match for h in small().find_hits(text)] == [match]


@pytest.mark.parametrize(
    "text",
    [
        "tramp",
        "tramline",
        "a trampoline",
        "said",
        "aim",
        "paid",
        "councillor-ish",
        "one bike",
        "the bike",
        "busy lane",
        "devote",
        "dronefly",
        "scoot",
    ],
)
def test_non_matches(text):
    # "councillor" is a separate lemma in the project file, not an inflection of "council".
    assert small().find_hits(text) == []


def test_hit_fields_and_positions():
    text = "Before the tram came, an E-Bike passed."
    hits = small().find_hits(text)
    assert [(h.domain, h.lemma, h.match, h.group) for h in hits] == [
        ("urban_transit", "tram", "tram", "target_domains"),
        ("park_rules", "e-bike", "E-Bike", "target_domains"),
    ]
    assert [text[h.start : h.start + len(h.match)] for h in hits] == ["tram", "E-Bike"]


def test_y_plural():
    pattern = lemma_pattern("subway")
    assert pattern.search("subways") and not pattern.search("subwayish")
    assert lemma_pattern("policy").search("policies")


def test_project_blocklist_loads_and_catches_examples():
    bl = default_blocklist()
    assert len(bl) > 100
    for text, domain in [
        ("the new bus lane", "urban_transit"),
        ("a four day week", "workplace_policy"),
        ("my thermostat", "smart_home"),
        ("ebikes", "park_rules"),
        ("the timetable", "school_timetable"),
        ("the local Council", "council_services"),
        ("as an AI", "ai"),
    ]:
        assert domain in {h.domain for h in bl.find_hits(text)}, text
    clean = "Knead the dough for ten minutes, then let it rest somewhere warm until doubled."
    assert bl.find_hits(clean) == []


def test_bad_blocklist_file(tmp_path):
    with pytest.raises(BlocklistError, match="not found"):
        load_blocklist(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_domains:\n  transit: tram\n")
    with pytest.raises(BlocklistError, match="target_domains.transit"):
        load_blocklist(bad)
    bad.write_text("off_limits: {}\n")
    with pytest.raises(BlocklistError, match="target_domains"):
        load_blocklist(bad)
