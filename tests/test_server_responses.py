"""OpenAI's Responses API (``POST /v1/responses``) end to end with the official `openai` client and
raw SSE, on the demo model's bf16 copy (conftest's demo_bf16; text: the same greedy text as the Chat
Completions route) and on a scripted model that writes tool calls (tests/scripted_model.py), with
requests shaped as Codex CLI sends them (written for these tests). Every answer is also checked
against the SDK's own pydantic types (Response, ResponseStreamEvent), which the client itself parses
leniently."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from scripted_model import scripted_model
from server_helpers import Server, assert_openai_error, running, wait_idle

from mtplx.api import encode_prompt
from mtplx.server.app import create_app

EVENT = TypeAdapter(ResponseStreamEvent)
ASK = "Write a function that adds two numbers."
SYSTEM = "You write Python."

# What a tool-calling Qwen writes: a sentence, a flat tool's call, a namespaced tool's call (by its
# flat name) and a freeform tool's call.
PATCH = "*** Begin Patch\n*** Add File: notes.txt\n+first line\n*** End Patch"
SCRIPT = [
    "Checking.",
    "\n\n<tool",
    "_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    "</function>\n</tool_call>\n<tool_call>\n<function=clock__now>\n<parameter=zone>\nEurope/Paris\n</parameter>\n"
    "</function>\n</tool",
    f"_call>\n<tool_call>\n<function=apply_patch>\n<parameter=input>\n{PATCH}\n</parameter>\n</function>\n",
    "</tool_call>",
]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
ZONE = {"type": "object", "properties": {"zone": {"type": "string"}}}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Forecast for a city", "strict": False,
     "parameters": WEATHER},
    {"type": "namespace", "name": "clock", "description": "Clock tools",
     "tools": [{"type": "function", "name": "now", "description": "The time in a zone", "parameters": ZONE}]},
    {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /(.|\\n)+/"}},
    {"type": "web_search"},
]
PATCH_PARAMS = {"type": "object", "properties": {"input": {"type": "string", "description": (
    "The tool's input, as free text. It must follow this lark grammar:\nstart: /(.|\\n)+/")}}, "required": ["input"]}
# The same tools as the template sees them (and as a Chat Completions request sends them).
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "clock__now", "description": "Clock tools\n\nThe time in a zone",
                                      "parameters": ZONE}},
    {"type": "function", "function": {"name": "apply_patch", "description": "Edit files with a patch",
                                      "parameters": PATCH_PARAMS}},
]
INSTRUCTIONS = "You are a careful assistant in a terminal."
DEVELOPER = "Ask before deleting files."
CONTEXT = "<env>cwd=/home/me/project</env>"
QUESTION = "What is the weather in Paris, and the time there?"


def codex_request(**over) -> dict:
    """A request shaped as Codex CLI sends one (its fields; the texts are this test's)."""
    body = {
        "model": "scripted", "instructions": INSTRUCTIONS,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": DEVELOPER}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": CONTEXT}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True, "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"], "store": False, "prompt_cache_key": "session-1",
        "client_metadata": {"session_id": "s-1"}, "stream": False,
    }
    body.update(over)
    return body


def sdk_kwargs(body: dict) -> dict:
    """A request body as openai.responses.create's arguments (fields the SDK does not type go in extra_body)."""
    body = dict(body)
    extra = {"client_metadata": body.pop("client_metadata")}
    return {**body, "extra_body": extra}


def chat_messages(history: list[dict] | None = None) -> list[dict]:
    """codex_request's conversation as Chat Completions messages: one system message first (Qwen's
    templates take no other), then the turns."""
    return [{"role": "system", "content": f"{INSTRUCTIONS}\n{DEVELOPER}"}, {"role": "user", "content": CONTEXT},
            {"role": "user", "content": QUESTION}] + (history or [])


def raw_events(s: Server, body: dict) -> tuple[list[str], list[dict]]:
    """(the raw SSE lines, the data payloads) of a streamed request."""
    with s.http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        lines = list(r.iter_lines())
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    kinds = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert kinds == [d["type"] for d in data]  # every data line follows its own event line
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    for d in data:
        EVENT.validate_python(d)  # the SDK's own event types
    return lines, data


@pytest.fixture(scope="module")
def demo_server(demo_bf16):
    model, tokenizer = demo_bf16
    app = create_app(model, tokenizer, served_model_names=["demo"], max_tokens_default=16)
    with running(app, model, tokenizer) as s:
        s.core = app.state.core
        yield s


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    model, tokenizer = scripted_model(tmp_path_factory.mktemp("scripted-responses"), SCRIPT)
    app = create_app(model, tokenizer, served_model_names=["scripted"], max_tokens_default=64)
    with running(app, model, tokenizer) as s:
        yield s


