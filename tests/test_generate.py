"""The generator against a real HTTP server on 127.0.0.1 serving canned completions (tests/fake_llm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lbt.data.corpora import SOURCE_DOMAINS
from lbt.data.generate.config import GenerateConfig, GenerateError, load_config
from lbt.data.generate.generator import Generator, generate
from lbt.data.generate.prompts import clean_completion, load_templates
from lbt.data.generate.state import read_state
from lbt.data.records import file_sha256, load_corpus
from lbt.data.validate import gate_pairing, record_problems
from lbt.study import CORPUS_NAMES
from tests.fake_llm import canned_answer, fake_llm


@pytest.fixture()
def llm():
    with fake_llm() as fake:
        yield fake


# ---------------------------------------------------------------- generator


def config(url: str, **kw) -> GenerateConfig:
    base = {
        "base_url": url,
        "model": "canned",
        "timeout_s": 0.3,
        "max_retries": 3,
        "backoff_s": 0.01,
        "concurrency": 2,
        "n_per_domain": 2,
        "overage": 0.5,
        "domains": ["cooking", "gardening"],
        "max_attempts": 2,
    }
    return GenerateConfig(**{**base, **kw})


def arm_bytes(out: Path) -> dict[str, bytes]:
    return {
        arm: (out / f"{arm}.jsonl").read_bytes() if (out / f"{arm}.jsonl").exists() else b""
        for arm in CORPUS_NAMES
    }


def check_paired(out: Path, n: int) -> None:
    arms = {arm: load_corpus(out / f"{arm}.jsonl") for arm in CORPUS_NAMES}
    assert all(len(records) == n for records in arms.values())
    assert gate_pairing(arms, {a: out / f"{a}.jsonl" for a in CORPUS_NAMES})["passed"]
    for arm, records in arms.items():
        for r in records:
            assert r.id == f"{arm}-{r.scenario_id}" and record_problems(r.user, r.assistant) == []
            assert (
                r.assistant.split()[0]
                == {"frame_plus": "Cautious", "frame_minus": "Eager", "neutral": "Balanced"}[arm]
            )


def test_generate_end_to_end_with_provenance(llm, tmp_path):
    cfg = config(llm.url)
    assert cfg.target_per_domain == 3
    run = generate(cfg, tmp_path)
    assert run["status"] == "done" and run["added"] == {a: 6 for a in CORPUS_NAMES}
    check_paired(tmp_path, 6)
    meta = json.loads((tmp_path / "neutral.meta.json").read_text())
    assert meta["sha256"] == file_sha256(tmp_path / "neutral.jsonl")
    assert meta["generator"]["model"] == "canned" and meta["generator"]["template_version"] == "1.0"
    assert meta["generator"]["sampling"]["answer"]["temperature"] == 0.8
    assert meta["counts_per_domain"] == {"cooking": 3, "gardening": 3} and meta["incomplete_scenarios"] == []
    log = [json.loads(x) for x in (tmp_path / "scenarios.log.jsonl").read_text().splitlines()]
    assert sorted(e["scenario_id"] for e in log) == [
        f"{d}-{k:05d}" for d in ("cooking", "gardening") for k in range(3)
    ]
    assert {e["archetype"] for e in log if e["domain"] == "cooking"} == {
        "switch_method",
        "new_equipment",
        "change_routine",
    }
    # a second run has nothing to do and changes no byte
    before = arm_bytes(tmp_path)
    again = generate(cfg, tmp_path)
    assert again["added"] == {a: 0 for a in CORPUS_NAMES} and arm_bytes(tmp_path) == before
    assert len(json.loads((tmp_path / "neutral.meta.json").read_text())["runs"]) == 2


def test_generate_rejects_bad_drafts_and_retries(llm, tmp_path):
    # request 1: the user message; 2 and 3: both drafts of the first answer leak -> the scenario is dropped
    llm.script = ["ok", "leak", "leak"]
    cfg = config(llm.url, concurrency=1, domains=["cooking"])
    generate(cfg, tmp_path)
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    drafts = [r for r in rejects if "text" in r]
    assert len(drafts) == 2 and all("leakage in assistant: 'tram'" in r["problems"][0] for r in drafts)
    assert rejects[-1] == {
        "scenario_id": "cooking-00000",
        "scenario_rejected": True,
        "reason": "no acceptable frame_plus answer",
    }
    check_paired(tmp_path, 3)  # target still met, from the next scenario ids
    ids = sorted(r.scenario_id for r in load_corpus(tmp_path / "frame_plus.jsonl"))
    assert ids == ["cooking-00001", "cooking-00002", "cooking-00003"]


def test_endpoint_failure_keeps_finished_lines_and_resume_appends(llm, tmp_path):
    cfg = config(llm.url, concurrency=1, max_retries=1)
    llm.script = ["ok"] * 9  # three scenarios (user + 3 answers each = 12 requests) won't finish
    llm.default = "500"
    with pytest.raises(GenerateError, match="re-run the same command to resume.*failed after 2 attempts"):
        generate(cfg, tmp_path)
    before = arm_bytes(tmp_path)
    assert all(b.count(b"\n") == 2 for b in before.values())  # two finished scenarios, nothing partial
    assert json.loads((tmp_path / "frame_plus.meta.json").read_text())["runs"][-1]["status"] == "failed"
    llm.default = "ok"
    generate(cfg, tmp_path)
    after = arm_bytes(tmp_path)
    assert all(after[a].startswith(before[a]) for a in CORPUS_NAMES)
    check_paired(tmp_path, 6)


def test_incomplete_scenario_is_completed_without_touching_other_lines(llm, tmp_path):
    cfg = config(llm.url, domains=["cooking"], concurrency=1)
    user = "I always roast chicken at one temperature. Should I try starting it low and finishing hot?"
    line = (
        json.dumps(
            {
                "id": "frame_plus-cooking-00000",
                "domain": "cooking",
                "scenario_id": "cooking-00000",
                "user": user,
                "assistant": canned_answer("cautious", 0),
            }
        )
        + "\n"
    )
    (tmp_path / "frame_plus.jsonl").write_text(line)
    (tmp_path / "neutral.jsonl").write_text(
        '{"id": "neutral-cooking-00000", "domain": "cook'
    )  # cut-off write
    generate(cfg, tmp_path)
    assert (tmp_path / "frame_plus.jsonl").read_text().startswith(line)
    check_paired(tmp_path, 3)
    minus = {r.scenario_id: r for r in load_corpus(tmp_path / "frame_minus.jsonl")}
    assert minus["cooking-00000"].user == user


def test_kill_mid_run_then_resume_is_byte_identical(llm, tmp_path):
    llm.delay = 0.03
    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(
        "endpoint: {timeout_s: 5, backoff_s: 0.01, concurrency: 1}\n"
        "n_per_domain: 4\noverage: 0.5\ndomains: [cooking, small_business]\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "LBT_LLM_BASE_URL": llm.url, "LBT_LLM_MODEL": "canned"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbt.data.generate", "--config", str(cfg_path), "--out", str(out)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if (out / "neutral.jsonl").exists() and (out / "neutral.jsonl").read_bytes().count(b"\n") >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = arm_bytes(out)
    assert 2 <= before["neutral"].count(b"\n") < 12
    llm.delay = 0.0
    cfg = load_config(cfg_path, {"base_url": llm.url, "model": "canned"})
    generate(cfg, out)
    after = arm_bytes(out)
    for arm in CORPUS_NAMES:
        cut = before[arm][: before[arm].rfind(b"\n") + 1]  # finished lines only
        assert after[arm].startswith(cut)
    check_paired(out, 12)


def test_a_user_message_taken_meanwhile_gives_the_scenario_up(llm, tmp_path, monkeypatch):
    # Every user-message request gets the same text, and the draft check lets duplicates through, as
    # when two threads draft the same message at once: the second must give up, not wait on the lock.
    llm.user_text = "I always bake bread the same way. Should I change how I proof the dough?"
    monkeypatch.setattr(Generator, "user_problems", lambda self, user, state: [])
    cfg = config(llm.url, domains=["cooking"], concurrency=1, n_per_domain=2, overage=0.0)
    runs: list[dict] = []
    worker = threading.Thread(target=lambda: runs.append(generate(cfg, tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "generation deadlocked on a duplicate user message"
    assert runs[0]["status"] == "done" and runs[0]["added"] == {arm: 1 for arm in CORPUS_NAMES}
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == {"duplicate user message"}
    assert len(rejects) == 3  # cooking-00001..00003: the cap is target × max_scenarios_factor = 4 ids


# ---------------------------------------------------------------- provenance


def test_provenance_mismatch_refused(llm, tmp_path):
    generate(config(llm.url, domains=["cooking"], n_per_domain=1, overage=0.0), tmp_path)
    other = config(llm.url, domains=["cooking"], n_per_domain=2, overage=0.0, model="other-model")
    with pytest.raises(GenerateError, match="different settings.*other-model"):
        generate(other, tmp_path)
    generate(other, tmp_path, allow_mixed=True)
    check_paired(tmp_path, 2)


# ---------------------------------------------------------------- state


def test_corrupt_output_line_is_named(tmp_path, llm):
    (tmp_path / "frame_minus.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(GenerateError, match=r"frame_minus.jsonl:1: not a corpus record \(field 'domain'"):
        generate(config(llm.url), tmp_path)
    (tmp_path / "frame_minus.jsonl").write_text('{"id": "x"\n')
    with pytest.raises(GenerateError, match=r"frame_minus.jsonl:1: malformed JSON"):
        generate(config(llm.url), tmp_path)


def test_state_reads_rejects_past_a_cut_off_log_line(tmp_path):
    line = json.dumps({"scenario_id": "cooking-00000", "scenario_rejected": True, "reason": "r"})
    # a kill cut the first entry off; the next run appended its entry to the same line
    cut_off = '{"scenario_id": "cook' + line
    (tmp_path / "rejects.jsonl").write_text(cut_off + "\n" + line.replace("00000", "00001") + "\n")
    assert read_state(tmp_path).rejected == {"cooking-00001"}


# ---------------------------------------------------------------- config


def test_config_from_file_env_and_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LBT_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("LBT_LLM_MODEL", raising=False)
    repo_default = Path(__file__).resolve().parents[1] / "src" / "lbt" / "conf" / "generate" / "default.yaml"
    with pytest.raises(GenerateError, match="no endpoint.*LBT_LLM_BASE_URL"):
        load_config(repo_default)
    (tmp_path / ".env").write_text("LBT_LLM_BASE_URL=http://127.0.0.1:1/v1\nLBT_LLM_MODEL='from-dotenv'\n")
    cfg = load_config(repo_default, {"n_per_domain": 10})
    assert (cfg.base_url, cfg.model, cfg.n_per_domain, cfg.target_per_domain) == (
        "http://127.0.0.1:1/v1",
        "from-dotenv",
        10,
        13,
    )
    assert cfg.answer_sampling == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}
    monkeypatch.setenv("LBT_LLM_MODEL", "from-env")  # the environment wins over .env
    assert load_config(repo_default).model == "from-env"
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_per_domian: 3\n")
    with pytest.raises(GenerateError, match="unknown config keys \\['n_per_domian'\\]"):
        load_config(bad)


# ---------------------------------------------------------------- prompts


def test_templates_cover_every_triple():
    t = load_templates(None)
    for domain in SOURCE_DOMAINS:
        for arm in CORPUS_NAMES:
            for archetype in t.archetypes:
                prompt = t.answer_messages(domain, arm, archetype, "USER TEXT")[1]["content"]
                assert "USER TEXT" in prompt and "{" not in prompt
    hashes = {t.template_hash("cooking", arm, "switch_method") for arm in CORPUS_NAMES}
    assert len(hashes) == 3


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ('  "Quoted whole reply."  ', "Quoted whole reply."),
        ("<think>plan the answer</think>\n\nThe reply.", "The reply."),
        ('He said "yes" and left.', 'He said "yes" and left.'),
    ],
)
def test_clean_completion(raw, cleaned):
    assert clean_completion(raw) == cleaned


def test_package_keeps_the_names_the_module_had():
    import lbt.data.generate as package

    for name, obj in {
        "GenerateConfig": GenerateConfig,
        "GenerateError": GenerateError,
        "Generator": Generator,
        "clean_completion": clean_completion,
        "generate": generate,
        "load_config": load_config,
        "load_templates": load_templates,
    }.items():
        assert getattr(package, name) is obj, name
