"""The server's `lookup` field (drafts copied from the context) on every dialect: the greedy text
is the text without copies, the `mtplx` block and /metrics say where the tokens came from, and a
bad value is a 400 naming the field."""

from __future__ import annotations

import pytest
from server_helpers import metric, running

import mtplx
from mtplx.server.app import create_app

# A prompt whose continuation the demo model tends to copy from (it repeats itself).
PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("


@pytest.fixture(scope="module")
def server(demo_bf16):
    model, tokenizer = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    app = create_app(model, tokenizer, served_model_names=["demo"], prompt_cache_bytes=0, lookup=0)
    with running(app, model, tokenizer) as s:
        yield s


def test_lookup_field_copies_and_changes_no_token(server) -> None:
    s = server
    expected = mtplx.generate(s.model, s.tokenizer, PROMPT, max_tokens=24, temperature=0, lookup=0)
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "depth": 2}
    plain = s.http.post("/v1/completions", json=body).json()
    copied = s.http.post("/v1/completions", json={**body, "lookup": 8}).json()
    assert plain["choices"][0]["text"] == copied["choices"][0]["text"] == expected
    assert plain["mtplx"]["lookup"] == 0 and copied["mtplx"]["lookup"] == 8
    sources = copied["mtplx"]["tokens_from"]
    assert sum(sources.values()) == 24 and sources["lookup"] > 0, sources
    text = s.http.get("/metrics").text
    assert metric(text, "mtplx_generated_tokens_by_source_total", 'source="lookup"') >= sources["lookup"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/messages", {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/responses", {"input": "x"}),
])
def test_a_bad_lookup_is_refused_on_every_dialect(server, path: str, body: dict) -> None:
    r = server.http.post(path, json={**body, "lookup": 99})
    assert r.status_code == 400 and "lookup" in r.text, r.text
