"""A failing row fails alone (issue 27): faults injected at the real seams of a real server (the
bf16 graft of the fixture, a real uvicorn server on loopback, real clients).

What must hold: a row whose join (its prompt cache's checkout), step (its grammar, its
detokenizer) or leave (its prompt cache's checkin) raises ends its own request with an error (a
500 with the traceback logged, a 400 for an MtplxError); the rows beside it finish with the text
they give alone; the engine thread lives on, its places are not leaked and the next request
works. If the engine thread itself dies, every request it held hears so at once and /health
answers 503. Depth auto's step costs are measured when the app is made, whatever its default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from server_helpers import TIMEOUT, Server, running, sse_events, wait_idle

import mtplx
from mtplx.engine.constraints import Constraint
from mtplx.errors import MtplxError
from mtplx.server import queue
from mtplx.server.app import create_app

NEIGHBOURS = ["def fib(n):", "import os\n"]
TARGET = "Hello"
GREEDY = {"max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def bf16(grafted_bf16):
    return mtplx.load(str(grafted_bf16[0]))


@pytest.fixture(scope="module")
def solo(bf16) -> dict[str, str]:
    model, tok = bf16
    return {p: mtplx.generate(model, tok, p, **GREEDY) for p in NEIGHBOURS + [TARGET]}


def serve(model: Any, tok: Any, **kw: Any):
    kw.setdefault("prompt_cache_bytes", 0)
    return running(create_app(model, tok, served_model_names=["m"], **kw), model, tok)


async def _completion(c: httpx.AsyncClient, prompt: str, stream: bool, **kw: Any) -> tuple[int, str, Any]:
    """(status, text, the error body or event if any)."""
    body = {"prompt": prompt, "stream": stream, **GREEDY, **kw}
    if not stream:
        r = await c.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, "", r.json()
        return 200, r.json()["choices"][0]["text"], None
    chat = "response_format" in kw  # a grammar: chat completions take response_format
    if chat:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    async with c.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        events = sse_events([line async for line in r.aiter_lines()])
    assert events[-1] == "[DONE]", events[-3:]
    errors = [e for e in events[:-1] if "error" in e]
    pieces = [e["choices"][0] for e in events[:-1] if "choices" in e and e["choices"]]
    text = "".join((p["delta"].get("content") or "") if chat else p["text"] for p in pieces)
    return (200 if not errors else -1), text, (errors[0] if errors else None)


def _together(s: Server, requests: list[tuple[str, bool, dict]]) -> list[tuple[int, str, Any]]:
    async def run() -> list[tuple[int, str, Any]]:
        async with httpx.AsyncClient(base_url=s.base, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(_completion(c, p, stream, **kw) for p, stream, kw in requests))
    return asyncio.run(asyncio.wait_for(run(), 240))


def _with_target(target: tuple[str, bool, dict]) -> list[tuple[str, bool, dict]]:
    """The neighbours (one streamed, one not) with the faulty request between them."""
    return [(NEIGHBOURS[0], True, {}), target, (NEIGHBOURS[1], False, {})]


def _after(s: Server, solo: dict[str, str]) -> None:
    """The engine lives on: no place leaked, /health 200, and the target's prompt now works."""
    h = wait_idle(s)
    assert s.http.get("/health").status_code == 200 and h["status"] == "ok"
    r = s.http.post("/v1/completions", json={"prompt": TARGET, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == solo[TARGET]


def _fail_once(fn: Any, when: Any, exc: BaseException) -> Any:
    """``fn`` that raises ``exc`` the first time ``when(*args)`` holds."""
    fired = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not fired and when(*args):
            fired.append(True)
            raise exc
        return fn(*args, **kwargs)
    wrapped.fired = fired  # type: ignore[attr-defined]
    return wrapped


@pytest.mark.parametrize("seam,max_batch", [("checkout", 1), ("checkout", 3), ("checkin", 3)])
def test_a_prompt_cache_that_raises_fails_its_row_alone(bf16, solo, caplog, seam: str, max_batch: int) -> None:
    """The LRU's checkout (as the row joins: e.g. MLX failing to allocate a prefix copy) or its
    checkin (as the row leaves) raises for one request: that request gets a 500 and the
    traceback is logged; its neighbours' texts equal their solo texts."""
    model, tok = bf16
    ids = tok.encode(TARGET)
    app = create_app(model, tok, served_model_names=["m"], max_batch=max_batch, queue_size=4,
                     prompt_cache_bytes=1 << 26)
    lru = app.state.core.prompt_caches  # the server's own instance: the fault is injected here only
    with running(app, model, tok) as s:
        fault = MemoryError("[metal::malloc] cannot allocate the prefix copy (injected)")
        if seam == "checkout":
            lru.checkout = _fail_once(lru.checkout, lambda prompt: list(prompt) == ids, fault)
        else:
            lru.checkin = _fail_once(lru.checkin, lambda cache: cache.tokens[: len(ids)] == ids, fault)
        with caplog.at_level(logging.ERROR, logger="mtplx.server"):
            results = _together(s, _with_target((TARGET, False, {})))
        assert (lru.checkout if seam == "checkout" else lru.checkin).fired
        (s0, t0, _), (st, _, err), (s2, t2, _) = results
        assert st == 500 and err["error"]["type"] == "server_error" and "MemoryError" in err["error"]["message"]
        assert (s0, t0) == (200, solo[NEIGHBOURS[0]]) and (s2, t2) == (200, solo[NEIGHBOURS[1]])
        assert any(r.exc_info and r.exc_info[0] is MemoryError for r in caplog.records), "no traceback logged"
        _after(s, solo)


class _DeadEnd(Constraint):
    """A real grammar whose matcher, a few masks into the row, allows no token."""

    calls = 0

    def allowed(self) -> Any:
        self.calls += 1
        if self.calls > 4:
            raise MtplxError("the grammar matcher allows no token: dead end (injected)")
        return super().allowed()


def test_a_grammar_that_dead_ends_fails_its_row_alone(bf16, solo, monkeypatch) -> None:
    """A streamed row whose grammar dead-ends mid-row gets an SSE error event (400: an
    MtplxError) then [DONE]; the rows decoding beside it in the same steps are unchanged."""
    model, tok = bf16
    real = Constraint.from_response_format.__func__
    monkeypatch.setattr(Constraint, "from_response_format", classmethod(lambda cls, *a, **k: real(_DeadEnd, *a, **k)))
    with serve(model, tok, max_batch=3, queue_size=4) as s:
        target = (TARGET, True, {"response_format": {"type": "json_object"}, "depth": 2})
        (s0, t0, _), (st, _, err), (s2, t2, _) = _together(s, _with_target(target))
        assert st == -1 and err["error"]["type"] == "invalid_request_error"
        assert "allows no token" in err["error"]["message"]
        assert (s0, t0) == (200, solo[NEIGHBOURS[0]]) and (s2, t2) == (200, solo[NEIGHBOURS[1]])
        monkeypatch.undo()
        _after(s, solo)


def test_a_detokenizer_that_raises_fails_its_row_alone(bf16, solo, monkeypatch) -> None:
    """The target row's detokenizer raises on its third token: a 500 for that request only."""
    model, tok = bf16
    ids = tok.encode(TARGET)

    class Text(queue.RowText):
        def __init__(self, tokenizer: Any, spec: Any):
            super().__init__(tokenizer, spec)
            if list(spec.prompt) == ids:
                add, seen = self.detok.add_token, []

                def add_token(t: int) -> None:
                    seen.append(t)
                    if len(seen) == 3:
                        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte (injected)")
                    add(t)
                self.detok.add_token = add_token

    monkeypatch.setattr(queue, "RowText", Text)
    with serve(model, tok, max_batch=3, queue_size=4) as s:
        (s0, t0, _), (st, _, err), (s2, t2, _) = _together(s, _with_target((TARGET, False, {})))
        assert st == 500 and "UnicodeDecodeError" in err["error"]["message"]
        assert (s0, t0) == (200, solo[NEIGHBOURS[0]]) and (s2, t2) == (200, solo[NEIGHBOURS[1]])
        monkeypatch.undo()
        _after(s, solo)


class _Fatal(BaseException):
    """Something no handler inside the engine loop catches."""


def test_an_engine_thread_that_dies_ends_every_request_at_once(bf16, caplog) -> None:
    """Two rows decoding and one queued when the engine thread dies: all three hear an error at
    once (a 503 in their dialect), /health answers 503 and says why, a new request gets 503, and
    the log says why the thread stopped."""
    model, tok = bf16
    app = create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, max_batch=2, queue_size=2)
    scheduler = app.state.core.scheduler
    record = scheduler.metrics.record_batch

    def record_batch(n: int) -> None:  # the loop's bookkeeping, outside every per-row guard
        if scheduler.depth >= 1:
            raise _Fatal("the engine's bookkeeping failed (injected)")
        record(n)
    scheduler.metrics.record_batch = record_batch
    long = {"max_tokens": 2000}
    with running(app, model, tok) as s, caplog.at_level(logging.CRITICAL, logger="mtplx.server"):
        t0 = time.monotonic()
        results = _together(s, [(NEIGHBOURS[0], True, long), (NEIGHBOURS[1], False, long), (TARGET, False, long)])
        assert time.monotonic() - t0 < 60, "the requests were not ended at once"
        (s0, _, e0), (s1, _, e1), (s2, _, e2) = results
        assert s0 == -1 and e0["error"]["code"] == "unavailable" and "engine stopped" in e0["error"]["message"]
        assert s1 == s2 == 503 and all("engine stopped" in e["error"]["message"] for e in (e1, e2))
        h = s.http.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "_Fatal" in h.json()["error"]
        r = s.http.post("/v1/completions", json={"prompt": TARGET, "max_tokens": 4})
        assert r.status_code == 503 and "engine stopped" in r.json()["error"]["message"]
        assert scheduler.admitted == 0
    assert any("engine thread stopped" in r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL)


def test_depth_auto_costs_are_measured_at_start_whatever_the_default(grafted_bf16) -> None:
    """A server whose default depth is fixed still has depth auto's step costs before its first
    request, so a request asking for auto never measures them inside a running batch's step."""
    model, tok = mtplx.load(str(grafted_bf16[0]))  # a fresh model object: nothing measured on it yet
    assert getattr(model, "_mtplx_step_costs", None) is None
    create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, max_batch=2, depth=2)
    assert getattr(model, "_mtplx_step_costs", None) is not None


def test_a_failing_batched_pass_fails_its_rows_and_the_engine_goes_on(bf16, solo, monkeypatch) -> None:
    """The shared pass itself raises once (MLX failing inside the model's ragged pass): the rows
    in that step end with a 500, the engine thread lives on, and the next requests answer with
    their solo texts."""
    model, tok = bf16
    monkeypatch.setattr(model, "trunk_rows", _fail_once(model.trunk_rows, lambda segments: True,
                                                        RuntimeError("[eval] the batched pass failed (injected)")))
    with serve(model, tok, max_batch=2, queue_size=4) as s:
        (st, _, err), = _together(s, [(TARGET, False, {})])
        assert st == 500 and "RuntimeError" in err["error"]["message"]
        assert model.trunk_rows.fired
        results = _together(s, [(p, False, {}) for p in NEIGHBOURS])
        assert [(code, text) for code, text, _ in results] == [(200, solo[p]) for p in NEIGHBOURS]
        _after(s, solo)
