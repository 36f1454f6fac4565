"""Tool calls: the parser on real Qwen3.5 tool-call text (mlx-lm's qwen3_coder, the format of
the official Qwen3.5 chat template), and the OpenAI tools API end to end on a server whose
model writes tool calls (tests/scripted_model.py: a real model and engine, weights set so that
it says a fixed script; the official template renders the tools)."""

from __future__ import annotations

import json

import openai
import pytest
from mlx_lm.tool_parsers import qwen3_coder
from scripted_model import TOOL_CALLS, TOOL_TEXT, scripted_model
from server_helpers import Server, assert_openai_error, running

from mtplx.server.app import create_app
from mtplx.server.tools import ToolCall, ToolCallSplitter, ToolFormat, split_text, tool_format

QWEN = ToolFormat(qwen3_coder.tool_call_start, qwen3_coder.tool_call_end, qwen3_coder.parse_tool_call)

# As Qwen3.5 writes them: a sentence, then calls in the template's format; the second
# parameter spans lines, as the template's own example does.
REAL = ("I'll look that up.\n\n<tool_call>\n<function=search_files>\n<parameter=pattern>\n*.py\n</parameter>\n"
        "<parameter=note>\nfirst line\nsecond line\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=read_file>\n<parameter=path>\nsrc/main.py\n</parameter>\n<parameter=limit>\n40\n</parameter>\n"
        "<parameter=options>\n{\"encoding\": \"utf-8\", \"strip\": true}\n</parameter>\n</function>\n</tool_call>")
REAL_TOOLS = [
    {"type": "function", "function": {"name": "search_files", "parameters": {
        "type": "object", "properties": {"pattern": {"type": "string"}, "note": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"},
                                         "options": {"type": "object"}}}}},
]
REAL_CALLS = [("search_files", {"pattern": "*.py", "note": "first line\nsecond line"}),
              ("read_file", {"path": "src/main.py", "limit": 40, "options": {"encoding": "utf-8", "strip": True}})]

WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in calls]


# -- the parser, on real Qwen3.5 text --------------------------------------------------------------

def test_split_real_qwen_text() -> None:
    text, calls = split_text(QWEN, REAL_TOOLS, REAL)
    assert text == "I'll look that up."
    assert _calls(calls) == REAL_CALLS
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert json.loads(calls[1].arguments_json) == REAL_CALLS[1][1]
    # Without the schema the parser cannot know 40 is an integer: it stays the text the model wrote.
    _, untyped = split_text(QWEN, None, REAL)
    assert untyped[1].arguments["limit"] == "40"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13])
def test_streamed_split_equals_whole(size: int) -> None:
    # Markers cut anywhere by chunk boundaries: the same pieces come out, and the text that
    # streams out never contains marker fragments it would have to take back.
    splitter = ToolCallSplitter(QWEN, REAL_TOOLS)
    pieces = []
    for i in range(0, len(REAL), size):
        pieces += splitter.feed(REAL[i:i + size])
    pieces += splitter.finish()
    text = "".join(p for p in pieces if isinstance(p, str))
    assert text == "I'll look that up." and "<" not in text
    assert _calls([p for p in pieces if isinstance(p, ToolCall)]) == REAL_CALLS


def test_split_keeps_what_does_not_parse() -> None:
    plain = "def f(x):\n    return x < 3  # a '<' that starts no marker\n"
    assert split_text(QWEN, None, plain) == (plain, [])
    cut = "Calling.\n<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/"  # max_tokens hit mid-call
    assert split_text(QWEN, None, cut) == (cut, [])
    broken = "<tool_call>\nno function here\n</tool_call>"
    text, calls = split_text(QWEN, None, broken)
    assert calls == [] and text == broken


# -- the OpenAI tools API, end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    model, tokenizer = scripted_model(tmp_path_factory.mktemp("scripted"))
    app = create_app(model, tokenizer, served_model_names=["scripted"], max_tokens_default=32)
    with running(app, model, tokenizer) as s:
        yield s


