"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``,
mapped onto the same request core, chat template and tool machinery as the OpenAI routes.

A Messages request becomes the messages a chat template reads: ``system`` first, text blocks
joined, ``tool_use`` blocks as the assistant's ``tool_calls``, ``tool_result`` blocks as ``tool``
messages; ``thinking`` turns the template's ``enable_thinking`` on or off. The answer's tool
calls (parsed as for OpenAI) come back as ``tool_use`` blocks. Streaming follows Anthropic's
event sequence: message_start, then per block content_block_start / _delta / _stop, then
message_delta (stop_reason, usage) and message_stop. Errors have Anthropic's shape
(``{"type": "error", "error": {"type", "message"}}``; see :func:`mtplx.server.http_errors.anthropic_body`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mtplx.server.anthropic_requests import (ADVISORY, CountTokensRequest, Message, MessagesRequest, PromptRequest,
                                             RedactedThinkingBlock, TextBlock, ThinkingBlock, ToolReferenceBlock,
                                             ToolUseBlock)
from mtplx.server.core import Core, Generation, SystemContext, checked_generation, mtplx_stats
from mtplx.server.http_errors import APIError, anthropic_body, unsupported
from mtplx.server.queue import Job, JobStream
from mtplx.server.tools import Answer, ToolCall, ToolFormat, check_tools, tool_format

MIN_THINKING_BUDGET = 1024  # Anthropic's own floor for budget_tokens


# -- request -> template -----------------------------------------------------------------------

def _text(blocks: str | list[Any] | None, param: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    texts = []
    for i, b in enumerate(blocks):
        if isinstance(b, ToolReferenceBlock):
            texts.append(f"Tool loaded: {b.tool_name}")
            continue
        if b.citations:
            raise unsupported(f"{param}[{i}].citations", "mtplx does not cite documents")
        texts.append(b.text)
    return "\n".join(texts)


# Claude Code (2.1.36 and later) opens its system prompt with a line of billing metadata whose
# `cch` value changes on every request. It says nothing to the model, and left in it would make
# every turn's prompt differ from the previous one at its first tokens: the prompt cache would
# miss and the whole session be prefilled again each turn. Dropped, as vLLM, vllm-mlx and ollama do.
BILLING_HEADER = "x-anthropic-billing-header:"


def _without_billing(text: str) -> str:
    if BILLING_HEADER not in text:
        return text
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith(BILLING_HEADER)).lstrip("\n")


def _system_prompt(system: str | list[TextBlock] | None) -> str:
    if isinstance(system, list):
        system = [b for b in system if not b.text.lstrip().startswith(BILLING_HEADER)]
    return _without_billing(_text(system, "system"))


def _system_text(m: Message, param: str) -> str:
    if isinstance(m.content, str):
        return m.content
    for j, b in enumerate(m.content):
        if not isinstance(b, TextBlock):
            raise APIError(400, f"'{param}[{j}]': a system message holds text blocks only.", param=f"{param}[{j}]")
    return _text(m.content, param)


def _template_messages(body: PromptRequest, fmt: ToolFormat | None) -> list[dict[str, Any]]:
    """Anthropic's messages -> the chat template's (OpenAI-like) messages.

    A ``system`` message inside ``messages`` is system context at its place
    (:class:`~mtplx.server.core.SystemContext` places it as Qwen's templates take it)."""
    out: list[dict[str, Any]] = []
    context = SystemContext(_system_prompt(body.system))
    for i, m in enumerate(body.messages):
        param = f"messages[{i}].content"
        if m.role == "system":
            context.add(_system_text(m, param), out)
            continue
        if isinstance(m.content, str):
            texts, calls, reasoning, results = [m.content], [], [], []
        else:
            texts, calls, reasoning, results = _blocks(m, param, fmt)
        out.extend(results)
        if m.role == "user":
            texts = context.take() + texts
        message: dict[str, Any] = {"role": m.role, "content": "\n".join(texts)}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = "\n".join(reasoning)
        if texts or calls or reasoning:
            out.append(message)
    if not out:
        raise APIError(400, "'messages' needs at least one user or assistant message; system context alone "
                            "asks nothing.", param="messages")
    return context.close(out)


def _blocks(m: Message, param: str, fmt: ToolFormat | None) -> tuple[list[str], list[dict[str, Any]], list[str],
                                                                        list[dict[str, Any]]]:
    """One message's blocks -> (texts, tool calls, reasoning, tool-result messages)."""
    texts, calls, reasoning, results = [], [], [], []
    for j, b in enumerate(m.content):
        where = f"{param}[{j}]"
        if isinstance(b, TextBlock):
            texts.append(_text([b], param))
        elif isinstance(b, (ThinkingBlock, RedactedThinkingBlock)):
            if m.role != "assistant":
                raise APIError(400, f"'{where}': thinking blocks belong to assistant messages.", param=where)
            if isinstance(b, ThinkingBlock):  # redacted thinking is another model's ciphertext: dropped
                reasoning.append(b.thinking)
        elif fmt is None:
            raise unsupported(where, "this model's chat template does not render tool use or tool results")
        elif isinstance(b, ToolUseBlock):
            if m.role != "assistant":
                raise APIError(400, f"'{where}': tool_use blocks belong to assistant messages.", param=where)
            calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
        else:  # a tool result answers the previous assistant turn: a message of its own
            if m.role != "user":
                raise APIError(400, f"'{where}': tool_result blocks belong to user messages.", param=where)
            result = _text(b.content, f"{where}.content")
            results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {result}" if b.is_error else result})
    return texts, calls, reasoning, results


def _tools(body: PromptRequest, fmt: ToolFormat | None) -> list[dict[str, Any]] | None:
    """The tools in the form chat templates and tool parsers read (OpenAI's)."""
    choice = body.tool_choice.type if body.tool_choice else "auto"
    # Anthropic's server tools (web search, code execution, ...) run on Anthropic's servers; a
    # local server cannot run them, so the model is not offered them (docs/agents.md says so).
    tools = [t for t in body.tools or [] if t.is_client_tool]
    if not tools or choice == "none":
        return None
    check_tools(fmt, forced=choice in ("any", "tool"),
                strict=[f"tools[{i}].strict" for i, t in enumerate(body.tools or []) if t.strict],
                response_format=False)
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in tools]


