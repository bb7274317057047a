"""A canned OpenAI-compatible chat endpoint on 127.0.0.1, for the LLM client's and the generator's tests.

It answers as a real server does (HTTP, JSON), so the client's retries, timeouts and error handling run
for real. `script` scripts the next requests' behaviour: 500, 400, timeout, garbage, empty, leak or ok.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FILLER_TEXT = (
    "Keep a simple record of what you change and how it turns out over the next few weeks, "
    "then compare the results honestly before you settle on anything."
)


def canned_answer(attitude: str, n: int) -> str:
    words = [attitude.capitalize(), "reply", f"number{n}."]
    while len(words) < 150:
        words += FILLER_TEXT.split()
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
        self.user_text: str | None = None  # set: every user-message request gets this same text
        self.lock = threading.Lock()

    def next_behaviour(self, body: dict) -> tuple[str, int]:
        with self.lock:
            self.requests.append(body)
            self.counter += 1
            return (self.script.pop(0) if self.script else self.default), self.counter

    def content(self, body: dict, n: int, leak: bool = False) -> str:
        prompt = body["messages"][-1]["content"]
        if "Write a message that a real person" in prompt:
            default = f"I have cooked the same way for years, case {n}. Should I change how I do it?"
            return self.user_text or default
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


@contextmanager
def fake_llm() -> Iterator[FakeLLM]:
    """A running fake endpoint; its base URL is `fake.url`."""
    fake = FakeLLM()
    server = make_server(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
