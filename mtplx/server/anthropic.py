"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``,
mapped onto the same request core, chat template and tool machinery as the OpenAI routes.

A Messages request becomes the messages a chat template reads: ``system`` first, text blocks
joined, ``tool_use`` blocks as the assistant's ``tool_calls``, ``tool_result`` blocks as ``tool``
messages; ``thinking`` turns the template's ``enable_thinking`` on or off. The answer's tool
calls (parsed as for OpenAI) come back as ``tool_use`` blocks. Streaming follows Anthropic's
event sequence: message_start, then per block content_block_start / _delta / _stop, then
message_delta (stop_reason, usage) and message_stop. Errors have Anthropic's shape
(``{"type": "error", "error": {"type", "message"}}``; see :func:`mtplx.server.errors.anthropic_body`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mtplx.server.anthropic_requests import (CountTokensRequest, MessagesRequest, PromptRequest, TextBlock,
                                             ThinkingBlock, ToolUseBlock)
from mtplx.server.core import Core, Generation, checked_generation, mtplx_stats
from mtplx.server.errors import APIError, anthropic_body, unsupported
from mtplx.server.queue import Job, JobStream
from mtplx.server.tools import Answer, ToolCall, ToolFormat, check_tools, tool_format

MIN_THINKING_BUDGET = 1024  # Anthropic's own floor for budget_tokens


# -- request -> template -----------------------------------------------------------------------

def _text(blocks: str | list[TextBlock] | None, param: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    for i, b in enumerate(blocks):
        if b.citations:
            raise unsupported(f"{param}[{i}].citations", "mtplx does not cite documents")
    return "\n".join(b.text for b in blocks)


def _template_messages(body: PromptRequest, fmt: ToolFormat | None) -> list[dict[str, Any]]:
    """Anthropic's messages -> the chat template's (OpenAI-like) messages."""
    out: list[dict[str, Any]] = []
    system = _text(body.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        param = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls, reasoning = [], [], []
        for j, b in enumerate(m.content):
            where = f"{param}[{j}]"
            if isinstance(b, TextBlock):
                texts.append(_text([b], param))
            elif isinstance(b, ThinkingBlock):
                if m.role != "assistant":
                    raise APIError(400, f"'{where}': thinking blocks belong to assistant messages.", param=where)
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
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {result}" if b.is_error else result})
        message: dict[str, Any] = {"role": m.role, "content": "\n".join(texts)}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = "\n".join(reasoning)
        if texts or calls or reasoning:
            out.append(message)
    return out


def _tools(body: PromptRequest, fmt: ToolFormat | None) -> list[dict[str, Any]] | None:
    """The tools in the form chat templates and tool parsers read (OpenAI's)."""
    choice = body.tool_choice.type if body.tool_choice else "auto"
    if not body.tools or choice == "none":
        return None
    check_tools(fmt, forced=choice in ("any", "tool"),
                strict=[f"tools[{i}].strict" for i, t in enumerate(body.tools) if t.strict], response_format=False)
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in body.tools]


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
        g = checked_generation(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, min_p=body.min_p, seed=body.seed, depth=body.depth,
                               stop=list(body.stop_sequences or []), strict_greedy=body.strict_greedy)
        tools = _tools(body, fmt)
        g.ids, g.boundaries = await core.encode_chat(_template_messages(body, fmt), tools=tools,
                                                     template_kwargs=_thinking(body, body.max_tokens))
        return model, g, Answer(fmt if tools else None, tools)

    async def stream(self, job: Job, answer: Answer, *, message: dict[str, Any]) -> AsyncIterator[str]:
        index, open_text = 0, False
        last = None
        try:
            # message_start waits for the first step: how many prompt tokens a prompt cache
            # served is known only once the engine has looked (Anthropic sends it after prefill too).
            async for r in self.core.steps(job):
                if last is None:
                    message["usage"] = _usage(len(job.ids), r.cached_tokens, 0)
                    yield _event("message_start", {"message": message})
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