def _thinking(body: PromptRequest, max_tokens: int | None) -> dict[str, Any]:
    t = body.thinking
    if t is None:
        return {}  # the template's default
    if t.type == "enabled":
        if t.budget_tokens is None:
            raise APIError(400, "Missing required parameter: 'thinking.budget_tokens'.", param="thinking.budget_tokens")
        if t.budget_tokens < MIN_THINKING_BUDGET or (max_tokens is not None and t.budget_tokens >= max_tokens):
            raise APIError(400, f"'thinking.budget_tokens' must be at least {MIN_THINKING_BUDGET} and less than "
                                "max_tokens.", param="thinking.budget_tokens")
    return {"enable_thinking": t.type != "disabled"}


def _advisory(body: PromptRequest) -> list[str]:
    """The advisory fields a request set (ADVISORY), for the server's log."""
    seen = [name for name in ("metadata", "service_tier", "container", "inference_geo", "context_management")
            if getattr(body, name, None) is not None]
    if body.output_config and body.output_config.effort is not None:
        seen.append("output_config.effort")
    if body.thinking and body.thinking.display is not None:
        seen.append("thinking.display")
    if body.tools and any(t.defer_loading for t in body.tools):
        seen.append("defer_loading")
    if body.tools and any(t.input_examples for t in body.tools):
        seen.append("input_examples")
    return seen


def _output_format(body: MessagesRequest) -> dict[str, Any] | None:
    """``output_config.format`` in the shape :meth:`Core.compile_format` reads (OpenAI's)."""
    fmt = body.output_config.format if body.output_config else None
    if fmt is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}


# -- the routes --------------------------------------------------------------------------------

