"""`mtplx serve` end to end: a real uvicorn server on 127.0.0.1 with the demo model, driven by
the openai client and httpx. No mocks. Every client call has a timeout and every wait loop a
deadline, so a broken server fails the test instead of hanging it.

Reference outputs come from mtplx.generate on the same model object, always while the server
is idle (the engine runs one generation at a time; see wait_idle).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn

import mtplx
from mtplx.api import encode_prompt
from mtplx.server.app import create_app

TIMEOUT = 60.0
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]
PROMPT = "def fib(n):"


@dataclass
class Server:
    base: str
    model: Any
    tokenizer: Any
    client: openai.OpenAI
    http: httpx.Client
    refs: dict[str, tuple[str, Any]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Server:
    model, tokenizer = mtplx.load("demo")
    app = create_app(model, tokenizer, model_id="demo", queue_size=8, max_tokens_default=16)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        yield Server(base, model, tokenizer, client, http, {})
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


def reference(s: Server, prompt: Any, **kw: Any) -> tuple[str, Any]:
    """The text mtplx.generate returns, and the last streamed response (for token counts).
    Cached per module: the CPU is slow and several tests share a reference."""
    key = json.dumps([prompt, kw], sort_keys=True)
    if key not in s.refs:
        wait_idle(s)
        text = mtplx.generate(s.model, s.tokenizer, prompt, **kw)
        parts, last = [], None
        for r in mtplx.stream_generate(s.model, s.tokenizer, prompt, **kw):
            parts.append(r.text)
            last = r
        assert "".join(parts) == text  # generation is deterministic for a seed
        s.refs[key] = (text, last)
    return s.refs[key]


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


def sse_events(lines: list[str]) -> list[Any]:
    """`data: {...}` payloads in order; the literal [DONE] stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# -- discovery -----------------------------------------------------------------------------------

def test_models_health(server: Server) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    raw = server.http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    h = server.http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "demo"
    assert_openai_error(server.http.get("/v1/models/not-this-one"), 404)
    assert_openai_error(server.http.post("/v1/nowhere", json={}), 404)


# -- equality with mtplx.generate ----------------------------------------------------------------

@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.6, 1234)])
def test_chat_matches_generate(server: Server, temperature: float, seed: int | None) -> None:
    expected, last = reference(server, MESSAGES, max_tokens=12, temperature=temperature, seed=seed)
    r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12,
                                              temperature=temperature, seed=seed)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "demo"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == last.finish_reason
    n_prompt = len(encode_prompt(server.tokenizer, MESSAGES))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, last.generation_tokens)
    assert r.usage.total_tokens == n_prompt + last.generation_tokens
    stats = r.model_extra["mtplx"]
    assert set(stats) >= {"tokens_per_second", "acceptance", "tokens_per_step", "depth"}
    assert len(stats["acceptance"]) == stats["depth"] == 2


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.6, 99)])
def test_completion_matches_generate(server: Server, temperature: float, seed: int | None) -> None:
    expected, last = reference(server, PROMPT, max_tokens=10, temperature=temperature, seed=seed)
    r = server.client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=temperature,
                                         seed=seed)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == last.finish_reason
    assert r.usage.prompt_tokens == len(server.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == last.generation_tokens


def test_streaming_chat(server: Server) -> None:
    expected, last = reference(server, MESSAGES, max_tokens=12, temperature=0.6, seed=1234)
    stream = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0.6,
                                                   seed=1234, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == last.finish_reason
    assert finals[0].model_extra["mtplx"]["depth"] == 2
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == last.generation_tokens
    assert usage.usage.prompt_tokens == len(encode_prompt(server.tokenizer, MESSAGES))


def test_streaming_completion_raw_sse(server: Server) -> None:
    expected, _ = reference(server, PROMPT, max_tokens=10, temperature=0.0, seed=None)
    with server.http.stream("POST", "/v1/completions",
                            json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    body = events[:-1]
    assert all(e["object"] == "text_completion" for e in body)
    assert "".join(e["choices"][0]["text"] for e in body) == expected
    assert body[-1]["choices"][0]["finish_reason"] == "length" and "mtplx" in body[-1]


def test_stop_strings(server: Server) -> None:
    full, _ = reference(server, MESSAGES, max_tokens=12, temperature=0.0, seed=None)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"pick another stop string from {full!r}"
    wait_idle(server)
    expected = mtplx.generate(server.model, server.tokenizer, MESSAGES, max_tokens=12, temperature=0.0, stop=[stop])
    assert expected == full[: full.find(stop)]
    r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stop=[stop])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    # A bare string works too (OpenAI accepts both).
    r2 = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                                        "stop": stop}).json()
    assert r2["choices"][0]["message"]["content"] == expected


def test_thinking_toggle(server: Server) -> None:
    off = len(encode_prompt(server.tokenizer, MESSAGES, enable_thinking=False))
    on = len(encode_prompt(server.tokenizer, MESSAGES, enable_thinking=True))
    assert off != on  # the template adds an empty <think></think> block when thinking is off
    for extra, n in [({"chat_template_kwargs": {"enable_thinking": False}}, off), ({"enable_thinking": False}, off),
                     ({"chat_template_kwargs": {"enable_thinking": True}}, on)]:
        r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1, temperature=0,
                                                  extra_body=extra)
        assert r.usage.prompt_tokens == n, extra


