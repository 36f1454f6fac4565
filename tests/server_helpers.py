"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 in a thread, driven by
real clients. No mocks. Every client call has a timeout and every wait loop a deadline, so a
broken server fails the test instead of hanging it."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import openai
import uvicorn

TIMEOUT = 60.0


@dataclass
class Server:
    base: str
    model: Any
    tokenizer: Any
    client: openai.OpenAI
    http: httpx.Client
    refs: dict[str, tuple[str, Any]] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any, model: Any, tokenizer: Any, **config: Any) -> Iterator[Server]:
    """Serve ``app`` on a free loopback port for the duration of the block, configured as
    ``mtplx serve`` configures uvicorn (``config`` overrides, e.g. ``http=``)."""
    from mtplx.server.http import config as serve_config

    port = _free_port()
    config.setdefault("timeout_graceful_shutdown", 2)
    srv = uvicorn.Server(serve_config(app, "127.0.0.1", port, "warning", **config))
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            yield Server(base, model, tokenizer, client, http)
    finally:
        client.close()
        srv.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive(), "uvicorn did not shut down"


def wait_idle(s: Server, seconds: float = 60) -> dict:
    """Block until no generation runs or waits, so the test thread may use the model."""
    deadline = time.monotonic() + seconds
    while True:
        h = s.http.get("/health").json()
        if not h["busy"] and h["queue_depth"] == 0:
            return h
        assert time.monotonic() < deadline, f"server still busy: {h}"
        time.sleep(0.05)


def metric(text: str, name: str, labels: str = "") -> float | None:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def assert_openai_error(r: httpx.Response, status: int = 400, type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type_ and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


def assert_anthropic_error(r: httpx.Response, status: int = 400, type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_ and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


def sse_events(lines: list[str]) -> list[Any]:
    """`data: {...}` payloads in order; the literal [DONE] stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
