"""Anthropic's Messages API end to end with the official `anthropic` client: plain text on the demo
model's bf16 copy (conftest's demo_bf16; against mtplx.generate), tool use on the scripted model
(tests/scripted_model.py), Anthropic-shaped errors, count_tokens."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from scripted_model import TOOL_CALLS, TOOL_TEXT, scripted_model
from server_helpers import TIMEOUT, assert_anthropic_error, metric, running, wait_idle

import mtplx
from mtplx.server.app import create_app

ASK = [{"role": "user", "content": "Write a function that adds two numbers."}]
SYSTEM = "You write Python."
GREEDY = {"temperature": 0}


def _client(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def demo_server(demo_bf16):
    model, tokenizer = demo_bf16
    app = create_app(model, tokenizer, served_model_names=["demo"], max_body_bytes=2**16)
    with running(app, model, tokenizer) as s:
        s.anthropic = _client(s.base)
        yield s
        s.anthropic.close()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    model, tokenizer = scripted_model(tmp_path_factory.mktemp("scripted"))
    app = create_app(model, tokenizer, served_model_names=["scripted"])
    with running(app, model, tokenizer) as s:
        s.anthropic = _client(s.base)
        yield s
        s.anthropic.close()


def _prompt_tokens(s, messages: list[dict], **kw) -> int:
    ids = s.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    return len(ids["input_ids"] if isinstance(ids, dict) else ids)


# -- text --------------------------------------------------------------------------------------------

def test_message_matches_generate(demo_server) -> None:
    s = demo_server
    chat = [{"role": "system", "content": SYSTEM}] + ASK
    wait_idle(s)
    expected = mtplx.generate(s.model, s.tokenizer, chat, max_tokens=4, temperature=0)
    r = s.anthropic.messages.create(model="demo", max_tokens=4, system=SYSTEM, messages=ASK, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == "demo"
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == expected
    assert (r.stop_reason, r.stop_sequence) == ("max_tokens", None)
    prompt_tokens = _prompt_tokens(s, chat)
    assert (r.usage.input_tokens + r.usage.cache_read_input_tokens, r.usage.output_tokens) == (prompt_tokens, 4)

    # Streamed: Anthropic's event sequence, the same text.
    with s.anthropic.messages.stream(model="demo", max_tokens=4, system=[{"type": "text", "text": SYSTEM}],
                                     messages=ASK, extra_body=GREEDY) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta", "text"}
    assert final.content[0].text == expected and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4
    # The same prompt again: the prompt cache serves all of it but the last token.
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (1, prompt_tokens - 1)


def test_depth_auto_extension(demo_server) -> None:
    r = demo_server.http.post("/v1/messages", json={"model": "demo", "max_tokens": 4, "messages": ASK,
                                                    "depth": "auto", "temperature": 0})
    assert r.status_code == 200, r.text
    stats = r.json()["mtplx"]
    assert stats["depth"] == "auto" and sum(stats["depth_histogram"].values()) >= 1


def test_count_tokens_and_thinking(demo_server) -> None:
    s = demo_server
    chat = [{"role": "system", "content": SYSTEM}] + ASK
    count = s.anthropic.messages.count_tokens(model="demo", system=SYSTEM, messages=ASK)
    assert count.input_tokens == _prompt_tokens(s, chat)
    off = s.anthropic.messages.count_tokens(model="demo", system=SYSTEM, messages=ASK, thinking={"type": "disabled"})
    on = s.anthropic.messages.count_tokens(model="demo", system=SYSTEM, messages=ASK,
                                           thinking={"type": "enabled", "budget_tokens": 1024})
    assert off.input_tokens == _prompt_tokens(s, chat, enable_thinking=False) != on.input_tokens
    assert on.input_tokens == _prompt_tokens(s, chat, enable_thinking=True)
    # Multi-turn, content as blocks: text blocks are joined.
    turns = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "def add(a, b):"}]},
                   {"role": "user", "content": [{"type": "text", "text": "Thanks."}, {"type": "text", "text": "More?"}]}]
    n = s.anthropic.messages.count_tokens(model="demo", messages=turns).input_tokens
    assert n == _prompt_tokens(s, ASK + [{"role": "assistant", "content": "def add(a, b):"},
                                         {"role": "user", "content": "Thanks.\nMore?"}])


BAD = [
    ({"model": "demo", "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "claude-sonnet-4", "max_tokens": 4, "messages": ASK}, 404, "not_found_error", "claude-sonnet-4"),
    ({"model": "demo", "max_tokens": 0, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "demo", "max_tokens": 4, "messages": ASK, "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ({"model": "demo", "max_tokens": 4, "messages": ASK, "top_k": -2}, 400, "invalid_request_error", "top_k"),
    ({"model": "demo", "max_tokens": 4, "messages": ASK, "depth": "deep"}, 400, "invalid_request_error", "'auto'"),
    ({"model": "demo", "max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error", "user or assistant"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_request_error", "role"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0]"),
    ({"model": "demo", "max_tokens": 4, "messages": ASK, "tools": [
        {"name": "f", "input_schema": {"type": "object"}, "strict": True}]}, 400, "invalid_request_error", "strict"),
    ({"model": "demo", "max_tokens": 4, "messages": ASK, "contaner": "x"}, 400, "invalid_request_error", "contaner"),
    ({"model": "demo", "max_tokens": 2000, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 10}},
     400, "invalid_request_error", "budget_tokens"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "x" * 2**16}]}, 413,
     "request_too_large", "limit"),
]


@pytest.mark.parametrize("body,status,kind,says", BAD)
def test_errors_have_anthropic_shape(demo_server, body: dict, status: int, kind: str, says: str) -> None:
    err = assert_anthropic_error(demo_server.http.post("/v1/messages", json=body), status, kind)
    assert says in err["message"], err


def test_errors_through_the_client(demo_server) -> None:
    s = demo_server
    with pytest.raises(anthropic.NotFoundError):
        s.anthropic.messages.create(model="claude-opus-4", max_tokens=4, messages=ASK)
    with pytest.raises(anthropic.BadRequestError):
        s.anthropic.messages.create(model="demo", max_tokens=4, messages=ASK, extra_body={"temperature": "hot"})
    r = httpx.get(f"{s.base}/v1/messages", headers={"host": "evil.example"}, timeout=TIMEOUT)
    assert_anthropic_error(r, 403, "permission_error")
    # /metrics counts the Anthropic endpoints as endpoints of their own.
    s.anthropic.messages.count_tokens(model="demo", messages=ASK)
    text = s.http.get("/metrics").text
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/messages",status="404"') >= 1
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/messages",status="403"') >= 1
    assert metric(text, "mtplx_requests_total", 'endpoint="/v1/messages/count_tokens",status="200"') >= 1


# -- tool use ----------------------------------------------------------------------------------------

TOOLS = [{"name": "get_weather", "description": "Forecast for a city", "input_schema": {
              "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}},
         {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}]


def test_tool_use(tool_server) -> None:
    s = tool_server
    r = s.anthropic.messages.create(model="scripted", max_tokens=32, messages=ASK, tools=TOOLS)
    assert r.stop_reason == "tool_use"
    assert [b.type for b in r.content] == ["text", "tool_use", "tool_use"]
    assert r.content[0].text == TOOL_TEXT
    assert [(b.name, b.input) for b in r.content[1:]] == TOOL_CALLS
    assert all(b.id.startswith("toolu_") for b in r.content[1:])

    with s.anthropic.messages.stream(model="scripted", max_tokens=32, messages=ASK, tools=TOOLS,
                                     extra_body={"temperature": 0.8, "seed": 5}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "text", None)) for b in final.content[:1]] == [("text", TOOL_TEXT)]
    assert [(b.name, b.input) for b in final.content[1:]] == TOOL_CALLS

    # The results go back as tool_result blocks; the template renders them as Qwen3.5 expects.
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": b.id, "content": f"result of {b.name}"}
                         for b in r.content[1:]] + [{"type": "text", "text": "And tomorrow?"}]}]
    n = s.anthropic.messages.count_tokens(model="scripted", messages=history, tools=TOOLS).input_tokens
    openai_tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                      "parameters": t["input_schema"]}} for t in TOOLS]
    rendered = ASK + [{"role": "assistant", "content": TOOL_TEXT, "tool_calls": [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}} for b in r.content[1:]]}]
    rendered += [{"role": "tool", "tool_call_id": b.id, "content": f"result of {b.name}"} for b in r.content[1:]]
    rendered += [{"role": "user", "content": "And tomorrow?"}]
    text = s.tokenizer.apply_chat_template(rendered, tools=openai_tools, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\nresult of get_weather\n</tool_response>" in text
    assert n == len(s.tokenizer.encode(text))


def test_tool_choice_and_stop_reasons(tool_server) -> None:
    s = tool_server
    # "none": no tools in the prompt, the text is not parsed, and the model's EOS is end_turn.
    r = s.anthropic.messages.create(model="scripted", max_tokens=32, messages=ASK, tools=TOOLS,
                                    tool_choice={"type": "none"})
    assert r.stop_reason == "end_turn" and [b.type for b in r.content] == ["text"]
    assert r.content[0].text.startswith(TOOL_TEXT + "\n\n<tool_call>")
    # A stop sequence ends the text where it begins, and is named (also streamed).
    r = s.anthropic.messages.create(model="scripted", max_tokens=32, messages=ASK, stop_sequences=["@@", "<tool_"])
    assert (r.stop_reason, r.stop_sequence, r.content[0].text) == ("stop_sequence", "<tool_", TOOL_TEXT + "\n\n")
    with s.anthropic.messages.stream(model="scripted", max_tokens=32, messages=ASK, stop_sequences=["me c"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", "me c", "Let ")
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
            s.anthropic.messages.create(model="scripted", max_tokens=8, messages=ASK, tools=TOOLS, tool_choice=choice)
