"""Coding agents' requests, as they send them: Claude Code's Messages requests (a system message
inside the conversation, deferred tools, context management, effort, adaptive thinking, server
tools, its own model names, a 32,000-token max_tokens) and the keep-alives that stop a client's
idle timeout from firing during a long prefill. The request texts are written for these tests;
the shapes follow what the agents send (docs/agents.md)."""

from __future__ import annotations

import json

import anthropic
import pytest
from scripted_model import TOOL_CALLS, TOOL_TEXT, scripted_model
from server_helpers import TIMEOUT, running

from mtplx.server.app import create_app

TOOLS = [
    {"name": "read_file", "description": "Read a file of the project.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
     "cache_control": {"type": "ephemeral"}},
    {"name": "get_weather", "description": "Forecast for a city", "defer_loading": True,
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
     "input_examples": [{"city": "Oslo", "days": 2}]},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}},
     "defer_loading": True},
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
]
CLIENT_TOOLS = [t for t in TOOLS if "type" not in t]
NOTE = "Working directory: /home/dev/project. Branch: main, clean."
# A request of Claude Code's shape: every field it sends that Anthropic's API defines.
AGENT = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 32000,
    "system": [{"type": "text", "text": "You are a careful coding assistant.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": NOTE},
    ],
    "tools": TOOLS,
    "tool_choice": {"type": "auto"},
    "thinking": {"type": "adaptive", "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "metadata": {"user_id": "user-1234"},
    "temperature": 1,
}
BETAS = {"anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27,effort-2025-11-24"}


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    model, tokenizer = scripted_model(tmp_path_factory.mktemp("scripted"))
    app = create_app(model, tokenizer, served_model_names=["scripted", "claude-*"])
    with running(app, model, tokenizer) as s:
        s.core = app.state.core
        s.anthropic = anthropic.Anthropic(base_url=s.base, api_key="unused", timeout=TIMEOUT, max_retries=0)
        yield s
        s.anthropic.close()


def _template_ids(s, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    openai_tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                      "parameters": t["input_schema"]}} for t in tools or []]
    ids = s.tokenizer.apply_chat_template(messages, tools=openai_tools or None, add_generation_prompt=True,
                                          tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def test_claude_code_request_is_served(agent_server) -> None:
    s = agent_server
    r = s.http.post("/v1/messages", json=AGENT, headers=BETAS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "scripted" and body["stop_reason"] == "tool_use"
    assert [(b["name"], b["input"]) for b in body["content"] if b["type"] == "tool_use"] == TOOL_CALLS
    # max_tokens 32,000 is admitted and capped at the context the prompt leaves.
    assert body["mtplx"]["max_tokens"] == s.model.max_context - (body["usage"]["input_tokens"]
                                                                 + body["usage"]["cache_read_input_tokens"])

    # The same through the official client, streamed.
    known = ("model", "max_tokens", "system", "messages", "tools", "tool_choice", "metadata")
    with s.anthropic.messages.stream(**{k: AGENT[k] for k in known}, extra_headers=BETAS,
                                     extra_body={k: v for k, v in AGENT.items() if k not in known}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].text == TOOL_TEXT
    assert [(b.name, b.input) for b in final.content[1:]] == TOOL_CALLS


def test_the_prompt_the_model_reads(agent_server) -> None:
    """The system message inside the conversation is read where the client put it (at the front of
    the next user turn, or as one of its own at the end), every client tool is rendered, the server
    tool is not."""
    s = agent_server
    count = {k: AGENT[k] for k in ("model", "system", "messages", "tools", "thinking", "context_management",
                                   "output_config")}
    n = s.http.post("/v1/messages/count_tokens", json=count).json()["input_tokens"]
    system = {"role": "system", "content": "You are a careful coding assistant."}
    expected = [system, {"role": "user", "content": "What is the weather in Paris?"}, {"role": "user", "content": NOTE}]
    assert n == len(_template_ids(s, expected, CLIENT_TOOLS))

    later = dict(count, messages=[
        {"role": "system", "content": "Before anything: be brief."},  # before any turn: joins the system prompt
        {"role": "user", "content": "Read the readme."},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "I should read it.", "signature": "x"},
                                          {"type": "redacted_thinking", "data": "opaque"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                           "input": {"path": "README.md"}}]},
        {"role": "system", "content": [{"type": "text", "text": NOTE}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "# Project"},
                                                  {"type": "tool_reference", "tool_name": "get_time"}]},
                                     {"type": "text", "text": "Summarize it."}]},
    ])
    n = s.http.post("/v1/messages/count_tokens", json=later).json()["input_tokens"]
    expected = [{"role": "system", "content": "You are a careful coding assistant.\nBefore anything: be brief."},
                {"role": "user", "content": "Read the readme."},
                {"role": "assistant", "content": "", "reasoning_content": "I should read it.", "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "read_file", "arguments": {"path": "README.md"}}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "# Project\nTool loaded: get_time"},
                {"role": "user", "content": NOTE + "\nSummarize it."}]
    assert n == len(_template_ids(s, expected, CLIENT_TOOLS))


@pytest.mark.parametrize("change,param", [
    ({"contxt_management": {}}, "contxt_management"),  # a typo is still caught
    ({"tools": [{"name": "f", "input_shema": {}}]}, "input_shema"),  # on a client tool too
    ({"output_config": {"effort": "extreme"}}, "effort"),
    ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:1", "name": "x"}]}, "mcp_servers"),
    ({"messages": [{"role": "system", "content": NOTE}]}, "messages"),
    ({"model": "gpt-5"}, "ANTHROPIC_MODEL"),  # the 404 names the setting that fixes it
])
def test_what_is_still_refused(agent_server, change: dict, param: str) -> None:
    r = agent_server.http.post("/v1/messages", json={**AGENT, **change})
    assert r.status_code in (400, 404), r.text
    assert param in r.json()["error"]["message"]


def test_output_config_format_constrains_the_answer(tmp_path) -> None:
    from mtplx.server.anthropic import _output_format
    from mtplx.server.anthropic_requests import MessagesRequest

    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}],
                                           "output_config": {"format": {"type": "json_schema", "schema": {
                                               "type": "object", "properties": {"n": {"type": "integer"}}}}}})
    assert _output_format(body)["json_schema"]["schema"]["properties"] == {"n": {"type": "integer"}}