# -- text: the same answer as Chat Completions ---------------------------------------------------------

def test_greedy_text_equals_chat_completions(demo_server) -> None:
    s = demo_server
    chat = s.client.chat.completions.create(model="demo", messages=[{"role": "system", "content": SYSTEM},
                                                                    {"role": "user", "content": ASK}],
                                            max_tokens=6, temperature=0)
    expected = chat.choices[0].message.content
    r = s.client.responses.create(model="demo", instructions=SYSTEM, input=ASK, max_output_tokens=6, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "demo"
    assert r.output_text == expected and [i.type for i in r.output] == ["message"]
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")  # cut at 6 tokens
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    assert r.usage.total_tokens == r.usage.input_tokens + 6 and r.usage.output_tokens_details.reasoning_tokens == 0
    raw = s.http.post("/v1/responses", json={"model": "demo", "instructions": SYSTEM, "input": ASK,
                                             "max_output_tokens": 6, "temperature": 0}).json()
    Response.model_validate(raw)
    assert raw["mtplx"]["max_tokens"] == 6 and raw["output"][0]["status"] == "incomplete"

    # The same conversation as input items, streamed through the SDK: the same text.
    items = [{"role": "system", "content": SYSTEM},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]}]
    stream = s.client.responses.create(model="demo", input=items, max_output_tokens=6, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    final = events[-1].response
    assert final.output_text == expected and final.usage.output_tokens == 6 and final.status == "incomplete"
    # The same prompt again: the prompt cache served all of it but the last token.
    assert final.usage.input_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1


def test_effort_maps_to_thinking(demo_server) -> None:
    s = demo_server
    messages = [{"role": "user", "content": ASK}]
    off = len(encode_prompt(s.tokenizer, messages, enable_thinking=False))
    default = len(encode_prompt(s.tokenizer, messages))
    assert off != default
    for effort, n in [("minimal", off), ("none", off), ("high", default), (None, default)]:
        r = s.http.post("/v1/responses", json={"input": ASK, "max_output_tokens": 1, "reasoning": {"effort": effort}})
        assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == n, (effort, r.text)


def test_keepalive_comment(demo_server) -> None:
    # Whenever nothing came for keepalive_s (a long prefill), an SSE comment goes out; clients skip it.
    s = demo_server
    saved = s.core.keepalive_s
    s.core.keepalive_s = 0.001
    try:
        wait_idle(s)
        lines, data = raw_events(s, {"input": ASK, "max_output_tokens": 4, "temperature": 0})
    finally:
        s.core.keepalive_s = saved
    assert ": keep-alive" in lines
    assert [d["type"] for d in data][:2] == ["response.created", "response.in_progress"]
    assert data[-1]["type"] == "response.incomplete" and data[-1]["response"]["usage"]["output_tokens"] == 4


@pytest.mark.parametrize("body,param,says", [
    ({"input": ASK, "previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"input": ASK, "conversation": "conv_1"}, "conversation", "stores no responses"),
    ({"input": ASK, "background": True}, "background", "not supported"),
    ({"input": ASK, "include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"input": ASK, "tempurature": 0}, "tempurature", "Unrecognized request argument"),
    # (pydantic puts the item's type in the path: input[0].message.colour)
    ({"input": [{"role": "user", "content": ASK, "colour": "red"}]}, "input[0].message.colour", "Unrecognized"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]", "text only"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "item_reference"),
    ({"input": ASK, "max_output_tokens": -1}, "max_output_tokens", ""),
    ({"input": ASK, "tool_choice": "required"}, "tool_choice", "needs a function tool"),
    ({"input": ASK, "reasoning": {"effort": "extreme"}}, "reasoning.effort", ""),
])
def test_refusals_name_the_field(demo_server, body: dict, param: str, says: str) -> None:
    err = assert_openai_error(demo_server.http.post("/v1/responses", json=body))
    assert err["param"] == param and says in err["message"], err


def test_advisory_fields_accepted(demo_server) -> None:
    r = demo_server.http.post("/v1/responses", json={
        "input": ASK, "max_output_tokens": 1, "store": True, "metadata": {"k": "v"}, "user": "u", "truncation": "auto",
        "service_tier": "auto", "prompt_cache_retention": "24h", "safety_identifier": "x", "text": {"verbosity": "low"},
        "tools": [{"type": "web_search"}, {"type": "mcp", "server_label": "s", "server_url": "http://x"}],
        "top_k": 20, "min_p": 0.0, "seed": 1, "depth": "auto", "strict_greedy": False})
    assert r.status_code == 200, r.text
    assert r.json()["tools"][1]["server_label"] == "s"  # echoed as sent


def test_json_schema_text_format(demo_server) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = demo_server.http.post("/v1/responses", json={
        "input": "A number as JSON.", "max_output_tokens": 8, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "num", "schema": schema}}})
    assert r.status_code == 200, r.text
    text = r.json()["output"][0]["content"][0]["text"]
    # The same grammar as Chat Completions' response_format, and thinking off for it: the same text.
    chat = demo_server.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "A number as JSON."}], "max_tokens": 8, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "num", "schema": schema}}}).json()
    assert text == chat["choices"][0]["message"]["content"] and text.lstrip().startswith("{")
    bad = demo_server.http.post("/v1/responses", json={
        "input": ASK, "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}})
    assert assert_openai_error(bad)["param"]


# -- tools, as Codex sends them ------------------------------------------------------------------------

def _prompt_tokens(s: Server, messages: list[dict], tools: list[dict] | None) -> int:
    ids = s.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if isinstance(ids, dict) else ids)


def _check_calls(output: list) -> None:
    assert [i.type for i in output] == ["message", "function_call", "function_call", "custom_tool_call"]
    assert output[0].content[0].text == "Checking."
    weather, now, patch = output[1:]
    assert (weather.name, weather.namespace, json.loads(weather.arguments)) == (
        "get_weather", None, {"city": "Paris", "days": 3})  # days is 3, an integer, as the schema says
    # The namespaced tool: the model called clock__now; the client gets its own name and namespace.
    assert (now.name, now.namespace, json.loads(now.arguments)) == ("now", "clock", {"zone": "Europe/Paris"})
    assert (patch.name, patch.input) == ("apply_patch", PATCH)
    ids = [weather.call_id, now.call_id, patch.call_id]
    assert len(set(ids)) == 3 and all(i.startswith("call_") for i in ids)


def test_codex_shaped_request(tool_server) -> None:
    s = tool_server
    r = s.client.responses.create(**sdk_kwargs(codex_request()))
    assert r.status == "completed" and r.error is None
    _check_calls(r.output)
    # The prompt: one system prompt (instructions, then the developer message), the function tools
    # (the namespace's flattened, the freeform one as a one-string function), web_search left out.
    expected = _prompt_tokens(s, chat_messages(), CHAT_TOOLS)
    assert r.usage.input_tokens == expected
    text = s.tokenizer.apply_chat_template(chat_messages(), tools=CHAT_TOOLS, add_generation_prompt=True,
                                           tokenize=False)
    assert '"name": "clock__now"' in text and "web_search" not in text
    # The Chat Completions route, sent the same conversation, renders the same prompt.
    chat = s.client.chat.completions.create(model="scripted", messages=chat_messages(), tools=CHAT_TOOLS,
                                            max_tokens=1)
    assert chat.usage.prompt_tokens == expected
    raw = s.http.post("/v1/responses", json=codex_request()).json()
    Response.model_validate(raw)
    assert raw["tools"] == json.loads(json.dumps(TOOLS))  # echoed
    assert raw["output"][1]["id"].startswith("fc_") and raw["output"][1]["status"] == "completed"


def test_codex_shaped_request_streamed(tool_server) -> None:
    s = tool_server
    events = list(s.client.responses.create(**sdk_kwargs(codex_request(stream=True))))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        *["response.output_item.added", "response.function_call_arguments.delta",
          "response.function_call_arguments.done", "response.output_item.done"] * 2,
        "response.output_item.added", "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done", "response.output_item.done",
        "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, getattr(i, "arguments", None)) for i in added[1:3]] == [("function_call", "")] * 2
    assert added[2].namespace == "clock" and added[2].status == "in_progress"
    done = [e.item for e in events if e.type == "response.output_item.done"]
    _check_calls(done)
    final = events[-1].response
    _check_calls(final.output)
    assert final.usage.output_tokens == len(SCRIPT) + 1  # the script, then <|im_end|>
    # Each item's events carry its id and output index.
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert [(d.item_id, d.output_index) for d in deltas] == [(done[1].id, 1), (done[2].id, 2)]
    _, data = raw_events(s, codex_request())  # the same, checked against the SDK's event types
    assert data[-1]["response"]["output"] == json.loads(json.dumps(data[-1]["response"]["output"]))


def test_multi_turn_renders_as_chat_completions(tool_server) -> None:
    # Codex's second request: the first answer's items, the tools' outputs, then the next step.
    s = tool_server
    first = s.http.post("/v1/responses", json=codex_request()).json()["output"]
    message, weather, now, patch = first
    outputs = [
        {"type": "function_call_output", "call_id": weather["call_id"], "output": "Sunny, 21 C"},
        {"type": "function_call_output", "call_id": now["call_id"],
         "output": [{"type": "input_text", "text": "12:00"}, {"type": "input_text", "text": "CEST"}]},
        {"type": "custom_tool_call_output", "call_id": patch["call_id"], "output": "Done."},
    ]
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None}
    body = codex_request(max_output_tokens=1)
    body["input"] += [reasoning, message, weather, now, patch, *outputs]
    r = s.http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    calls = [("get_weather", weather), ("clock__now", now)]
    history = [{"role": "assistant", "content": "Checking.", "tool_calls": [
        *[{"id": c["call_id"], "type": "function", "function": {"name": n, "arguments": c["arguments"]}}
          for n, c in calls],
        {"id": patch["call_id"], "type": "function",
         "function": {"name": "apply_patch", "arguments": json.dumps({"input": PATCH})}}]},
        {"role": "tool", "tool_call_id": weather["call_id"], "content": "Sunny, 21 C"},
        {"role": "tool", "tool_call_id": now["call_id"], "content": "12:00\nCEST"},
        {"role": "tool", "tool_call_id": patch["call_id"], "content": "Done."}]
    chat = s.client.chat.completions.create(model="scripted", messages=chat_messages(history), tools=CHAT_TOOLS,
                                            max_tokens=1)
    assert r.json()["usage"]["input_tokens"] == chat.usage.prompt_tokens
    rendered = [{**history[0], "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in history[0]["tool_calls"]]}] + history[1:]
    text = s.tokenizer.apply_chat_template(chat_messages(rendered), tools=CHAT_TOOLS, add_generation_prompt=True,
                                           tokenize=False)
    assert "<function=clock__now>" in text and "<tool_response>\n12:00\nCEST\n</tool_response>" in text
    assert chat.usage.prompt_tokens == len(s.tokenizer.encode(text))
    # A developer message later in the conversation is put at the front of the next user turn.
    later = codex_request(max_output_tokens=1)
    later["input"] = later["input"][1:2] + [{"role": "developer", "content": DEVELOPER}] + later["input"][2:]
    expected = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": CONTEXT},
                {"role": "user", "content": f"{DEVELOPER}\n{QUESTION}"}]
    r = s.http.post("/v1/responses", json=later)
    assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == _prompt_tokens(s, expected, CHAT_TOOLS)


def test_tool_choice_and_tool_errors(tool_server) -> None:
    s = tool_server
    # "none": the model is not told about the tools, and its text is not parsed.
    r = s.http.post("/v1/responses", json=codex_request(tool_choice="none")).json()
    assert [i["type"] for i in r["output"]] == ["message"]
    assert r["output"][0]["content"][0]["text"].startswith("Checking.\n\n<tool_call>")
    assert r["usage"]["input_tokens"] == _prompt_tokens(s, chat_messages(), None)
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        err = assert_openai_error(s.http.post("/v1/responses", json=codex_request(tool_choice=choice)))
        assert err["param"] == "tool_choice" and "not supported" in err["message"]
    err = assert_openai_error(s.http.post("/v1/responses", json=codex_request(
        tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []})))
    assert err["param"] == "tool_choice" and "allowed_tools" in err["message"]
    strict = codex_request(tools=[{**TOOLS[0], "strict": True}])
    assert assert_openai_error(s.http.post("/v1/responses", json=strict))["param"] == "tools[0].strict"
    twice = codex_request(tools=[TOOLS[0], {**TOOLS[0], "description": "again"}])
    assert assert_openai_error(s.http.post("/v1/responses", json=twice))["param"] == "tools[1].name"
    bad = codex_request()
    bad["input"].append({"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{not json"})
    assert assert_openai_error(s.http.post("/v1/responses", json=bad))["param"] == "input[3].arguments"
    with pytest.raises(openai.BadRequestError):
        s.client.responses.create(model="scripted", input="x", previous_response_id="resp_1")
