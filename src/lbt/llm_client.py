"""A small client for OpenAI-compatible chat endpoints (vLLM, Ollama, LM Studio, ...), standard library only.

    client = ChatClient(LLMConfig(base_url="http://127.0.0.1:8000/v1", model="my-model"))
    text = client.chat([{"role": "user", "content": "Hello"}])
    results = client.chat_many([messages_a, messages_b], concurrency=8)  # ChatResult or LLMError each

Retries with exponential backoff on connection errors, timeouts, HTTP 429/5xx and unparsable or
content-less responses; other HTTP errors (400, 401, 404, ...) fail at once because retrying cannot fix
them. After the last attempt an `LLMError` names the URL, the model, the number of attempts and the last
failure. The API key comes from the config or the environment variable LBT_LLM_API_KEY and is never
written to logs or errors.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# The environment variables every endpoint user reads (lbt.data.generate, lbt.judge).
BASE_URL_ENV, MODEL_ENV, API_KEY_ENV = "LBT_LLM_BASE_URL", "LBT_LLM_MODEL", "LBT_LLM_API_KEY"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class LLMError(RuntimeError):
    """The endpoint did not give a usable completion (after retries where retrying could help)."""


@dataclass
class LLMConfig:
    base_url: str
    model: str
    api_key: str | None = None  # default: $LBT_LLM_API_KEY
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 512
    timeout: float = 120.0  # seconds per request
    max_retries: int = 4  # attempts = 1 + max_retries
    backoff: float = 1.0  # seconds before the first retry, doubled each retry
    backoff_max: float = 60.0
    extra_body: dict = field(default_factory=dict)  # passed through, e.g. {"seed": 0}


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    model: str | None
    usage: dict | None
    attempts: int


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ChatClient:
    def __init__(self, config: LLMConfig, sleep: Callable[[float], None] = time.sleep):
        if not config.base_url or not config.model:
            raise LLMError(f"LLM endpoint needs base_url and model (config or {BASE_URL_ENV} / {MODEL_ENV})")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV)
        self._sleep = sleep

    def _payload(self, messages: Sequence[dict], overrides: dict) -> bytes:
        body = {
            "model": self.config.model,
            "messages": list(messages),
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "max_tokens": self.config.max_tokens,
            **self.config.extra_body,
            **overrides,
        }
        return json.dumps(body).encode("utf-8")

    def _post_once(self, payload: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            if err.code in RETRY_STATUSES:
                raise _Retryable(
                    f"HTTP {err.code}: {detail}", _retry_after(err.headers.get("Retry-After"))
                ) from None
            raise LLMError(
                f"{self.url} (model {self.config.model!r}) answered HTTP {err.code}: {detail}"
            ) from None
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, malformed HTTP
            reason = getattr(err, "reason", err)
            raise _Retryable(f"connection failed: {reason!r}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"unparsable JSON response: {raw[:120]!r}") from None

    def complete(self, messages: Sequence[dict], **overrides) -> ChatResult:
        """One chat completion; retries transient failures, raises LLMError after the last attempt."""
        payload = self._payload(messages, overrides)
        attempts = self.config.max_retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                body = self._post_once(payload)
                return _parse(body, attempt)
            except _Retryable as err:
                last = str(err)
                if attempt == attempts:
                    break
                delay = min(self.config.backoff_max, self.config.backoff * 2 ** (attempt - 1))
                if err.retry_after is not None:
                    delay = min(self.config.backoff_max, max(delay, err.retry_after))
                self._sleep(delay)
        raise LLMError(
            f"{self.url} (model {self.config.model!r}) failed after {attempts} attempts; last error: {last}"
        )

    def chat(self, messages: Sequence[dict], **overrides) -> str:
        return self.complete(messages, **overrides).text

    def chat_many(
        self, requests: Sequence[Sequence[dict]], concurrency: int = 4, **overrides
    ) -> list[ChatResult | LLMError]:
        """Completions for many message lists, in order; a failed request yields its LLMError instead."""

        def one(messages):
            try:
                return self.complete(messages, **overrides)
            except LLMError as err:
                return err

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, requests))


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _parse(body: object, attempts: int) -> ChatResult:
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Retryable(f"response without choices[0].message.content: {str(body)[:120]!r}") from None
    if not isinstance(text, str):
        raise _Retryable(f"response content is not text: {text!r}")
    return ChatResult(
        text=text,
        finish_reason=choice.get("finish_reason"),
        model=body.get("model"),
        usage=body.get("usage"),
        attempts=attempts,
    )
