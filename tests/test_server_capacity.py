"""Memory a laptop can trust: a request whose caches cannot fit even alone is refused with a 400
in its dialect, before it queues or prefills; a default max_tokens stops where memory would; the
byte model counts quantized KV (kv_bits) as mlx-lm stores it; `mtplx inspect` reports it.

The server runs for real (uvicorn on loopback, the bundled demo model) with a tiny row budget
handed to create_app as a Capacity, so a short prompt already reaches the limit."""

from __future__ import annotations

import json
import re
from typing import Any

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import QuantizedKVCache

from server_helpers import Server, running
from mtplx.artifact.inspect import cache_bytes, kv_token_bytes, tokens_that_fit
from mtplx.cli.commands import cli
from mtplx.errors import MtplxError
from mtplx.model.shapes import FULL, LINEAR, ShapeBytes, kind_counts
from mtplx.server.app import create_app
from mtplx.server.capacity import Capacity, _text_config, row_bytes
from mtplx.server.http_errors import APIError

LIMIT = 24  # tokens one request's caches may hold on the test's "machine"
PROMPT = "def fib(n):"
NEAR_LIMIT = "The cache keeps the most recent entries, and the oldest one goes first when"  # 20 tokens
LONG_PROMPT = "The cache keeps the most recent entries, and the oldest one goes first. " * 8


def _generations(s: Server) -> float:
    text = s.http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mtplx_generations_total"))


@pytest.fixture(scope="module")
def tight() -> Any:
    import mtplx

    # Plain AR (no head): the server then measures no step costs at start, and the generations
    # stay short on a loaded CPU; admission is the same for every depth.
    model, tok = mtplx.load("demo", mtp=False)
    cap = Capacity(model, budget=row_bytes(model, LIMIT))
    # max_tokens_default None: what `mtplx serve` passes unless --max-tokens-default is given.
    app = create_app(model, tok, served_model_names=["demo"], max_tokens_default=None, prompt_cache_bytes=0,
                     max_batch=1, capacity=cap)
    with running(app, model, tok) as s:
        yield s, cap


def _refusal(message: str) -> tuple[int, int]:
    """(prompt tokens, max_tokens) the refusal says it was asked for; it must name the limit and
    the ways under it."""
    assert f"at most {LIMIT} tokens per request" in message, message
    assert "--kv-bits 8" in message and "--kv-bits 4" in message, message
    m = re.search(r"caches of (\d+) prompt tokens \+ (\d+) max_tokens", message)
    assert m, message
    return int(m.group(1)), int(m.group(2))


