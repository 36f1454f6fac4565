"""Issue 21's server rows, each a test that starts from its reproduction: schemas the grammar
cannot serve (rows 7-9, server and API alike), NaN options (12), a request that never finishes
arriving (16), absurd max_tokens (17), engine faults answered 500 and logged, tools with a
response_format, max_tokens with max_completion_tokens, and Anthropic's usage rule.

The server runs a real model (tests/scripted_model.py: a tiny Qwen3.5 with the demo's tokenizer
and Qwen3.5's chat template, fast on a CPU) behind a real uvicorn; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from scripted_model import scripted_model
from server_helpers import assert_anthropic_error, assert_openai_error, running, sse_events, wait_idle

import mtplx
from mtplx.cli.commands import cli
from mtplx.engine.constraints import Constraint, compile_format, grammar_for
from mtplx.engine.schema_limits import MAX_PATTERN_REPEAT, MAX_SCHEMA_DEPTH, nesting, pattern_repeat
from mtplx.errors import MtplxError
from mtplx.server.app import create_app
from mtplx.server.guards import MAX_JSON_DEPTH
from mtplx.server.http import deadline_protocol

ASK = [{"role": "user", "content": "Hello"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Each describes no value, or cannot be compiled before decoding: (schema, what the error says).
UNSERVABLE = [
    ({"$ref": "#"}, "describes no JSON value"),  # row 7
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "describes no JSON value"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "describes no JSON value"),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "describes no JSON value"),
    ({"enum": []}, "describes no JSON value"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "describes no JSON value"),
    (nested(300), f"at most {MAX_SCHEMA_DEPTH}"),  # row 8 (the server's body limit answers first)
    (nested(40), f"at most {MAX_SCHEMA_DEPTH}"),  # within the body limit, past the schema's
    ({"type": "string", "pattern": "^(a|a)*b{1000000}$"}, f"at most {MAX_PATTERN_REPEAT}"),  # row 9
    ({"type": "object", "patternProperties": {"^(x{100}){100}$": {"type": "integer"}}}, f"at most {MAX_PATTERN_REPEAT}"),
]
# Recursive or bounded schemas that do have values: never refused.
SERVABLE = [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},
    {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]},
    {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                        "required": ["kids"]}}, "$ref": "#/$defs/node"},
    {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
    {"type": "object", "required": ["a1"], "patternProperties": {"^a[0-9]$": {"type": "integer"}},
     "additionalProperties": False},
    nested(MAX_SCHEMA_DEPTH // 2 - 1),
]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return scripted_model(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def server(scripted):
    model, tokenizer = scripted
    app = create_app(model, tokenizer, served_model_names=["scripted"], prompt_cache_bytes=1 << 28)
    with running(app, model, tokenizer, http=deadline_protocol(header_timeout=0.5, body_timeout=0.5)) as s:
        yield s


# -- rows 7, 8, 9: schemas refused before the first token, the API and the server alike --------

@pytest.mark.parametrize("schema, says", UNSERVABLE)
def test_unservable_schema_is_one_mtplx_error_in_the_api(scripted, schema, says):
    model, tokenizer = scripted
    with pytest.raises(MtplxError) as e:
        mtplx.generate(model, tokenizer, ASK, max_tokens=4, response_format=fmt(schema))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("schema, says", UNSERVABLE)
def test_unservable_schema_is_a_400_before_generating(server, schema, says, stream):
    body = {"messages": ASK, "response_format": fmt(schema), "stream": stream}
    err = assert_openai_error(server.http.post("/v1/chat/completions", json=body))
    assert "\n" not in err["message"]
    if nesting(body) > MAX_JSON_DEPTH:
        assert f"at most {MAX_JSON_DEPTH}" in err["message"] and err["code"] == "invalid_body"
    else:
        assert says in err["message"] and err["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("levels", [900, 100_000])
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", lambda d: {"messages": ASK, "chat_template_kwargs": {"x": d}}),
    ("/v1/chat/completions", lambda d: {"messages": ASK, "metadata": {"x": d}}),
    ("/v1/chat/completions", lambda d: {"messages": ASK, "tools": [{**TOOL, "function": {
        "name": "f", "parameters": {"type": "object", "default": d}}}]}),
    ("/v1/messages", lambda d: {"model": "scripted", "max_tokens": 2, "messages": ASK,
                                "tools": [{"name": "f", "input_schema": {"x": d}}]}),
])
def test_a_deeply_nested_body_is_one_400_anywhere(server, path, body, levels):
    """The class of row 8: any field nested past the limit (a RecursionError in pydantic, the
    chat template or jsonschema otherwise), refused before a route sees it."""
    content = json.dumps(body("DEEP")).replace('"DEEP"', "[" * levels + "]" * levels)
    r = server.http.post(path, content=content, headers={"content-type": "application/json"})
    check = assert_anthropic_error if path == "/v1/messages" else assert_openai_error
    assert f"at most {MAX_JSON_DEPTH}" in check(r)["message"]
    assert server.http.get("/health").status_code == 200


@pytest.mark.parametrize("schema", SERVABLE)
def test_schemas_with_values_still_compile(scripted, schema):
    model, tokenizer = scripted
    grammar = compile_format(fmt(schema))
    assert grammar_for(grammar) == grammar.text  # a compiled format is used as it is
    Constraint.from_response_format(grammar, tokenizer, model.vocab_size, tokenizer.eos_token_ids)


def test_pattern_repeat_bounds_counted_repetitions():
    assert pattern_repeat(r"^\d{4}-\d{2}$") == 4 + 1 + 2 + 0
    assert pattern_repeat("^(ab{3}){10}$") == 40
    assert pattern_repeat("[a-z]{1,64}|x{2,}") == 66
    assert pattern_repeat(r"a\{5}") == 4  # an escaped brace is a literal
    assert pattern_repeat("^(a|a)*b{1000000}$") > MAX_PATTERN_REPEAT


# -- row 12: NaN options refused by the option itself, before anything loads ---------------------

@pytest.mark.parametrize("args", [["serve", "--max-body-mb", "nan"], ["serve", "--prompt-cache-gb", "nan"],
                                  ["serve", "--max-body-mb", "inf"], ["serve", "--distributed-timeout", "nan"]])
def test_nan_options_are_refused_before_loading(args):
    r = CliRunner().invoke(cli, [*args, "--model", "/nonexistent/model"])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{args[1]}'" in r.output and "/nonexistent" not in r.output
    assert "Traceback" not in r.output and "bug" not in r.output


# -- row 16: a request that never finishes arriving ---------------------------------------------

@pytest.mark.parametrize("partial", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never end
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n{\"messages\"",  # the body never ends
])
def test_a_request_that_never_arrives_is_closed_with_408(server, partial):
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(partial)
        t0 = time.monotonic()
        received = b""
        while chunk := sock.recv(4096):  # the server closes the connection: recv returns b""
            received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received
    assert time.monotonic() - t0 < 8  # the 0.5 s deadline, not the 10 s recv timeout
    assert server.http.get("/health").status_code == 200  # and the server goes on


def test_a_kept_alive_connection_gets_a_new_header_deadline(server):
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the second request stalls
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert b"HTTP/1.1 408" in first + received, received


# -- row 17: absurd max_tokens -------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [10**30, 2**63])
def test_huge_max_tokens_is_capped_at_the_context_left(server, max_tokens):
    model = server.model
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = body["usage"]["prompt_tokens"]
    assert body["mtplx"]["max_tokens"] == model.max_context - prompt
    assert body["usage"]["completion_tokens"] <= model.max_context - prompt
    r = server.http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    assert r.json()["mtplx"]["max_tokens"] == model.max_context - r.json()["usage"]["prompt_tokens"]
    r = server.http.post("/v1/messages", json={"model": "scripted", "messages": ASK, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mtplx"]["max_tokens"] == model.max_context - body["usage"]["input_tokens"] \
        - body["usage"]["cache_read_input_tokens"]


def test_max_tokens_and_max_completion_tokens(server):
    """OpenAI: max_completion_tokens supersedes the deprecated max_tokens; both, disagreeing, is a 400."""
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3, "max_completion_tokens": 2})
    assert "disagree" in assert_openai_error(r)["message"]
    for extra in ({"max_tokens": 2, "max_completion_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 2}):
        r = server.http.post("/v1/chat/completions", json={"messages": ASK, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["mtplx"]["max_tokens"] == 2


# -- tools and response_format ------------------------------------------------------------------

def test_tools_with_a_response_format_are_refused(server):
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "tools": [TOOL],
                                                       "response_format": {"type": "json_object"}})
    assert assert_openai_error(r)["param"] == "response_format"
    # tool_choice "none" keeps the tools out of the prompt: no conflict; a text format neither.
    for extra in ({"tool_choice": "none", "response_format": {"type": "json_object"}},
                  {"response_format": {"type": "text"}}):
        r = server.http.post("/v1/chat/completions", json={"messages": ASK, "tools": [TOOL], "max_tokens": 2, **extra})
        assert r.status_code == 200, r.text


# -- an engine fault is a logged 500, not a client 400 ------------------------------------------

@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """The scripted model with an lm_head one column too wide: every forward pass fails with
    MLX's own ValueError about shapes, which is the server's fault, not the request's."""
    model, tokenizer = scripted_model(tmp_path_factory.mktemp("broken"))
    lm_head = model.trunk.model.language_model.lm_head
    lm_head.weight = mx.zeros((lm_head.weight.shape[0], lm_head.weight.shape[1] + 1))
    app = create_app(model, tokenizer, served_model_names=["broken"], prompt_cache_bytes=0,
                     depth=2)  # a pinned depth: "auto" would measure step costs, and fail, at start-up
    with running(app, model, tokenizer) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_value_error_is_a_logged_500(broken_server, caplog, stream):
    with caplog.at_level(logging.ERROR, logger="mtplx.server"):
        r = broken_server.http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, "stream": stream})
        wait_idle(broken_server)
    if stream:
        assert r.status_code == 200
        errors = [e for e in sse_events(r.text.splitlines()) if isinstance(e, dict) and "error" in e]
        assert errors and errors[0]["error"]["type"] == "server_error", r.text
        message = errors[0]["error"]["message"]
    else:
        message = assert_openai_error(r, 500, "server_error")["message"]
    assert "ValueError" in message and "server log" in message
    logged = [rec for rec in caplog.records if rec.name == "mtplx.server" and rec.exc_info]
    assert logged and logged[-1].exc_info[0] is ValueError, caplog.text
    r = broken_server.http.post("/v1/messages", json={"model": "broken", "messages": ASK, "max_tokens": 2})
    assert_anthropic_error(r, 500, "api_error")


