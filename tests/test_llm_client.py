"""The LLM client against a real HTTP server on 127.0.0.1 serving canned completions (tests/fake_llm.py)."""

from __future__ import annotations

import time

import pytest

from lbt.llm_client import ChatClient, LLMConfig, LLMError
from tests.fake_llm import fake_llm


@pytest.fixture()
def llm():
    with fake_llm() as fake:
        yield fake


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


def test_client_needs_an_endpoint():
    with pytest.raises(LLMError, match="needs base_url and model.*LBT_LLM_BASE_URL / LBT_LLM_MODEL"):
        ChatClient(LLMConfig(base_url="", model="canned"))