def _sse_events(s, path: str, body: dict) -> list[tuple[str | None, str]]:
    """(event name, data) of every SSE message of a streamed answer, comments included as (':', text)."""
    out, event = [], None
    with s.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(":"):
                out.append((":", line))
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, line[6:]))
                event = None
    return out


def test_streams_send_keepalives_while_the_server_works(agent_server) -> None:
    s = agent_server
    s.core.keepalive_s = 0.001  # every wait for a step is "long"
    try:
        events = _sse_events(s, "/v1/messages", {**AGENT, "stream": True})
        names = [e for e, _ in events]
        assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop"
        assert names.index("message_start") < names.index("ping")
        tool_uses = [json.loads(d)["content_block"]["name"] for e, d in events
                     if e == "content_block_start" and json.loads(d)["content_block"]["type"] == "tool_use"]
        assert tool_uses == [name for name, _ in TOOL_CALLS]
        # The usage message_delta reports is the whole prompt's, however message_start was sent early.
        delta = json.loads([d for e, d in events if e == "message_delta"][0])["usage"]
        assert delta["input_tokens"] + delta["cache_read_input_tokens"] > 100

        chat = {"model": "scripted", "stream": True, "max_tokens": 40,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
        events = _sse_events(s, "/v1/chat/completions", chat)
        deltas = [json.loads(d)["choices"][0]["delta"] for e, d in events if d != "[DONE]"]
        assert {"content": ""} in deltas[1:]  # a keep-alive after the role chunk
        text = "".join(d.get("content") or "" for d in deltas)
        assert text.startswith(TOOL_TEXT) and events[-1][1] == "[DONE]"
        # The official client reads through them.
        kept = s.client.chat.completions.create(**{k: v for k, v in chat.items() if k != "stream"}, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in kept if c.choices) == text
    finally:
        s.core.keepalive_s = 5.0


# Qwen Code and OpenCode speak OpenAI's Chat Completions: a request of their shape (a system
# prompt, function tools, streamed with usage), then the turn that sends the tool results back.
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                   "parameters": t["input_schema"]}} for t in CLIENT_TOOLS]


def test_chat_completions_agent_turns(agent_server) -> None:
    s = agent_server
    first = {"model": "scripted", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7,
             "top_p": 0.8, "max_tokens": 32000, "tools": OPENAI_TOOLS, "tool_choice": "auto",
             "messages": [{"role": "system", "content": "You are a careful coding assistant."},
                          {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}]}
    chunks = list(s.client.chat.completions.create(**first))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == TOOL_CALLS
    assert chunks[-1].usage.prompt_tokens > 100 and chunks[-2].choices[0].finish_reason == "tool_calls"

    second = dict(first, messages=first["messages"] + [
        {"role": "assistant", "content": TOOL_TEXT, "tool_calls": [
            {"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                           "arguments": tc.function.arguments}} for tc in calls]},
        *[{"role": "tool", "tool_call_id": tc.id, "content": f"{tc.function.name}: done"} for tc in calls],
    ])
    chunks = list(s.client.chat.completions.create(**second))
    usage = chunks[-1].usage
    # The second turn extends the first: the prompt cache serves what the first turn prefilled.
    assert usage.prompt_tokens_details.cached_tokens >= 0.5 * usage.prompt_tokens


def test_claude_code_billing_line_does_not_defeat_the_prompt_cache(agent_server) -> None:
    """Claude Code's first system block carries a per-request `cch` value: two turns that differ
    only there must still share their prefix in the prompt cache."""
    s = agent_server

    def turn(cch: str, messages: list[dict], system_as_blocks: bool) -> dict:
        billing = f"x-anthropic-billing-header: cc_version=2.1.40; cc_entrypoint=cli; cch={cch};"
        system = ([{"type": "text", "text": billing}, {"type": "text", "text": "You are a careful coding assistant."}]
                  if system_as_blocks else f"{billing}\nYou are a careful coding assistant.")
        r = s.http.post("/v1/messages", json={**AGENT, "system": system, "messages": messages, "max_tokens": 40})
        assert r.status_code == 200, r.text
        return r.json()

    for blocks in (True, False):
        ask = [{"role": "user", "content": f"What is the weather in {'Paris' if blocks else 'Rome'}?"}]
        first = turn("a1b2c", ask, blocks)
        calls = [b for b in first["content"] if b["type"] == "tool_use"]
        follow = ask + [{"role": "assistant", "content": first["content"]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c["id"], "content": "sunny"}
                                                     for c in calls]}]
        second = turn("f9e8d", follow, blocks)
        u1, u2 = first["usage"], second["usage"]
        assert u2["cache_read_input_tokens"] >= 0.9 * (u1["input_tokens"] + u1["cache_read_input_tokens"])
    n = s.http.post("/v1/messages/count_tokens", json={
        "model": "claude-haiku-4-5", "messages": ask,
        "system": "x-anthropic-billing-header: cch=1;\nYou are a careful coding assistant."}).json()["input_tokens"]
    assert n == len(_template_ids(s, [{"role": "system", "content": "You are a careful coding assistant."}, *ask]))