# -- Anthropic usage: one rule for message_start, message_delta and the whole message ----------

def test_anthropic_input_tokens_exclude_cached_tokens_everywhere(server):
    body = {"model": "scripted", "messages": ASK, "max_tokens": 4, "temperature": 0}
    first = server.http.post("/v1/messages", json=body)
    assert first.status_code == 200, first.text
    wait_idle(server)
    r = server.http.post("/v1/messages", json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    wait_idle(server)
    whole = server.http.post("/v1/messages", json=body).json()["usage"]
    prompt = first.json()["usage"]["input_tokens"] + first.json()["usage"]["cache_read_input_tokens"]
    assert delta["cache_read_input_tokens"] > 0, "the second turn must hit the prompt cache"
    for usage in (start, delta, whole):
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt, usage
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == \
        (delta["input_tokens"], delta["cache_read_input_tokens"])


def test_readme_documents_the_request_deadlines():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()  # moved from the README
    assert "408" in readme and "header" in readme.lower()


def test_a_response_format_is_checked_and_compiled_once(server, monkeypatch):
    """Once while the request is validated; the engine thread gets the compiled grammar."""
    from mtplx.engine import constraints

    calls = []
    real = constraints.schema_limits.check
    monkeypatch.setattr(constraints.schema_limits, "check", lambda *a: (calls.append(1), real(*a))[1])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    r = server.http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3, "response_format": fmt(schema)})
    assert r.status_code == 200, r.text
    assert len(calls) == 1