# -- errors --------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"model": "demo"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": MESSAGES, "temperature": -0.5}, "temperature"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES, "depth": 99}, "depth"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": MESSAGES, "stop": ["x"] * 17}, "stop"),
    ({"messages": MESSAGES, "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": MESSAGES, "seed": -1}, "seed"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_chat_requests(server: Server, body: dict, param: str) -> None:
    err = assert_openai_error(server.http.post("/v1/chat/completions", json=body))
    assert err["param"] == param


def test_bad_bodies_and_content_types(server: Server) -> None:
    headers = {"content-type": "application/json"}
    err = assert_openai_error(server.http.post("/v1/chat/completions", content=b'{"messages": [', headers=headers))
    assert err["code"] == "invalid_json"
    err = assert_openai_error(server.http.post("/v1/chat/completions", content=json.dumps({"messages": MESSAGES}),
                                               headers={"content-type": "text/plain"}))
    assert "Content-Type" in err["message"]
    assert_openai_error(server.http.post("/v1/chat/completions", content=b"[1, 2]", headers=headers))
    assert_openai_error(server.http.post("/v1/chat/completions", content=b"", headers=headers))
    assert_openai_error(server.http.post("/v1/completions", json={"max_tokens": 4}))
    assert_openai_error(server.http.post("/v1/completions", json={"prompt": "", "max_tokens": 4}))
    assert_openai_error(server.http.post("/v1/completions", json={"prompt": PROMPT, "top_p": 2}))
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="demo", messages=MESSAGES, temperature=-1)
    h = server.http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


# -- metrics -------------------------------------------------------------------------------------

def test_metrics(server: Server) -> None:
    server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, temperature=0)
    wait_idle(server)
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in ("mtplx_requests_total", "mtplx_generated_tokens_total", "mtplx_prompt_tokens_total",
                   "mtplx_last_tokens_per_second", "mtplx_average_tokens_per_second", "mtplx_acceptance",
                   "mtplx_queue_depth", "mtplx_busy"):
        assert f"# TYPE {family} " in text, family
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/chat/completions",status="200"') >= 1
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/chat/completions",status="400"') >= 1
    assert metric(text, "mtplx_generated_tokens_total") >= 4
    assert metric(text, "mtplx_prompt_tokens_total") > 0
    assert metric(text, "mtplx_last_tokens_per_second") > 0
    assert 0 <= metric(text, "mtplx_acceptance", 'position="1"') <= 1
    assert metric(text, "mtplx_acceptance", 'position="2"') is not None
    assert metric(text, "mtplx_queue_depth") == 0 and metric(text, "mtplx_busy") == 0


# -- load and cancellation -----------------------------------------------------------------------

async def _one_stream(client: httpx.AsyncClient, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 6, "temperature": 0.6,
            "seed": i, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code == 429:
            await r.aread()
            assert r.headers.get("retry-after")
            assert r.json()["error"]["type"] == "rate_limit_error"
            return "rejected"
        assert r.status_code == 200, r.status_code
        events = sse_events([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    return "completed"


def test_bounded_load(server: Server) -> None:
    wait_idle(server)

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base, timeout=TIMEOUT) as client:
            return await asyncio.wait_for(asyncio.gather(*(_one_stream(client, i) for i in range(16))), 120)

    outcomes = asyncio.run(run())
    assert len(outcomes) == 16
    assert outcomes.count("completed") >= 8, outcomes
    assert outcomes.count("completed") + outcomes.count("rejected") == 16
    assert outcomes.count("rejected") >= 1  # 16 at once cannot all fit in 1 running + 8 waiting
    wait_idle(server)
    assert server.http.get("/health").json()["status"] == "ok"
    text = server.http.get("/metrics").text
    assert metric(text, "mtplx_queue_depth") == 0 and metric(text, "mtplx_busy") == 0
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/chat/completions",status="429"') >= 1


def _first_content(lines: Any) -> None:
    """Read the stream until the first generated text arrives (the engine is then running).
    The caller keeps ``lines`` alive: dropping a half-read httpx iterator closes the connection."""
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return
    pytest.fail("the stream ended before any content")


def test_disconnect_frees_engine(server: Server) -> None:
    wait_idle(server)
    before = server.http.get("/metrics").text
    long_body = {"messages": MESSAGES, "max_tokens": 600, "temperature": 0, "stream": True}
    # A long generation (about a minute at demo speed) that the client abandons after one chunk...
    with server.http.stream("POST", "/v1/chat/completions", json=long_body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        _first_content(lines)
        # ...while a second long request waits in the queue and is abandoned before it runs.
        with server.http.stream("POST", "/v1/chat/completions", json=long_body) as queued:
            assert queued.status_code == 200
            health = server.http.get("/health").json()
            assert health["busy"] and health["queue_depth"] == 1, health
        deadline = time.monotonic() + 10
        while server.http.get("/health").json()["queue_depth"]:  # the queued one is dropped at once
            assert time.monotonic() < deadline, "the abandoned queued request kept its slot"
            time.sleep(0.05)
        assert server.http.get("/health").json()["busy"]  # the first one still runs
        del lines  # now the running stream goes too
    t0 = time.monotonic()
    r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 20, "the abandoned generation kept the engine"
    wait_idle(server)
    after = server.http.get("/metrics").text
    for outcome in ("cancelled", "dropped"):
        label = f'outcome="{outcome}"'
        count = metric(after, "mtplx_generations_total", label) or 0
        assert count == (metric(before, "mtplx_generations_total", label) or 0) + 1, outcome
    assert server.http.get("/health").json()["status"] == "ok"


def test_non_streaming_disconnect_frees_engine(server: Server) -> None:
    wait_idle(server)
    before = metric(server.http.get("/metrics").text, "mtplx_generations_total", 'outcome="cancelled"') or 0
    body = {"messages": MESSAGES, "max_tokens": 600, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(base_url=server.base, timeout=1.5) as impatient:
            impatient.post("/v1/chat/completions", json=body)
    wait_idle(server, seconds=10)  # 600 tokens would take about a minute if it kept running
    after = metric(server.http.get("/metrics").text, "mtplx_generations_total", 'outcome="cancelled"')
    assert after == before + 1