def test_a_request_that_cannot_fit_alone_is_refused_before_prefill_on_every_route(tight) -> None:
    s, cap = tight
    assert cap.max_tokens() == LIMIT  # the budget holds exactly LIMIT tokens' caches
    before = _generations(s)
    asks = [("/v1/completions", {"prompt": PROMPT, "max_tokens": LIMIT}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                      "max_completion_tokens": 1000}),
            ("/v1/responses", {"model": "demo", "input": "Hi", "max_output_tokens": 1000}),
            ("/v1/messages", {"model": "demo", "max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]})]
    for path, body in asks:
        r = s.http.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        if path == "/v1/messages":  # Anthropic's shape
            err = r.json()
            assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
            message = err["error"]["message"]
        else:
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded"
            message = err["message"]
        prompt, asked = _refusal(message)
        assert prompt + asked > LIMIT and f"max_tokens of at most {LIMIT - prompt} for this prompt" in message
    # A prompt that alone leaves no room: refused whatever max_tokens, even the default.
    r = s.http.post("/v1/completions", json={"prompt": LONG_PROMPT})
    assert r.status_code == 400 and f"a prompt of fewer than {LIMIT} tokens" in r.json()["error"]["message"]
    # No refused request reached the engine: no generation of any outcome, no prefill.
    assert _generations(s) == before
    # The next ordinary request runs.
    r = s.http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4 and _generations(s) == before + 1


def test_the_default_max_tokens_stops_where_memory_would(tight) -> None:
    s, _ = tight
    # A prompt near the limit, so the reply the default allows is short on a loaded CPU.
    r = s.http.post("/v1/completions", json={"prompt": NEAR_LIMIT, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = body["usage"]["prompt_tokens"]
    # Not the context left (4096 - prompt): what the memory holds after the prompt.
    assert body["mtplx"]["max_tokens"] == LIMIT - prompt
    assert body["usage"]["completion_tokens"] <= LIMIT - prompt
    r = s.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mtplx"]["max_tokens"] == LIMIT - body["usage"]["prompt_tokens"]


def test_row_bytes_count_quantized_kv_as_mlx_lm_stores_it(demo) -> None:
    model, _ = demo
    tc = _text_config(model)
    counts = kind_counts(tc)
    shape = ShapeBytes(tc, weights=None, counts=counts, draft_vocab=0, context=0)  # type: ignore[arg-type]
    head = len(model.head.layers)
    fixed = counts[LINEAR] * (shape.state_bytes() + shape.conv_bytes())
    n_kv, head_dim = tc["num_key_value_heads"], tc["head_dim"]
    for tokens in (0, 1, 1000):
        # The default is the bf16 count it always was.
        assert row_bytes(model, tokens) == fixed + (counts[FULL] + head) * 2 * n_kv * head_dim * 2 * tokens
        for bits in (8, 4):
            # Per position, head and K or V: bits/8 bytes per value, and a bf16 scale and bias
            # per group of 64; the head's KV stays bf16.
            quant = 2 * n_kv * (head_dim * bits // 8 + 2 * (head_dim // 64) * 2)
            want = fixed + (counts[FULL] * quant + head * 2 * n_kv * head_dim * 2) * tokens
            assert row_bytes(model, tokens, kv_bits=bits) == want
    assert row_bytes(model, 1000, kv_bits=4) < row_bytes(model, 1000, kv_bits=8) < row_bytes(model, 1000)
    # The arithmetic is what a real QuantizedKVCache holds per token, at each group size.
    for bits, group in ((8, 64), (4, 64), (4, 32)):
        c = QuantizedKVCache(group_size=group, bits=bits)
        kv = mx.zeros((1, n_kv, 256, head_dim), dtype=mx.bfloat16)  # one allocation step: no slack
        c.update_and_fetch(kv, kv)
        assert c.nbytes == kv_token_bytes(tc, bits, group) * 256
    # A smaller kv_bits lets a longer request fit the same budget; a bad one is refused clearly.
    budget = row_bytes(model, 100)
    assert tokens_that_fit(tc, budget, head) == 100 == Capacity(model, budget).max_tokens()
    assert Capacity(model, budget, kv_bits=8).max_tokens() > 100
    assert cache_bytes(tc, 100, head, 4) < budget
    with pytest.raises(MtplxError, match="kv_bits must be None, 8 or 4"):
        Capacity(model, budget, kv_bits=3)


def test_a_refusal_names_only_the_fixes_that_help(demo) -> None:
    model, _ = demo
    with pytest.raises(APIError) as e:  # the weights leave nothing: no prompt is short enough
        Capacity(model, 0, prompt_cache_bytes=2**30).admit(10, 1)
    msg = e.value.message
    assert e.value.status == 400 and "at most 0 tokens" in msg and "fewer than" not in msg
    assert "--kv-bits 8" in msg and "--prompt-cache-gb" in msg and "1.00 GiB" in msg and "smaller model" in msg
    with pytest.raises(APIError) as e:  # already at 4 bits: no smaller kv_bits to offer
        Capacity(model, row_bytes(model, 100, kv_bits=4), kv_bits=4).admit(90, 20)
    msg = e.value.message
    assert "at most 100 tokens" in msg and "max_tokens of at most 10" in msg and "--kv-bits" not in msg
    Capacity(model, row_bytes(model, 100, kv_bits=4), kv_bits=4).admit(90, 10)  # exactly at the limit: admitted


def test_inspect_reports_kv_bytes_and_the_longest_context_per_kv_bits(demo) -> None:
    model, _ = demo
    r = CliRunner().invoke(cli, ["inspect", "demo"])
    assert r.exit_code == 0, r.output
    for bits in ("none", "8", "4"):
        assert re.search(rf"--kv-bits {bits}\s+[\d.]+ KiB per token\s+longest context in memory: \d+ tokens", r.output)
    r = CliRunner().invoke(cli, ["inspect", "demo", "--json", "-"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert [k["kv_bits"] for k in info["kv_cache"]] == [None, 8, 4] and info["context_tokens"] == model.max_context
    for k in info["kv_cache"]:  # read off config.json, it agrees with the loaded model's count
        assert k["bytes_per_token"] == row_bytes(model, 1, k["kv_bits"]) - row_bytes(model, 0, k["kv_bits"])
        assert 0 <= k["max_context_tokens"] <= model.max_context
    assert info["kv_cache"][2]["bytes_per_token"] < info["kv_cache"][1]["bytes_per_token"] < \
        info["kv_cache"][0]["bytes_per_token"]
