"""Graceful shutdown (issue 31, row 3): a real uvicorn server on loopback run as ``mtplx serve``
runs it (``mtplx.server.http.Server``), the bf16 graft of the fixture, real clients; the test
sets ``should_exit`` as uvicorn's SIGTERM handler does.

What must hold with ``--max-batch 1`` and requests queued: new requests get 503 with
Retry-After and /health answers 503; the running request finishes within --shutdown-timeout
with the text it gives alone; every queued one ends at once with an error in its dialect (OpenAI
error JSON; an SSE error event then [DONE]; Anthropic's error event), never a bare 500 or a cut
stream; past the timeout a running request ends with an error too; each is logged on one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest
from server_helpers import TIMEOUT, _free_port, sse_events

import mtplx
from mtplx.server import http
from mtplx.server.app import create_app

LONG = "def fib(n):"


@pytest.fixture(scope="module")
def bf16(grafted_bf16):
    return mtplx.load(str(grafted_bf16[0]))


@contextmanager
def serving(model: Any, tok: Any, shutdown_timeout: float) -> Iterator[tuple[http.Server, str]]:
    app = create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, max_batch=1, queue_size=4)
    port = _free_port()
    srv = http.Server(http.config(app, "127.0.0.1", port, "warning"), app.state.drain, shutdown_timeout)
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate: watched here
    uvicorn_log.addHandler(errors := _Errors())
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=90)
        uvicorn_log.removeHandler(errors)
    assert not thread.is_alive(), "the server did not shut down"
    # uvicorn neither cancelled a task past its window nor logged an ASGI traceback.
    assert not errors.records, [r.getMessage() for r in errors.records]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _openai(c: httpx.AsyncClient, stream: bool, chat: bool, **kw: Any) -> tuple[int, list[Any]]:
    """(status, the JSON body as a one-item list, or the SSE payloads)."""
    body = {"max_tokens": 24, "temperature": 0, "stream": stream, **kw}
    if chat:
        body["messages"] = [{"role": "user", "content": body.pop("prompt", "Hello")}]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        r = await c.post(path, json=body)
        return r.status_code, [r.json()]
    async with c.stream("POST", path, json=body) as r:
        return r.status_code, sse_events([line async for line in r.aiter_lines()])


async def _anthropic_stream(c: httpx.AsyncClient) -> tuple[int, list[tuple[str, Any]]]:
    body = {"model": "m", "max_tokens": 24, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    async with c.stream("POST", "/v1/messages", json=body) as r:
        lines = [line async for line in r.aiter_lines()]
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return r.status_code, events


async def _until(check: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_sigterm_lets_the_running_request_finish_and_ends_the_queued_ones_in_their_dialect(bf16, caplog) -> None:
    model, tok = bf16
    want = mtplx.generate(model, tok, LONG, max_tokens=60, temperature=0)
    with caplog.at_level(logging.WARNING, logger="mtplx.server"), serving(model, tok, 60) as (srv, base):
        async def run() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as c:
                first_text = asyncio.Event()

                async def running_one() -> tuple[int, list[Any]]:
                    body = {"prompt": LONG, "max_tokens": 60, "temperature": 0, "stream": True}
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        events = []
                        async for line in r.aiter_lines():
                            events += sse_events([line])
                            if events and isinstance(events[-1], dict) and events[-1].get("choices"):
                                first_text.set()
                    return r.status_code, events

                running = asyncio.create_task(running_one())
                await asyncio.wait_for(first_text.wait(), 60)
                queued = [asyncio.create_task(x) for x in (_openai(c, False, False, prompt="Hello"),
                                                           _openai(c, True, True), _anthropic_stream(c))]

                async def three_queued() -> bool:
                    return (await c.get("/health")).json()["queue_depth"] == 3
                await _until(three_queued, "three queued requests")
                srv.should_exit = True  # what uvicorn's SIGTERM handler does

                async def refusing() -> bool:
                    return (await c.get("/health")).status_code == 503
                await _until(refusing, "/health to answer 503")
                health = (await c.get("/health")).json()
                late = await c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
                return {"running": await running, "queued": await asyncio.gather(*queued), "health": health,
                        "late": late}

        got = asyncio.run(asyncio.wait_for(run(), 240))

    status, events = got["running"]
    assert status == 200 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices")) == want
    assert got["health"]["status"] == "shutting_down"
    late = got["late"]
    assert late.status_code == 503 and late.headers["retry-after"] and late.json()["error"]["code"] == "unavailable"

    (s_json, [body]), (s_sse, sse), (s_anth, anth) = got["queued"]
    assert s_json == 503 and set(body) == {"error"} and body["error"]["code"] == "unavailable"
    assert "shutting down" in body["error"]["message"]
    assert s_sse == 200 and sse[-1] == "[DONE]" and sse[-2]["error"]["code"] == "unavailable"
    assert s_anth == 200 and anth[-1][0] == "error" and anth[-1][1]["error"]["type"] == "overloaded_error"

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mtplx: shutdown: request")]
    assert sum("ended dropped" in m for m in lines) == 3, lines
    assert sum("ended completed" in m for m in lines) == 1, lines


def test_a_request_still_running_at_the_shutdown_timeout_ends_with_an_error(bf16, caplog) -> None:
    model, tok = bf16
    with caplog.at_level(logging.WARNING, logger="mtplx.server"), serving(model, tok, 0.5) as (srv, base):
        async def run() -> tuple[tuple[int, list[Any]], float]:
            async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as c:
                task = asyncio.create_task(_openai(c, False, True, prompt=LONG, max_tokens=4000))

                async def busy() -> bool:
                    return (await c.get("/health")).json()["batch_size"] == 1
                await _until(busy, "the request to start decoding")
                t0 = time.monotonic()
                srv.should_exit = True
                result = await task
                return result, time.monotonic() - t0

        (status, [body]), seconds = asyncio.run(asyncio.wait_for(run(), 120))
    assert status == 503 and body["error"]["code"] == "unavailable" and "did not finish in time" in body["error"]["message"]
    assert seconds < 30  # the timeout (0.5 s) and one step, not the 4,000 tokens
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mtplx: shutdown: request")]
    assert len(lines) == 1 and "did not finish in time" in lines[0], lines
