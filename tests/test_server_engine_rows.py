"""Issue 21 rows 1 and 2 and the system-prompt snapshot, through `mtplx serve`: the server goes
through mtplx.stream_generate, so a tiny temperature answers greedily, the stop that comes
first in the text wins, and two conversations sharing only a system prompt reuse it."""

from __future__ import annotations

import pytest

import mtplx
from mtplx.server.app import create_app
from server_helpers import Server, running, wait_idle

PROMPT = "import os\n"


@pytest.fixture(scope="module")
def server(demo_bf16) -> Server:
    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    with running(create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=1 << 30), model, tok) as s:
        yield s


def complete(s: Server, **body) -> dict:
    r = s.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("depth", [0, 2])
def test_a_tiny_temperature_answers_greedily(server: Server, depth: int) -> None:
    greedy = complete(server, temperature=0, depth=depth)
    for t in (1e-40, 1e-300):
        tiny = complete(server, temperature=t, depth=depth, seed=3)
        assert tiny["text"] == greedy["text"] and tiny["finish_reason"] == "length"


def test_the_first_stop_in_the_text_wins_whatever_the_list_order(server: Server) -> None:
    full = complete(server, temperature=0, depth=3, max_tokens=40)["text"]
    first = full[8:11]
    later = next(full[p : p + 3] for p in range(11, len(full)) if full.find(full[p : p + 3]) == p)
    assert full.find(first) == 8
    cut = complete(server, temperature=0, depth=3, max_tokens=40, stop=[later, first])
    assert cut["text"] == full[:8] and cut["finish_reason"] == "stop"


def test_conversations_sharing_only_a_system_prompt_reuse_it(server: Server) -> None:
    s = server
    system = {"role": "system", "content": "You are a careful Python programmer. Answer with code only."}
    kw = {"temperature": 0, "max_tokens": 4, "chat_template_kwargs": {"enable_thinking": False}}
    used = []
    for question in ("def add(a, b):", "class Stack:"):
        messages = [system, {"role": "user", "content": question}]
        r = s.http.post("/v1/chat/completions", json={"messages": messages, **kw})
        assert r.status_code == 200, r.text
        wait_idle(s)
        body = r.json()
        assert body["choices"][0]["message"]["content"] == mtplx.generate(
            s.model, s.tokenizer, messages, max_tokens=4, temperature=0, enable_thinking=False)
        used.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert used[0] == 0 and used[1] > 10, used
