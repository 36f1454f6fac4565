"""`mtplx serve` end to end: a real uvicorn server on 127.0.0.1 with the demo model on a bf16 trunk
(conftest's demo_bf16: the demo's head, tokenizer and template, a quarter of the 4-bit demo's time
on MLX's CPU backend), driven by the openai client and httpx. No mocks. Every client call has a
timeout and every wait loop a deadline, so a broken server fails the test instead of hanging it.

Reference outputs come from mtplx.generate on the same model object, always while the server
is idle (the engine runs one generation at a time; see wait_idle).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from server_helpers import (TIMEOUT, Server, assert_openai_error, metric, running, sse_events,
                            wait_idle)

import mtplx
from mtplx.api import encode_prompt
from mtplx.server.app import create_app

MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]
PROMPT = "def fib(n):"
MAX_BODY = 2**20


@pytest.fixture(scope="module")
def server(demo_bf16) -> Server:
    model, tokenizer = demo_bf16
    # --max-batch 1: the one-at-a-time server (the batched one is tests/test_server_batch.py).
    app = create_app(model, tokenizer, served_model_names=["demo", "mtplx"], queue_size=8, max_tokens_default=16,
                     max_body_bytes=MAX_BODY, max_batch=1)
    with running(app, model, tokenizer) as s:
        yield s


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


# -- discovery -----------------------------------------------------------------------------------

def test_models_health(server: Server) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["demo", "mtplx"]
    raw = server.http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    assert server.http.get("/v1/models/mtplx").json()["id"] == "mtplx"
    h = server.http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "demo"
    err = assert_openai_error(server.http.get("/v1/models/not-this-one"), 404)
    assert err["code"] == "model_not_found"
    assert_openai_error(server.http.post("/v1/nowhere", json={}), 404)


def test_unknown_model_is_404(server: Server) -> None:
    # As OpenAI answers: 404 model_not_found, naming the models this server does serve.
    for path, body in [("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
                       ("/v1/completions", {"model": "gpt-4o", "prompt": PROMPT})]:
        err = assert_openai_error(server.http.post(path, json=body), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "'demo'" in err["message"] and "--served-model-name" in err["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    # Every served name is answered, and the first one is reported.
    r = server.client.chat.completions.create(model="mtplx", messages=MESSAGES, max_tokens=1, temperature=0)
    assert r.model == "demo" and r.choices[0].finish_reason == "length"


# -- equality with mtplx.generate ----------------------------------------------------------------

@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.6, 1234)])
def test_chat_matches_generate(server: Server, temperature: float, seed: int | None) -> None:
    expected, last = reference(server, MESSAGES, max_tokens=12, temperature=temperature, seed=seed)
    r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12,
                                              temperature=temperature, seed=seed)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "demo"
    assert r.choices[0].message.role == "assistant" and r.choices[0].logprobs is None
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == last.finish_reason
    n_prompt = len(encode_prompt(server.tokenizer, MESSAGES))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, last.generation_tokens)
    assert r.usage.total_tokens == n_prompt + last.generation_tokens
    stats = r.model_extra["mtplx"]
    assert set(stats) >= {"tokens_per_second", "acceptance", "tokens_per_step", "depth", "depth_histogram"}
    # No depth pinned: auto, whose histogram counts every decode step (the first token is the prefill's).
    assert stats["depth"] == "auto" and len(stats["acceptance"]) == len(stats["depth_histogram"]) - 1
    # every decode step is a head step (by depth) or a step of copied drafts
    assert sum(stats["depth_histogram"].values()) + stats["lookup_steps"] == last.stats.steps - 1


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
    assert finals[0].model_extra["mtplx"]["depth"] == "auto"
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


# -- logprobs ------------------------------------------------------------------------------------

def _engine_logprobs(s: Server, prompt: Any, k: int) -> list:
    """The API's logprobs for the request the test sends (without the end-of-sequence token)."""
    wait_idle(s)
    eos = set(s.tokenizer.eos_token_ids)
    return [lp for r in mtplx.stream_generate(s.model, s.tokenizer, prompt, max_tokens=3, temperature=0, logprobs=k)
            for lp in r.logprobs if lp.token not in eos]


