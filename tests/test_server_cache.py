"""mtplx serve's prompt caches: a conversation's next turn prefills only its new tokens, the
answers stay those of a cache-less generation, the LRU stays in its byte bound, and /metrics
and the usage fields say what happened."""

from __future__ import annotations

import threading

import pytest

import mtplx
from mtplx.server.app import create_app
from server_helpers import Server, metric, running, wait_idle

GREEDY = {"temperature": 0, "max_tokens": 6, "chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(demo_bf16) -> Server:
    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    with running(create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=1 << 30), model, tok) as s:
        yield s


def chat(s: Server, messages: list[dict], **extra) -> dict:
    r = s.http.post("/v1/chat/completions", json={"messages": messages, **GREEDY, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_conversation_prefills_only_its_new_tokens(server: Server) -> None:
    s = server
    messages = [{"role": "user", "content": "def add(a, b):"}]
    cached = []
    for turn in range(2):
        body = chat(s, messages)
        wait_idle(s)
        text = body["choices"][0]["message"]["content"]
        assert text == mtplx.generate(s.model, s.tokenizer, messages, max_tokens=6, temperature=0,
                                      enable_thinking=False)
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"class C{turn}:"}]
    # Turn 1 starts cold; turn 2 reuses everything before the previous reply.
    assert cached[0] == 0 and cached[1] >= 14, cached
    m = s.http.get("/metrics").text
    assert metric(m, "mtplx_prompt_cache_hits_total") >= 1
    assert 0 < metric(m, "mtplx_prompt_cache_bytes") <= metric(m, "mtplx_prompt_cache_limit_bytes")
    assert metric(m, "mtplx_cached_prompt_tokens_total") >= sum(cached)


def test_the_same_completion_prompt_reuses_all_but_its_last_token(server: Server) -> None:
    s = server
    body = {"prompt": "import os\nimport sys\n", "max_tokens": 4, "temperature": 0}
    first = s.http.post("/v1/completions", json=body).json()
    again = s.http.post("/v1/completions", json=body).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


def test_concurrent_requests_sharing_a_prefix_answer_as_alone(server: Server) -> None:
    """Two conversations that share a system prompt, sent at once: each is answered as a
    cache-less generation would answer it (no request reads a cache another is writing)."""
    s = server
    system = {"role": "system", "content": "You write Python."}
    asks = [[system, {"role": "user", "content": q}] for q in ("def f(x):", "class Node:")]
    results: dict[int, str] = {}

    def send(i: int) -> None:
        results[i] = chat(s, asks[i])["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wait_idle(s)
    for i, ask in enumerate(asks):
        assert results[i] == mtplx.generate(s.model, s.tokenizer, ask, max_tokens=6, temperature=0,
                                            enable_thinking=False)


def test_a_tiny_bound_evicts_and_no_prompt_cache_turns_it_off(demo_bf16) -> None:
    model, tok = demo_bf16
    with running(create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=300_000), model, tok) as s:
        for q in ("def a():", "def b():", "def c():"):
            chat(s, [{"role": "user", "content": q}], max_tokens=1)
        wait_idle(s)
        m = s.http.get("/metrics").text
        assert metric(m, "mtplx_prompt_cache_evictions_total") >= 1
        assert metric(m, "mtplx_prompt_cache_bytes") <= 300_000
    with running(create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=0), model, tok) as s:
        ask = [{"role": "user", "content": "def a():"}]
        chat(s, ask, max_tokens=1)
        assert chat(s, ask, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(s.http.get("/metrics").text, "mtplx_prompt_cache_bytes") is None
