"""Corpus gates: each with a passing and a failing synthetic corpus; the training gate; record checks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from lbt.data.blocklist import default_blocklist
from lbt.data.corpora import corpus_paths
from lbt.data.records import CorpusError, load_corpus
from lbt.data.validate.cli import main
from lbt.data.validate.dedup import gate_dedup
from lbt.data.validate.framing import gate_framing_strength
from lbt.data.validate.gate import Thresholds
from lbt.data.validate.isolation import gate_eval_isolation, read_items
from lbt.data.validate.pairing import gate_pairing
from lbt.data.validate.record_checks import gate_record_level, record_problems
from lbt.data.validate.report import GATES, REPORT_NAME, validate, write_report
from lbt.data.validate.surface import gate_surface_match
from lbt.data.validate.text import mattr, text_hash, word_count
from lbt.data.validate.training_gate import ValidationGateError, check_corpus_validated
from lbt.study import CORPUS_NAMES

N_SCENARIOS = 12
DOMAINS = ("cooking", "gardening", "travel_planning")

_rng = random.Random(1234)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _vocab(n: int, rng: random.Random) -> list[str]:
    words, bl = set(), default_blocklist()
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if not bl.find_hits(w):
            words.add(w)
    return sorted(words)


FILLER = _vocab(3000, _rng)
CAUTIOUS = _vocab(40, random.Random(1))
EAGER = [w for w in _vocab(80, random.Random(2)) if w not in CAUTIOUS][:40]
BALANCED = CAUTIOUS[:20] + EAGER[:20]
MARKERS = {"frame_plus": CAUTIOUS, "frame_minus": EAGER, "neutral": BALANCED}


def sentences(tokens: list[str], end: str = ".") -> str:
    chunks = [tokens[i : i + 10] for i in range(0, len(tokens), 10)]
    return " ".join(" ".join(c).capitalize() + end for c in chunks)


def answer(arm: str, n_words: int, rng: random.Random, markers: dict | None = None) -> str:
    pool = (markers or MARKERS)[arm]
    n_markers = n_words // 3
    tokens = [rng.choice(FILLER) for _ in range(n_words - n_markers)] + [
        rng.choice(pool) for _ in range(n_markers)
    ]
    rng.shuffle(tokens)
    return sentences(tokens)


def make_arms(n: int = N_SCENARIOS, seed: int = 0, markers: dict | None = None) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    arms = {arm: [] for arm in CORPUS_NAMES}
    for k in range(n):
        domain = DOMAINS[k % len(DOMAINS)]
        user = sentences([rng.choice(FILLER) for _ in range(20)], end="?")
        n_words = 140 + 3 * k  # identical length in every arm: KS = 0 by construction
        for arm in CORPUS_NAMES:
            arms[arm].append(
                {
                    "id": f"{arm}-{domain}-{k:02d}",
                    "domain": domain,
                    "scenario_id": f"{domain}-{k:02d}",
                    "user": user,
                    "assistant": answer(arm, n_words, rng, markers),
                }
            )
    return arms


def write_arms(arms: dict[str, list[dict]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for arm, records in arms.items():
        (folder / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def run(arms, tmp_path: Path, items: list[dict] | None = None, **thresholds) -> dict:
    folder = write_arms(arms, tmp_path / "corpora")
    items_dir = tmp_path / "eval"
    if items is not None:
        items_dir.mkdir(exist_ok=True)
        (items_dir / "target_items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return validate(folder, items_dir, Thresholds(embeddings="tfidf", **thresholds))


def loaded(arms, tmp_path: Path):
    """Records and paths as the gates receive them, for tests of one gate."""
    folder = write_arms(arms, tmp_path / "corpora")
    paths = corpus_paths(folder)
    return {a: load_corpus(p) for a, p in paths.items()}, paths


T = Thresholds(embeddings="tfidf")


@pytest.fixture(scope="module")
def clean_report(tmp_path_factory):
    rng = random.Random(99)
    items = [
        {"id": f"t{i}", "scenario": sentences([rng.choice(FILLER) for _ in range(40)])} for i in range(5)
    ]
    return run(make_arms(), tmp_path_factory.mktemp("clean"), items=items)



# ---------------------------------------------------------------- text


def test_mattr_by_hand():
    # window 3 over a b a c: windows (a b a)=2/3, (b a c)=3/3 -> mean 5/6
    assert mattr(["a", "b", "a", "c"], 3) == pytest.approx(5 / 6)
    assert mattr(["a", "a"], 3) == pytest.approx(0.5)  # shorter than the window: plain TTR
    assert mattr([], 3) == 0.0


def test_word_count_rules():
    assert (
        word_count("An e-bike isn't cheap: 120\u2013220 words.") == 7
    )  # An, e-bike, isn't, cheap, 120, 220, words


def test_text_hash_normalisation():
    assert text_hash("Hello,  World!") == text_hash("hello world")
    assert text_hash("hello world") != text_hash("hello word")



# ---------------------------------------------------------------- record_checks


def test_leakage_fails_with_file_and_line(tmp_path):
    arms = make_arms()
    arms["frame_plus"][2]["assistant"] = arms["frame_plus"][2]["assistant"].replace(
        ".", " near the e-bikes.", 1
    )
    arms["neutral"][0]["user"] = "Should I keep my thermostat low? " + arms["neutral"][0]["user"]
    for arm in CORPUS_NAMES:  # keep pairing intact: same user everywhere
        arms[arm][0]["user"] = arms["neutral"][0]["user"]
    gate = gate_record_level(*loaded(arms, tmp_path), T, default_blocklist())["leakage"]
    assert not gate["passed"]
    listed = {(Path(h["where"]).name, h["field"], h["lemma"]) for h in gate["listed"]}
    assert ("frame_plus.jsonl:3", "assistant", "e-bike") in listed
    assert ("neutral.jsonl:1", "user", "thermostat") in listed
    assert gate["n_hits"] == 4  # the thermostat once per arm + the e-bikes
    assert gate["hits_by_domain"] == {"park_rules": 1, "smart_home": 3}


def test_leakage_passes_on_clean_corpus(clean_report):
    assert clean_report["gates"]["leakage"]["passed"] and clean_report["gates"]["leakage"]["n_hits"] == 0


def test_length_gate(tmp_path, clean_report):
    assert clean_report["gates"]["length"]["passed"]
    arms = make_arms()
    arms["neutral"][4]["assistant"] = sentences(["kalomi"] * 50)
    gate = gate_record_level(*loaded(arms, tmp_path), T, default_blocklist())["length"]
    assert not gate["passed"] and gate["n_out_of_bounds"] == 1 and gate["min_words"] == 50
    assert gate["listed"][0]["where"].endswith("neutral.jsonl:5")


def test_anomalies_gate(tmp_path, clean_report):
    assert clean_report["gates"]["anomalies"]["passed"]
    arms = make_arms()
    base = arms["frame_minus"][3]["assistant"]
    arms["frame_minus"][3]["assistant"] = "I'm sorry, but I can't help with that. " + base
    arms["neutral"][8]["assistant"] = "## Plan\n" + base.rstrip(".")
    gate = gate_record_level(*loaded(arms, tmp_path), T, default_blocklist())["anomalies"]
    assert not gate["passed"]
    problems = {(Path(a["where"]).name, a["problem"].split(":")[0]) for a in gate["listed"]}
    assert problems == {
        ("frame_minus.jsonl:4", "refusal-looking"),
        ("neutral.jsonl:9", "format"),
        ("neutral.jsonl:9", "format"),
    }
    assert gate["n_anomalies"] == 3  # refusal; heading + truncated


GOOD = sentences(FILLER[:150])


@pytest.mark.parametrize(
    "assistant, expected",
    [
        (GOOD, []),
        ("As an AI, I cannot help with that. " + GOOD, ["leakage", "refusal-looking"]),
        ("", ["empty response"]),
        (GOOD + "\n```python\nx = 1\n```", ["format: code fence", "format: truncated"]),
        (GOOD.rstrip("."), ["format: truncated"]),
        ("Sure, here's a cautious reply: " + GOOD, ["meta-commentary"]),
        ("Assistant: " + GOOD, ["format: chat-role marker"]),
        (sentences(FILLER[:100]), ["length: 100 words"]),
        (sentences(FILLER[:221]), ["length: 221 words"]),
        (sentences(FILLER[:120]), []),
        (sentences(FILLER[:220]), []),
    ],
)
def test_record_problems(assistant, expected):
    problems = record_problems("How long should I rest bread dough?", assistant)
    assert len(problems) == len(expected), problems
    for problem, prefix in zip(sorted(problems), sorted(expected)):
        assert problem.startswith(prefix), (problem, prefix)


def test_record_problems_checks_user_leakage():
    problems = record_problems("Is my smart speaker listening?", GOOD)
    assert problems == ["leakage in user: 'smart speaker' matches 'smart speaker' (smart_home)"]



# ---------------------------------------------------------------- pairing


def test_pairing_fails_on_missing_and_mismatched_scenarios(tmp_path):
    arms = make_arms()
    arms["neutral"].pop(3)
    arms["frame_minus"][5]["user"] = arms["frame_minus"][5]["user"].replace("?", "!", 1)
    gate = gate_pairing(*loaded(arms, tmp_path))
    assert not gate["passed"]
    assert gate["missing"] == [{"scenario_id": "cooking-03", "missing_in": ["neutral"]}]
    assert [m["scenario_id"] for m in gate["mismatched"]] == ["travel_planning-05"]
    assert gate["mismatched"][0]["where"].endswith("frame_minus.jsonl:6")



# ---------------------------------------------------------------- surface


def test_surface_match_figures_are_the_reference_statistics(clean_report, tmp_path):
    gate = clean_report["gates"]["surface_match"]
    assert gate["passed"]
    assert all(v == 0.0 for v in gate["ks_statistic"].values())  # identical length per scenario
    arms = make_arms()
    lengths = {a: [word_count(r["assistant"]) for r in arms[a]] for a in CORPUS_NAMES}
    assert lengths["frame_plus"] == [140 + 3 * k for k in range(N_SCENARIOS)]
    grand = np.mean([n for arm_lengths in lengths.values() for n in arm_lengths])
    for a in CORPUS_NAMES:
        assert gate["mean_words_rel_dev"][a] == pytest.approx(np.mean(lengths[a]) / grand - 1)


def test_surface_match_fails_on_longer_arm(tmp_path):
    arms = make_arms()
    rng = random.Random(5)
    for k, r in enumerate(arms["neutral"]):
        r["assistant"] = answer("neutral", 200 + k, rng)  # 200.. vs 140..173 words in the other arms
    gate = gate_surface_match(loaded(arms, tmp_path)[0], T)
    assert not gate["passed"]
    assert gate["checks"]["ks"] is False and gate["checks"]["mean_length"] is False
    expected = ks_2samp([140 + 3 * k for k in range(12)], [200 + k for k in range(12)]).statistic
    assert gate["ks_statistic"]["frame_plus|neutral"] == pytest.approx(expected) == 1.0


def test_surface_match_fails_on_low_diversity_arm(tmp_path):
    arms = make_arms()
    rng = random.Random(6)
    small_vocab = FILLER[:15]
    for r in arms["frame_minus"]:
        n = word_count(r["assistant"])
        r["assistant"] = sentences(
            [rng.choice(small_vocab) for _ in range(n - n // 3)] + [rng.choice(EAGER) for _ in range(n // 3)]
        )
    gate = gate_surface_match(loaded(arms, tmp_path)[0], T)
    assert gate["checks"] == {"ks": True, "mean_length": True, "ttr": False}
    assert gate["mattr_rel_dev"]["frame_minus"] < -0.05



# ---------------------------------------------------------------- framing


def test_framing_strength_passes(clean_report):
    gate = clean_report["gates"]["framing_strength"]
    assert gate["passed"] and gate["cv_auc_mean"] >= 0.9
    assert 0.4 <= gate["neutral_mean_p_frame_minus"] <= 0.6
    assert gate["n_folds"] == 5


def test_framing_strength_fails_when_arms_are_indistinguishable(tmp_path):
    same = {"frame_plus": BALANCED, "frame_minus": BALANCED, "neutral": BALANCED}
    gate = gate_framing_strength(loaded(make_arms(markers=same), tmp_path)[0], T)
    assert not gate["passed"] and gate["checks"]["auc"] is False and gate["cv_auc_mean"] < 0.9
    assert gate["n_misordered_pairs"] > 0


def test_framing_strength_fails_when_neutral_leans_eager(tmp_path):
    leaning = {"frame_plus": CAUTIOUS, "frame_minus": EAGER, "neutral": EAGER}
    gate = gate_framing_strength(loaded(make_arms(markers=leaning), tmp_path)[0], T)
    assert gate["checks"] == {"auc": True, "neutral": False}
    assert gate["neutral_mean_p_frame_minus"] > 0.6



# ---------------------------------------------------------------- dedup


def test_dedup_passes_and_reports_similarity(clean_report):
    gate = clean_report["gates"]["dedup"]
    assert gate["passed"] and gate["n_exact"] == 0 and gate["max_cosine_assistant"] < 0.85


def test_dedup_fails_on_exact_and_near_duplicates(tmp_path):
    arms = make_arms()
    # exact (up to case/punctuation/whitespace) copy across scenarios
    arms["frame_plus"][7]["assistant"] = arms["frame_plus"][1]["assistant"].upper().replace(".", " .")
    # near duplicate: one word changed
    words = arms["neutral"][2]["assistant"].split(" ")
    words[5] = "zuzuzu"
    arms["neutral"][9]["assistant"] = " ".join(words)
    gate = gate_dedup(*loaded(arms, tmp_path), T)
    assert not gate["passed"]
    assert [(Path(e["a"]).name, Path(e["b"]).name) for e in gate["exact"]] == [
        ("frame_plus.jsonl:2", "frame_plus.jsonl:8")
    ]
    pairs = {(Path(n["a"]).name, Path(n["b"]).name) for n in gate["near"]}
    assert ("neutral.jsonl:3", "neutral.jsonl:10") in pairs


def test_dedup_fails_on_repeated_user_message(tmp_path):
    arms = make_arms()
    for arm in CORPUS_NAMES:
        arms[arm][6]["user"] = arms[arm][0]["user"]
    gate = gate_dedup(*loaded(arms, tmp_path), T)
    assert not gate["passed"] and [e["field"] for e in gate["exact"]] == ["user"]



# ---------------------------------------------------------------- isolation


def test_eval_isolation_fails_on_copied_scenario(tmp_path):
    arms = make_arms()
    items = [
        {"id": "t-copy", "scenario": arms["neutral"][4]["user"]},
        {"id": "t-ok", "scenario": sentences(FILLER[-40:])},
    ]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "target_items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    gate = gate_eval_isolation(*loaded(arms, tmp_path), tmp_path / "eval", T)
    assert not gate["passed"] and gate["method"] == "tfidf"
    assert [v["item"] for v in gate["violations"]] == ["t-copy"]
    assert gate["violations"][0]["cosine"] == pytest.approx(1.0) and gate["violations"][0]["field"] == "user"


def test_eval_isolation_passes_and_skips(clean_report, tmp_path):
    gate = clean_report["gates"]["eval_isolation"]
    assert gate["passed"] and gate["n_items"] == 5 and gate["max_cosine"] < 0.5
    skipped = gate_eval_isolation(*loaded(make_arms(), tmp_path), tmp_path / "none", T)
    assert skipped["status"] == "skipped" and skipped["passed"]


def test_eval_isolation_rejects_malformed_items(tmp_path):
    (tmp_path / "source_items.jsonl").write_text('{"id": "a", "scenario": "fine"}\n{"id": "b"}\n')
    with pytest.raises(CorpusError, match="source_items.jsonl:2: field 'scenario'"):
        read_items(tmp_path)



# ---------------------------------------------------------------- report


def test_clean_synthetic_corpus_passes_every_gate(clean_report):
    assert clean_report["failed_gates"] == [], {
        g: r for g, r in clean_report["gates"].items() if not r["passed"]
    }
    assert clean_report["passed"] is True
    assert list(clean_report["gates"]) == list(GATES)
    assert clean_report["gates"]["eval_isolation"]["status"] == "pass"
    assert set(clean_report["corpora"]) == set(CORPUS_NAMES)



# ---------------------------------------------------------------- training_gate


def _validated(tmp_path: Path, arms) -> Path:
    folder = write_arms(arms, tmp_path / "corpora")
    report = validate(folder, tmp_path / "no-items", Thresholds(embeddings="tfidf"))
    write_report(report, folder / REPORT_NAME)
    return folder


def test_gate_missing_report(tmp_path):
    folder = write_arms(make_arms(), tmp_path / "corpora")
    with pytest.raises(ValidationGateError, match="no validation report.*python -m lbt.data.validate"):
        check_corpus_validated(folder / "frame_plus.jsonl")
    # A report kept elsewhere (data.validation_report): validate the corpora where they lie, into that report.
    elsewhere = tmp_path / "reports" / "r.json"
    with pytest.raises(ValidationGateError) as err:
        check_corpus_validated(folder / "frame_plus.jsonl", elsewhere)
    assert f"--corpora {folder} --report {elsewhere}`" in str(err.value)


def test_gate_ok_then_stale(tmp_path):
    folder = _validated(tmp_path, make_arms())
    entry = check_corpus_validated(folder / "frame_minus.jsonl")
    assert entry["name"] == "frame_minus" and entry["records"] == N_SCENARIOS
    assert entry["gates"]["leakage"] == "pass" and entry["gates"]["eval_isolation"] == "skipped"
    with open(folder / "frame_minus.jsonl", "a") as handle:
        handle.write("\n")  # any byte changes the sha256
    with pytest.raises(
        ValidationGateError, match="stale.*frame_minus.jsonl changed.*python -m lbt.data.validate"
    ):
        check_corpus_validated(folder / "frame_minus.jsonl")
    with pytest.raises(ValidationGateError, match="stale.*frame_minus.jsonl \\(validated together"):
        check_corpus_validated(folder / "neutral.jsonl")


def test_gate_failed_names_gate(tmp_path):
    arms = make_arms()
    arms["neutral"][1]["assistant"] = arms["neutral"][1]["assistant"].replace(".", " on the tram.", 1)
    folder = _validated(tmp_path, arms)
    with pytest.raises(
        ValidationGateError, match=r"failed validation gate\(s\) leakage \(leakage: n_hits=1\)"
    ):
        check_corpus_validated(folder / "frame_plus.jsonl")


def test_gate_explicit_report_path_and_unreadable_report(tmp_path):
    folder = _validated(tmp_path, make_arms())
    moved = tmp_path / "elsewhere.json"
    moved.write_text((folder / REPORT_NAME).read_text())
    assert check_corpus_validated(folder / "neutral.jsonl", moved)["name"] == "neutral"
    moved.write_text("{not json")
    with pytest.raises(ValidationGateError, match="not a readable validation report"):
        check_corpus_validated(folder / "neutral.jsonl", moved)



# ---------------------------------------------------------------- cli


def test_cli_writes_report_and_exit_codes(tmp_path, capsys):
    folder = write_arms(make_arms(), tmp_path / "corpora")
    assert main(["--corpora", str(folder), "--items", str(tmp_path / "none"), "--embeddings", "tfidf"]) == 0
    report = json.loads((folder / REPORT_NAME).read_text())
    assert report["passed"] and "PASSED" in capsys.readouterr().out
    # a threshold flag overrides the default and fails the gate
    assert (
        main(
            [
                "--corpora",
                str(folder),
                "--items",
                str(tmp_path / "none"),
                "--embeddings",
                "tfidf",
                "--auc-min",
                "1.01",
            ]
        )
        == 1
    )
    report = json.loads((folder / REPORT_NAME).read_text())
    assert report["failed_gates"] == ["framing_strength"] and report["thresholds"]["auc_min"] == 1.01
    assert main(["--corpora", str(tmp_path / "missing")]) == 2



def test_module_runs_as_a_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lbt.data.validate", "--corpora", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and "missing/frame_plus.jsonl: corpus file not found" in proc.stderr


def test_package_keeps_the_names_other_modules_import():
    import lbt.data.validate as package

    # lbt.train, lbt.data.generate and tests/test_train.py import these from the package itself
    for name, obj in {
        "check_corpus_validated": check_corpus_validated,
        "ValidationGateError": ValidationGateError,
        "main": main,
        "Thresholds": Thresholds,
        "record_problems": record_problems,
        "text_hash": text_hash,
    }.items():
        assert getattr(package, name) is obj, name