def test_chat_logprobs(server: Server) -> None:
    expected = _engine_logprobs(server, MESSAGES, 2)
    r = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [(c.logprob, [(t.logprob) for t in c.top_logprobs]) for c in content] == \
        [(lp.logprob, [v for _, v in lp.top]) for lp in expected]
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(bytes(c.bytes).decode() == c.token and c.top_logprobs[0].logprob >= c.logprob for c in content)
    # Streamed: the same entries, spread over the chunks.
    chunks = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_completion_logprobs(server: Server) -> None:
    expected = _engine_logprobs(server, PROMPT, 1)
    r = server.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                                  "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [e.logprob for e in expected]
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert [list(d.values()) for d in lp["top_logprobs"]] == [[v for _, v in e.top] for e in expected]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    with server.http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                                             "logprobs": 1, "stream": True}) as s:
        events = [e for e in sse_events(list(s.iter_lines())) if e != "[DONE]"]
    streamed = [v for e in events if e["choices"][0]["logprobs"] for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


# -- response_format -----------------------------------------------------------------------------

def test_response_format(server: Server) -> None:
    """Structured output is decoded under the grammar (and the answer parses and validates);
    a schema the grammar engine cannot take and thinking with a grammar are 400s."""
    import jsonschema

    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "temperature": 0,
                                                       "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 48, "temperature": 0,
                                                       "response_format": fmt})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nonsense"}}}
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": bad})
    assert assert_openai_error(r)["param"].startswith("response_format")
    r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": {"type": "json_object"},
                                                       "chat_template_kwargs": {"enable_thinking": True}})
    assert assert_openai_error(r)["param"] == "enable_thinking"


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
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": MESSAGES, "seed": -1}, "seed"),
    ({"messages": MESSAGES, "seed": 2**64}, "seed"),
    ({"messages": MESSAGES, "depth": 2.5}, "depth"),
    ({"messages": MESSAGES, "depth": "deep"}, "depth"),
    ({"messages": MESSAGES, "depth": "2"}, "depth"),
    ({"messages": MESSAGES, "depth": -1}, "depth"),
    ({"messages": MESSAGES, "top_k": -5}, "top_k"),
    ({"messages": MESSAGES, "min_p": 2}, "min_p"),
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
    ({"messages": MESSAGES, "messages_": 1}, "messages_"),
    # Fields mtplx cannot honour are refused, never silently dropped.
    ({"messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": MESSAGES, "presence_penalty": -1}, "presence_penalty"),
    ({"messages": MESSAGES, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": MESSAGES, "reasoning_effort": "low"}, "reasoning_effort"),
    ({"messages": MESSAGES, "store": True}, "store"),
    ({"messages": MESSAGES, "audio": {"voice": "alloy"}}, "audio"),
    ({"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"messages": [{"role": "user", "content": "x", "audio": {}}]}, "messages[0].audio"),
    ({"messages": MESSAGES, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "logprobs": 2}, "logprobs"),
    ({"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}},
     "response_format.json_schema"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_chat_requests(server: Server, body: dict, param: str) -> None:
    err = assert_openai_error(server.http.post("/v1/chat/completions", json=body))
    assert err["param"] == param


def test_a_template_without_tools_refuses_them(demo_plain_template) -> None:
    """A chat template that renders no tools: tools and tool messages are refused, not silently dropped."""
    model, tokenizer = demo_plain_template
    app = create_app(model, tokenizer, served_model_names=["demo"], max_tokens_default=4)
    with running(app, model, tokenizer) as s:
        for body, param in [
                ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                ({"messages": MESSAGES + [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
                 "messages[1].role")]:
            err = assert_openai_error(s.http.post("/v1/chat/completions", json=body))
            assert err["param"] == param and "does not render" in err["message"]


BAD_COMPLETIONS = [
    ({"prompt": [999999, 5]}, "prompt", "999999"),  # once a segmentation fault of the whole server
    ({"prompt": [5, -1]}, "prompt", "-1"),
    ({"prompt": [5, 4096]}, "prompt", "4096"),  # the demo's vocabulary is [0, 4096)
    ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ({"prompt": PROMPT, "echo": True}, "echo", "not supported"),
    ({"prompt": PROMPT, "suffix": "x"}, "suffix", "not supported"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of", "not supported"),
    ({"prompt": PROMPT, "n": 2}, "n", "not supported"),
    ({"prompt": PROMPT, "logit_bias": {"1": -100}}, "logit_bias", "not supported"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": PROMPT, "logprobs": -1}, "logprobs", "[0, 20]"),
]


@pytest.mark.parametrize("body,param,says", BAD_COMPLETIONS)
def test_bad_completion_requests(server: Server, body: dict, param: str, says: str) -> None:
    err = assert_openai_error(server.http.post("/v1/completions", json=body))
    assert err["param"] == param and says in err["message"], err


def test_non_finite_numbers(server: Server) -> None:
    # Python's JSON parser reads NaN and Infinity; the knob check refuses them.
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                b'{"prompt": "x", "min_p": 1e400}'):
        err = assert_openai_error(server.http.post("/v1/completions", content=raw,
                                                   headers={"content-type": "application/json"}))
        assert "finite" in err["message"]


def test_harmless_fields_accepted(server: Server) -> None:
    extra = {"user": "u1", "metadata": {"k": "v"}, "service_tier": "auto", "store": False, "frequency_penalty": 0,
             "presence_penalty": 0.0, "logit_bias": {}, "n": 1, "top_k": -1, "prompt_cache_key": "p",
             "safety_identifier": "s", "messages": [{"role": "user", "content": "hi", "name": "ann"}]}
    r = server.http.post("/v1/chat/completions", json={**extra, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    r = server.http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0,
                                                  "user": "u1", "best_of": 1, "echo": False})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3, r.text


# -- limits: body size, prompt length, Host header ------------------------------------------------

def test_body_limit(server: Server) -> None:
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    err = assert_openai_error(server.http.post("/v1/completions", content=big,
                                               headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and str(MAX_BODY) in err["message"]

    # Chunked, with no Content-Length to refuse it by: the limit holds while reading.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 2**16 + 1):
            yield b"x" * 2**16
        yield b'"}'

    r = server.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert server.http.get("/health").json()["status"] == "ok"


def test_prompt_length_bounds(server: Server) -> None:
    # Far past what the context can hold: refused from its length alone, before tokenizing.
    n = server.model.max_context * 45 * 4 + 1  # 45: the demo's longest token, in characters
    assert len(json.dumps({"prompt": "x" * n})) < MAX_BODY
    err = assert_openai_error(server.http.post("/v1/completions", json={"prompt": "x" * n}))
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    err = assert_openai_error(server.http.post("/v1/chat/completions",
                                               json={"messages": [{"role": "user", "content": "x" * n}]}))
    assert err["code"] == "context_length_exceeded"
    # Short enough to tokenize, too many tokens for the context.
    err = assert_openai_error(server.http.post("/v1/completions", json={"prompt": "a b " * 3000}))
    assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    err = assert_openai_error(server.http.post("/v1/completions", json={"prompt": [5] * 5000}))
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("localhost", True), ("LOCALHOST.", True), ("[::1]", True),
                                     ("127.0.0.2", True), ("evil.example", False), ("localhost.evil.example", False),
                                     ("10.0.0.1", False), ("", False)])
def test_host_header(server: Server, host: str, ok: bool) -> None:
    port = server.base.rsplit(":", 1)[1]
    r = server.http.get("/v1/models", headers={"host": f"{host}:{port}" if host else ""})
    if ok:
        assert r.status_code == 200, r.text
    else:
        err = assert_openai_error(r, 403, "permission_error")
        assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]


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
    def count(text: str, endpoint: str, status: int) -> float:
        return metric(text, "mtplx_requests_total", f'endpoint="{endpoint}",status="{status}"') or 0

    before = server.http.get("/metrics").text
    # depth 2 pinned: depth auto drafts nothing for the 4-bit demo on a CPU (no depth pays there)
    server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, temperature=0,
                                          extra_body={"depth": 2})
    server.http.post("/v1/completions", json={"prompt": [999999]})
    server.http.post("/v1/completions", json={"prompt": [999999]})
    server.http.get("/v1/models")
    server.http.get("/v1/models/nope")
    server.http.get("/v1/models", headers={"host": "evil.example"})
    server.http.get("/no/such/path")
    wait_idle(server)
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in ("mtplx_requests_total", "mtplx_generated_tokens_total", "mtplx_prompt_tokens_total",
                   "mtplx_last_tokens_per_second", "mtplx_average_tokens_per_second", "mtplx_acceptance",
                   "mtplx_queue_depth", "mtplx_busy", "mtplx_steps_by_depth_total"):
        assert f"# TYPE {family} " in text, family
    # Requests are counted per endpoint and status.
    for endpoint, status, n in [("/v1/chat/completions", 200, 1), ("/v1/completions", 400, 2), ("/v1/models", 200, 1),
                                ("/v1/models", 403, 1), ("/v1/models/{name}", 404, 1), ("other", 404, 1)]:
        assert count(text, endpoint, status) - count(before, endpoint, status) == n, (endpoint, status)
    assert metric(text, "mtplx_generated_tokens_total") >= 4
    assert metric(text, "mtplx_prompt_tokens_total") > 0
    assert metric(text, "mtplx_last_tokens_per_second") > 0
    assert 0 <= metric(text, "mtplx_acceptance", 'position="1"') <= 1
    assert metric(text, "mtplx_acceptance", 'position="2"') is not None
    assert metric(text, "mtplx_queue_depth") == 0 and metric(text, "mtplx_busy") == 0
    assert metric(text, "mtplx_steps_by_depth_total", 'depth="2"') >= 1


def test_depth_auto_and_pinned_per_request(server: Server) -> None:
    """"depth": "auto" and an integer both pass the knob check; each reply reports its own mix,
    and a pinned depth drafts exactly that at every step the budget allows."""
    for depth in ("auto", 2, 0):
        r = server.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "depth": depth,
                                                            "temperature": 0})
        assert r.status_code == 200, r.text
        stats = r.json()["mtplx"]
        assert stats["depth"] == depth
        hist = {int(k): n for k, n in stats["depth_histogram"].items() if n}
        if depth != "auto":  # the last steps may draft fewer: no more than the budget's last tokens need
            assert sum(n for d, n in hist.items() if d != depth) <= depth and all(d <= depth for d in hist)


# -- load and cancellation -----------------------------------------------------------------------

async def _one_stream(client: httpx.AsyncClient, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 3, "temperature": 0.6,
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


def test_allowed_hosts_and_served_names(tmp_path) -> None:
    from mtplx.cli.serve_cmd import default_served_names, split_names
    from mtplx.server.guards import RequestGuard

    guard = RequestGuard(None, max_body_bytes=1, allowed_hosts=split_names(("box.lan, Api.Example.com", "10.0.0.5")))
    assert [guard.host_ok(h) for h in ("box.lan:8000", "api.example.com", "10.0.0.5:1", "[::1]:80", "evil.lan", None)] \
        == [True, True, True, True, False, False]
    assert RequestGuard(None, max_body_bytes=1, allowed_hosts=["*"]).host_ok("anything")
    assert RequestGuard(None, max_body_bytes=1, allowed_hosts=None).host_ok(None)
    assert split_names(("a,b", " c ")) == ["a", "b", "c"]  # an empty name is refused (test_sweep3)
    assert default_served_names("demo") == ["demo", "claude-*"]
    assert default_served_names("Qwen/Qwen3.5-4B") == ["Qwen/Qwen3.5-4B", "claude-*"]
    art = tmp_path / "my-artifact"
    art.mkdir()
    assert default_served_names(str(art)) == ["my-artifact", str(art), "claude-*"]