def test_tool_format_from_the_template(demo, demo_plain_template, server: Server) -> None:
    assert tool_format(demo_plain_template[1]) is None  # a template that renders no tools
    for tokenizer in (demo[1], server.tokenizer):  # the demo ships Qwen3.5's official template
        fmt = tool_format(tokenizer)
        assert (fmt.start, fmt.end, fmt.parse) == (QWEN.start, QWEN.end, qwen3_coder.parse_tool_call)


def _prompt_tokens(s: Server, messages: list[dict], tools: list[dict] | None = None) -> int:
    ids = s.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if isinstance(ids, dict) else ids)


def test_tool_calls(server: Server) -> None:
    r = server.client.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER_TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TOOL_TEXT
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert got == TOOL_CALLS  # "days" is 3, an integer, as the schema says
    assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    # The tools reached the chat template.
    assert r.usage.prompt_tokens == _prompt_tokens(server, ASK, WEATHER_TOOLS) > _prompt_tokens(server, ASK)


def test_tool_calls_streamed(server: Server) -> None:
    stream = server.client.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER_TOOLS,
                                                   temperature=0.7, seed=3, stream=True)
    content, calls, finish = "", {}, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
            entry["name"] += c.function.name or ""
            entry["arguments"] += c.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert content == TOOL_TEXT and finish == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)] == TOOL_CALLS


def test_tool_choice(server: Server) -> None:
    # "none": the model is not told about the tools, and its text is not parsed.
    r = server.client.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER_TOOLS, tool_choice="none",
                                              temperature=0)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith(TOOL_TEXT + "\n\n<tool_call>")
    assert r.usage.prompt_tokens == _prompt_tokens(server, ASK)
    r = server.client.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER_TOOLS, tool_choice="auto",
                                              temperature=0, parallel_tool_calls=True)
    assert len(r.choices[0].message.tool_calls) == 2
    # Forcing a call needs constrained decoding of the call: refused, not ignored.
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        err = assert_openai_error(server.http.post("/v1/chat/completions", json={
            "messages": ASK, "tools": WEATHER_TOOLS, "tool_choice": choice}))
        assert err["param"] == "tool_choice" and "not supported" in err["message"]
    strict = [{"type": "function", "function": {**WEATHER_TOOLS[0]["function"], "strict": True}}]
    err = assert_openai_error(server.http.post("/v1/chat/completions", json={"messages": ASK, "tools": strict}))
    assert err["param"] == "tools[0].function.strict"
    err = assert_openai_error(server.http.post("/v1/chat/completions", json={
        "messages": ASK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}))
    assert err["param"] == "tools[0].function.name"


def test_tool_results_round_trip(server: Server) -> None:
    first = server.client.chat.completions.create(model="scripted", messages=ASK, tools=WEATHER_TOOLS, temperature=0)
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"}
               for c in message.tool_calls]
    history = ASK + [message.model_dump(exclude_none=True)] + results
    r = server.client.chat.completions.create(model="scripted", messages=history, tools=WEATHER_TOOLS,
                                              temperature=0, max_tokens=1)
    # The template saw the calls (arguments as objects) and the results, as Qwen3.5 expects them.
    rendered = [{"role": "assistant", "content": TOOL_TEXT, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": n, "arguments": a}}
        for c, (n, a) in zip(message.tool_calls, TOOL_CALLS)]}]
    text = server.tokenizer.apply_chat_template(ASK + rendered + results, tools=WEATHER_TOOLS,
                                                add_generation_prompt=True, tokenize=False)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in text
    assert "<tool_response>\nresult of get_time\n</tool_response>" in text
    assert r.usage.prompt_tokens == len(server.tokenizer.encode(text))
    bad = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}]}]
    err = assert_openai_error(server.http.post("/v1/chat/completions", json={"messages": bad, "tools": WEATHER_TOOLS}))
    assert err["param"] == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], tools=WEATHER_TOOLS)
