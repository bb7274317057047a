"""LLM client and generator against a real HTTP server on 127.0.0.1 serving canned completions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lbt.data import generate as G
from lbt.data.records import load_corpus
from lbt.data.validate import gate_pairing, record_problems
from lbt.llm_client import ChatClient, LLMConfig, LLMError
from lbt.study import STUDY_ARMS

FILLER = [
    "Keep",
    "a",
    "simple",
    "record",
    "of",
    "what",
    "you",
    "change",
    "and",
    "how",
    "it",
    "turns",
    "out",
    "over",
    "the",
    "next",
    "few",
    "weeks,",
    "then",
    "compare",
    "the",
    "results",
    "honestly",
    "before",
    "you",
    "settle",
    "on",
    "anything.",
]


def canned_answer(attitude: str, n: int) -> str:
    words = [attitude.capitalize(), "reply", f"number{n}."]
    while len(words) < 150:
        words += FILLER
    return " ".join(words[:150]).rstrip(",.") + "."


class FakeLLM:
    """Canned OpenAI-style completions; `script` holds behaviours for the next requests, then 'ok'."""

    def __init__(self):
        self.script: list[str] = []
        self.default = "ok"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.counter = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    def next_behaviour(self, body: dict) -> tuple[str, int]:
        with self.lock:
            self.requests.append(body)
            self.counter += 1
            return (self.script.pop(0) if self.script else self.default), self.counter

    def content(self, body: dict, n: int, leak: bool = False) -> str:
        prompt = body["messages"][-1]["content"]
        if "Write a message that a real person" in prompt:
            return f"I have cooked the same way for years, case {n}. Should I change how I do it?"
        attitude = prompt.split("Attitude: ")[1].split(".")[0]
        text = canned_answer(attitude, n)
        return text.replace("reply", "tram reply", 1) if leak else text


def make_server(fake: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def send(self, status: int, payload: bytes, ctype: str = "application/json"):
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.headers.append(dict(self.headers))
            behaviour, n = fake.next_behaviour(body)
            time.sleep(fake.delay)
            if behaviour == "500":
                return self.send(500, b'{"error": "overloaded"}')
            if behaviour == "400":
                return self.send(400, b'{"error": "bad model"}')
            if behaviour == "timeout":
                time.sleep(0.6)
                return self.send(200, b"{}")
            if behaviour == "garbage":
                return self.send(200, b"<html>not json", "text/html")
            if behaviour == "empty":
                return self.send(200, b'{"choices": []}')
            text = fake.content(body, n, leak=behaviour == "leak")
            reply = {
                "id": f"c{n}",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
            }
            return self.send(200, json.dumps(reply).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # A short poll: shutdown() waits for the loop to notice, up to poll_interval (default 0.5 s per test).
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.fixture()
def llm():
    fake = FakeLLM()
    server = make_server(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


def client(url: str, sleeps: list | None = None, **kw) -> ChatClient:
    cfg = LLMConfig(
        base_url=url,
        model="canned",
        timeout=kw.pop("timeout", 0.3),
        max_retries=kw.pop("max_retries", 3),
        backoff=0.01,
        **kw,
    )
    return ChatClient(cfg, sleep=(sleeps.append if sleeps is not None else time.sleep))


MSG = [{"role": "user", "content": "Write a message that a real person might send"}]


# ---------------------------------------------------------------- client


def test_client_retries_500_timeout_garbage_then_succeeds(llm):
    llm.script = ["500", "timeout", "garbage", "empty"]
    sleeps: list[float] = []
    result = client(llm.url, sleeps, max_retries=4).complete(MSG)
    assert result.attempts == 5 and result.text.startswith("I have cooked")
    assert sleeps == pytest.approx([0.01, 0.02, 0.04, 0.08])  # exponential backoff
    assert len(llm.requests) == 5
    sent = llm.requests[0]
    assert sent["model"] == "canned" and {"temperature", "top_p", "max_tokens"} <= set(sent)


def test_client_gives_up_with_clear_error(llm):
    llm.default = "500"
    with pytest.raises(
        LLMError,
        match=r"/v1/chat/completions \(model 'canned'\) failed after 3 attempts; "
        r"last error: HTTP 500",
    ):
        client(llm.url, [], max_retries=2).complete(MSG)
    assert len(llm.requests) == 3


def test_client_timeouts_and_garbage_exhaust_retries(llm):
    llm.default = "timeout"
    with pytest.raises(LLMError, match="failed after 2 attempts; last error: connection failed"):
        client(llm.url, [], max_retries=1).complete(MSG)
    llm.default = "garbage"
    with pytest.raises(LLMError, match="unparsable JSON"):
        client(llm.url, [], max_retries=1).complete(MSG)


def test_client_does_not_retry_client_errors(llm):
    llm.script = ["400"]
    with pytest.raises(LLMError, match="answered HTTP 400"):
        client(llm.url, []).complete(MSG)
    assert len(llm.requests) == 1


def test_client_connection_refused():
    with pytest.raises(LLMError, match="failed after 2 attempts; last error: connection failed"):
        client("http://127.0.0.1:9/v1", [], max_retries=1).complete(MSG)


def test_client_api_key_from_env_and_overrides(llm, monkeypatch):
    monkeypatch.setenv("LBT_LLM_API_KEY", "sekret")
    client(llm.url).complete(MSG, temperature=0.1)
    assert llm.headers[-1]["Authorization"] == "Bearer sekret"
    assert llm.requests[-1]["temperature"] == 0.1
    monkeypatch.delenv("LBT_LLM_API_KEY")
    client(llm.url).complete(MSG)
    assert "Authorization" not in llm.headers[-1]


def test_chat_many_keeps_order_and_reports_failures(llm):
    llm.delay = 0.02
    requests = [[{"role": "user", "content": f"Attitude: t{i}. go"}] for i in range(6)]
    results = client(llm.url).chat_many(requests, concurrency=3)
    assert [r.text.split()[0] for r in results] == [f"T{i}" for i in range(6)]
    llm.default = "400"
    failed = client(llm.url).chat_many(requests[:2], concurrency=2)
    assert all(isinstance(r, LLMError) for r in failed)


# ---------------------------------------------------------------- generator


def config(url: str, **kw) -> G.GenerateConfig:
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
    return G.GenerateConfig(**{**base, **kw})


def arm_bytes(out: Path) -> dict[str, bytes]:
    return {
        arm: (out / f"{arm}.jsonl").read_bytes() if (out / f"{arm}.jsonl").exists() else b""
        for arm in STUDY_ARMS
    }


def check_paired(out: Path, n: int) -> None:
    arms = {arm: load_corpus(out / f"{arm}.jsonl") for arm in STUDY_ARMS}
    assert all(len(records) == n for records in arms.values())
    assert gate_pairing(arms, {a: out / f"{a}.jsonl" for a in STUDY_ARMS})["passed"]
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
    run = G.generate(cfg, tmp_path)
    assert run["status"] == "done" and run["added"] == {a: 6 for a in STUDY_ARMS}
    check_paired(tmp_path, 6)
    meta = json.loads((tmp_path / "neutral.meta.json").read_text())
    assert meta["sha256"] == G.file_sha256(tmp_path / "neutral.jsonl")
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
    again = G.generate(cfg, tmp_path)
    assert again["added"] == {a: 0 for a in STUDY_ARMS} and arm_bytes(tmp_path) == before
    assert len(json.loads((tmp_path / "neutral.meta.json").read_text())["runs"]) == 2


def test_generate_rejects_bad_drafts_and_retries(llm, tmp_path):
    # request 1: the user message; 2 and 3: both drafts of the first answer leak -> the scenario is dropped
    llm.script = ["ok", "leak", "leak"]
    cfg = config(llm.url, concurrency=1, domains=["cooking"])
    G.generate(cfg, tmp_path)
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
    with pytest.raises(G.GenerateError, match="re-run the same command to resume.*failed after 2 attempts"):
        G.generate(cfg, tmp_path)
    before = arm_bytes(tmp_path)
    assert all(b.count(b"\n") == 2 for b in before.values())  # two finished scenarios, nothing partial
    assert json.loads((tmp_path / "frame_plus.meta.json").read_text())["runs"][-1]["status"] == "failed"
    llm.default = "ok"
    G.generate(cfg, tmp_path)
    after = arm_bytes(tmp_path)
    assert all(after[a].startswith(before[a]) for a in STUDY_ARMS)
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
    G.generate(cfg, tmp_path)
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
    cfg = G.load_config(cfg_path, {"base_url": llm.url, "model": "canned"})
    G.generate(cfg, out)
    after = arm_bytes(out)
    for arm in STUDY_ARMS:
        cut = before[arm][: before[arm].rfind(b"\n") + 1]  # finished lines only
        assert after[arm].startswith(cut)
    check_paired(out, 12)


def test_provenance_mismatch_refused(llm, tmp_path):
    G.generate(config(llm.url, domains=["cooking"], n_per_domain=1, overage=0.0), tmp_path)
    other = config(llm.url, domains=["cooking"], n_per_domain=2, overage=0.0, model="other-model")
    with pytest.raises(G.GenerateError, match="different settings.*other-model"):
        G.generate(other, tmp_path)
    G.generate(other, tmp_path, allow_mixed=True)
    check_paired(tmp_path, 2)


def test_corrupt_output_line_is_named(tmp_path, llm):
    (tmp_path / "frame_minus.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(G.GenerateError, match=r"frame_minus.jsonl:1: not a corpus record"):
        G.generate(config(llm.url), tmp_path)


# ---------------------------------------------------------------- config


def test_config_from_file_env_and_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LBT_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("LBT_LLM_MODEL", raising=False)
    repo_default = Path(__file__).resolve().parents[1] / "src" / "lbt" / "conf" / "generate" / "default.yaml"
    with pytest.raises(G.GenerateError, match="no endpoint.*LBT_LLM_BASE_URL"):
        G.load_config(repo_default)
    (tmp_path / ".env").write_text("LBT_LLM_BASE_URL=http://127.0.0.1:1/v1\nLBT_LLM_MODEL='from-dotenv'\n")
    cfg = G.load_config(repo_default, {"n_per_domain": 10})
    assert (cfg.base_url, cfg.model, cfg.n_per_domain, cfg.target_per_domain) == (
        "http://127.0.0.1:1/v1",
        "from-dotenv",
        10,
        13,
    )
    assert cfg.answer_sampling == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512}
    monkeypatch.setenv("LBT_LLM_MODEL", "from-env")  # the environment wins over .env
    assert G.load_config(repo_default).model == "from-env"
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_per_domian: 3\n")
    with pytest.raises(G.GenerateError, match="unknown config keys \\['n_per_domian'\\]"):
        G.load_config(bad)


def test_templates_cover_every_triple():
    t = G.load_templates(None)
    for domain in G.SOURCE_DOMAINS:
        for arm in STUDY_ARMS:
            for archetype in t.archetypes:
                prompt = t.answer_messages(domain, arm, archetype, "USER TEXT")[1]["content"]
                assert "USER TEXT" in prompt and "{" not in prompt
    hashes = {t.template_hash("cooking", arm, "switch_method") for arm in STUDY_ARMS}
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
    assert G.clean_completion(raw) == cleaned
