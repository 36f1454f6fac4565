"""`mtplx serve`'s continuous batching end to end: a real uvicorn server, real clients, the bf16
graft of the fixture (on MLX's CPU backend a bf16 pass over several rows costs little more than
one row's). No mocks, no timing asserts.

What must hold: requests decoded together give the texts they give one at a time (greedy and
seeded); a row that is cancelled or whose client leaves goes without disturbing the others;
admission is counted exactly (--queue-size); /metrics reports the batch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from server_helpers import TIMEOUT, Server, metric, running, sse_events, wait_idle

import mtplx
from mtplx.server.app import create_app
from mtplx.server.capacity import Capacity, row_bytes

# Different lengths, so rows join with different prompt lengths and finish at different steps.
PROMPTS = ["def fib(n):", "The cache keeps the most recent entries, and the oldest one goes first when",
           "import os\n", "Hello"]


@pytest.fixture(scope="module")
def bf16(grafted_bf16):
    return mtplx.load(str(grafted_bf16[0]))


def serve(model: Any, tok: Any, **kw: Any):
    return running(create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, **kw), model, tok)


async def _complete(c: httpx.AsyncClient, prompt: str, stream: bool, **kw: Any) -> str:
    body = {"prompt": prompt, "stream": stream, **kw}
    if not stream:
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def _concurrently(s: Server, requests: list[tuple[str, bool, dict]]) -> list[str]:
    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=s.base, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(_complete(c, p, stream, **kw) for p, stream, kw in requests))
    return asyncio.run(asyncio.wait_for(run(), 240))


def test_concurrent_requests_give_the_texts_of_one_at_a_time(bf16) -> None:
    """4 greedy requests at once (2 streamed, 2 not) and 2 seeded sampled ones: the same texts
    from a batching server as from --max-batch 1, and as mtplx.generate; and the batch did hold
    several rows (the first request is long, so the others join while it runs)."""
    model, tok = bf16
    requests = [(PROMPTS[0], True, {"max_tokens": 96, "temperature": 0}),
                (PROMPTS[1], False, {"max_tokens": 24, "temperature": 0}),
                (PROMPTS[2], True, {"max_tokens": 40, "temperature": 0}),
                (PROMPTS[3], False, {"max_tokens": 32, "temperature": 0, "stop": ["\n\n"]}),
                (PROMPTS[2], True, {"max_tokens": 24, "temperature": 0.8, "seed": 7}),
                (PROMPTS[3], False, {"max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 3, "depth": 3})]
    with serve(model, tok, max_batch=1) as one:
        alone = _concurrently(one, requests)
        assert one.http.get("/health").json()["max_batch"] == 1
    with serve(model, tok, max_batch=4) as four:
        together = _concurrently(four, requests)
        wait_idle(four)
        text = four.http.get("/metrics").text
    assert together == alone
    greedy = [mtplx.generate(model, tok, p, **kw) for p, _, kw in requests[:3]]
    assert together[:3] == greedy
    steps = metric(text, "mtplx_batch_size_rows_count")
    assert steps and metric(text, "mtplx_batch_size_rows_bucket", 'le="1"') < steps  # some step held >1 row
    assert metric(text, "mtplx_batch_size_rows_bucket", 'le="4"') == steps  # never more than --max-batch
    assert metric(text, "mtplx_batch_size") == 0 and metric(text, "mtplx_row_tokens_per_second_count") == 6
    assert metric(text, "mtplx_generations_total", 'outcome="completed"') == 6


def test_a_row_that_leaves_does_not_disturb_the_others(bf16) -> None:
    """A long streamed row whose client leaves after its first text, and a cancelled queued one:
    the rows beside them finish with the text they give alone."""
    model, tok = bf16
    want = [mtplx.generate(model, tok, p, max_tokens=48, temperature=0) for p in PROMPTS[1:3]]
    with serve(model, tok, max_batch=3, queue_size=4) as s:
        before = s.http.get("/metrics").text

        async def run() -> list[str]:
            async with httpx.AsyncClient(base_url=s.base, timeout=TIMEOUT) as c:
                async def leaver() -> None:
                    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "stream": True}
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                                return  # the client leaves mid-generation
                others = [_complete(c, p, stream, max_tokens=48, temperature=0)
                          for p, stream in ((PROMPTS[1], True), (PROMPTS[2], False))]
                results = await asyncio.gather(leaver(), *others)
                return results[1:]

        got = asyncio.run(asyncio.wait_for(run(), 240))
        wait_idle(s)
        after = s.http.get("/metrics").text
    assert got == want
    for outcome, n in (("cancelled", 1), ("completed", 2)):
        label = f'outcome="{outcome}"'
        assert (metric(after, "mtplx_generations_total", label) or 0) - (metric(before, "mtplx_generations_total", label) or 0) == n


@pytest.mark.parametrize("max_batch", [1, 2])
def test_queue_size_admits_exactly_batch_plus_queue(bf16, max_batch: int) -> None:
    """Issue 21 row 15: with --queue-size 2, requests arriving at the same instant are admitted
    max_batch + 2 at a time, however far the engine thread has got; the next one is a 429."""
    model, tok = bf16
    n = max_batch + 2
    with serve(model, tok, max_batch=max_batch, queue_size=2) as s:
        async def run() -> list[int]:
            async with httpx.AsyncClient(base_url=s.base, timeout=TIMEOUT) as c:
                body = {"prompt": PROMPTS[0], "max_tokens": 600, "temperature": 0}
                first = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(n)]
                await asyncio.sleep(0)
                while s.http.get("/health").json()["queue_depth"] + s.http.get("/health").json()["batch_size"] < n:
                    refused = [t.result().status_code for t in first if t.done()]
                    assert not refused, f"one of the first {n} simultaneous requests was answered {refused}"
                    await asyncio.sleep(0.02)  # all n admitted (they hold their places for 600 tokens)
                extra = await c.post("/v1/completions", json={**body, "max_tokens": 1})
                for t in first:
                    t.cancel()
                return [extra.status_code]

        assert asyncio.run(asyncio.wait_for(run(), 120)) == [429]
        wait_idle(s)


def test_row_bytes_match_a_real_cache_and_the_default_batch(bf16) -> None:
    from mtplx.engine.speculative import Engine
    from mtplx.engine.sampling import SamplingParams

    model, tok = bf16
    engine = Engine(model, 2, SamplingParams(temperature=0.0), seed=0)
    prompt = tok.encode(PROMPTS[1] * 8)
    for _ in engine.generate(prompt, 16):
        pass
    held = engine.cache.nbytes
    tokens = engine.cache.offset
    assert row_bytes(model, tokens) == pytest.approx(held, rel=0.1)
    assert row_bytes(model, 2 * tokens) > row_bytes(model, tokens)
    cap = Capacity(model, budget=row_bytes(model, min(8192, model.max_context)) * 3 + 1)
    assert cap.default_max_batch() == 3 and Capacity(model, 0).default_max_batch() == 1
    assert cap.fits(cap.budget + 1, 0, 0) and not cap.fits(cap.budget, 1, 1) and cap.fits(10, 10, 1)


def test_grammar_logprobs_and_prompt_cache_rows_inside_a_batch(bf16) -> None:
    """Rows with a response_format grammar, logprobs, and a prompt-cache hit, sent together with a
    plain one: each answers as with --max-batch 1 (text, logprobs, cached tokens)."""
    model, tok = bf16
    turn1 = [{"role": "user", "content": "def add(a, b):"}]
    base = {"temperature": 0, "max_tokens": 20, "chat_template_kwargs": {"enable_thinking": False}}

    def bodies(reply: str) -> list[dict]:
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "class C:"}]
        return [{**base, "messages": turn2},  # extends the cached conversation
                {**base, "messages": [{"role": "user", "content": "Give a JSON object."}],
                 "response_format": {"type": "json_object"}, "max_tokens": 24},
                {**base, "messages": [{"role": "user", "content": "Hello"}], "logprobs": True, "top_logprobs": 2},
                {**base, "messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 0.7, "seed": 5}]

    def run(max_batch: int) -> list[dict]:
        app = create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=1 << 28, max_batch=max_batch)
        with running(app, model, tok) as s:
            first = s.http.post("/v1/chat/completions", json={**base, "messages": turn1}).json()
            reply = first["choices"][0]["message"]["content"]
            wait_idle(s)

            async def go() -> list[dict]:
                async with httpx.AsyncClient(base_url=s.base, timeout=TIMEOUT) as c:
                    rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies(reply)))
                return [r.json() for r in rs]
            return asyncio.run(asyncio.wait_for(go(), 240))

    alone, together = run(1), run(4)
    for a, b in zip(alone, together):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
        assert b["usage"]["prompt_tokens_details"] == a["usage"]["prompt_tokens_details"]
    assert together[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    if together[1]["choices"][0]["finish_reason"] == "stop":  # a finished json_object parses
        assert isinstance(json.loads(together[1]["choices"][0]["message"]["content"]), dict)
    lp_a, lp_b = (r["choices"][0]["logprobs"]["content"] for r in (alone[2], together[2]))
    assert [x["token"] for x in lp_b] == [x["token"] for x in lp_a] and len(lp_b) > 0
    assert [x["logprob"] for x in lp_b] == pytest.approx([x["logprob"] for x in lp_a], abs=1e-4)


def test_rows_that_do_not_fit_in_memory_wait(bf16) -> None:
    """A memory budget for one row's caches: three requests at once decode one after another (the
    batch never holds two rows) and still answer right."""
    model, tok = bf16
    app = create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, max_batch=4)
    app.state.core.scheduler.capacity = Capacity(model, budget=row_bytes(model, 200))
    requests = [(p, False, {"max_tokens": 16, "temperature": 0}) for p in PROMPTS[:3]]
    with running(app, model, tok) as s:
        got = _concurrently(s, requests)
        wait_idle(s)
        text = s.http.get("/metrics").text
    assert got == [mtplx.generate(model, tok, p, **kw) for p, _, kw in requests]
    steps = metric(text, "mtplx_batch_size_rows_count")
    assert steps and metric(text, "mtplx_batch_size_rows_bucket", 'le="1"') == steps