def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name,
            "input": call.arguments}


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage, one rule for message_start, message_delta and the whole message (as
    Anthropic's API counts): ``input_tokens`` counts the prompt tokens prefilled, excluding
    ``cache_read_input_tokens``, those a prompt cache served (their sum is the prompt)."""
    return {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output_tokens}


def _stop_reason(answer: Answer, last: Any) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished generation, from its last chunk."""
    if last.finish_reason == "length":
        return "max_tokens", None
    if answer.called:
        return "tool_use", None
    if last.stop_sequence is not None:
        return "stop_sequence", last.stop_sequence
    return "end_turn", None


class AnthropicRoutes:
    """The Messages routes over one :class:`Core`."""

    def __init__(self, core: Core):
        self.core = core
        self.fmt = tool_format(core.tokenizer)

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/messages", self.messages, methods=["POST"])
        router.add_api_route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])
        return router

    async def messages(self, body: MessagesRequest, request: Request) -> Response:
        core = self.core
        model, g, answer = await self.prepare(body)
        job = core.submit(g)
        mid = f"msg_{uuid.uuid4().hex}"
        if body.stream:
            start = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                     "stop_reason": None, "stop_sequence": None}
            return JobStream(self.stream(job, answer, message=start), core.scheduler, job)
        out = await core.collect(request, job)
        content: list[dict[str, Any]] = []
        for piece in answer.feed(out.text, final=True):
            if isinstance(piece, ToolCall):
                content.append(_tool_use(piece))
            elif content and content[-1]["type"] == "text":
                content[-1]["text"] += piece
            else:
                content.append({"type": "text", "text": piece})
        reason, sequence = _stop_reason(answer, out.last)
        return JSONResponse({
            "id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content or [{"type": "text", "text": ""}], "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(len(g.ids), out.last.cached_tokens, out.last.generation_tokens),
            "mtplx": mtplx_stats(out.last, job),
        })

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, int]:
        self.core.resolve_model(body.model)
        ids, _ = await self.core.encode_chat(_template_messages(body, self.fmt), tools=_tools(body, self.fmt),
                                             template_kwargs=_thinking(body, None))
        return {"input_tokens": len(ids)}

    async def prepare(self, body: MessagesRequest) -> tuple[str, Generation, Answer]:
        core, fmt = self.core, self.fmt
        model = core.resolve_model(body.model)
        if body.mcp_servers:
            raise unsupported("mcp_servers", "mtplx connects to no MCP server; the client runs its tools")
        core.note_advisory(_advisory(body), ADVISORY)
        g = checked_generation(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, min_p=body.min_p, seed=body.seed, depth=body.depth,
                               stop=list(body.stop_sequences or []), strict_greedy=body.strict_greedy,
                               lookup=body.lookup)
        tools = _tools(body, fmt)
        g.grammar = await core.compile_format(_output_format(body))
        if g.grammar is not None and tools:
            raise APIError(400, "'output_config.format' and tools cannot be combined: the answer is either JSON "
                                "of the schema or free text with tool calls.", param="output_config.format")
        g.ids, g.boundaries = await core.encode_chat(_template_messages(body, fmt), tools=tools,
                                                     template_kwargs=_thinking(body, body.max_tokens))
        return model, g, Answer(fmt if tools else None, tools)

    async def stream(self, job: Job, answer: Answer, *, message: dict[str, Any]) -> AsyncIterator[str]:
        index, open_text, started = 0, False, False
        last = None
        try:
            # message_start waits for the first step: how many prompt tokens a prompt cache
            # served is known only once the engine has looked (Anthropic sends it after prefill too).
            async for r in self.core.steps(job, keepalive=True):
                if r is None:  # nothing for a while (a long prefill): keep the client's idle timer fed
                    if not started:  # the prompt cache's share is not known yet; message_delta gives it
                        message["usage"] = _usage(len(job.ids), 0, 0)
                        yield _event("message_start", {"message": message})
                        started = True
                    yield _event("ping", {})
                    continue
                if not started:
                    message["usage"] = _usage(len(job.ids), r.cached_tokens, 0)
                    yield _event("message_start", {"message": message})
                    started = True
                last = r
                for piece in answer.feed(r.text, final=bool(r.finish_reason)):
                    if isinstance(piece, str):
                        if not open_text:
                            yield _event("content_block_start", {"index": index,
                                                                 "content_block": {"type": "text", "text": ""}})
                            open_text = True
                        yield _event("content_block_delta", {"index": index,
                                                             "delta": {"type": "text_delta", "text": piece}})
                        continue
                    if open_text:
                        yield _event("content_block_stop", {"index": index})
                        index, open_text = index + 1, False
                    block = _tool_use(piece)
                    yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                    yield _event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": piece.arguments_json}})
                    yield _event("content_block_stop", {"index": index})
                    index += 1
            if not open_text and index == 0:  # nothing at all: one empty text block
                yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                open_text = True
            if open_text:
                yield _event("content_block_stop", {"index": index})
            reason, sequence = _stop_reason(answer, last)
            yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                           "usage": _usage(len(job.ids), last.cached_tokens, last.generation_tokens),
                                           "mtplx": mtplx_stats(last, job)})
            yield _event("message_stop", {})
        except APIError as e:
            yield f"event: error\ndata: {json.dumps(anthropic_body(e))}\n\n"


def anthropic_routes(core: Core) -> APIRouter:
    return AnthropicRoutes(core).router()
