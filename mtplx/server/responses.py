"""OpenAI's Responses API: ``POST /v1/responses``, the one route Codex CLI speaks, mapped onto the
same request core, chat template and tool machinery as the Chat Completions and Messages routes.

A Responses request becomes the messages a chat template reads: ``instructions`` and the system
and developer messages that come before the conversation form the system prompt (Qwen's templates
take a system message only first; a later one is put at the front of the next user turn, as the
Messages route does), ``function_call`` items become the assistant's ``tool_calls`` and
``function_call_output`` items ``tool`` messages. Tools in a ``namespace`` are flattened to
``<namespace>__<name>`` (the flat name Codex itself uses where a namespace cannot be kept), and a
call the model writes to one is answered with its own ``name`` and ``namespace``. A ``custom``
(freeform) tool is rendered as a function with one string parameter ``input`` and answered as a
``custom_tool_call``. Tools OpenAI's servers run (web search, ...) are left out of the prompt.

The answer is a Response object; streamed, the Responses event sequence (response.created and
response.in_progress at once, then per output item its added / delta / done events, then
response.completed or response.incomplete with usage), with an SSE comment as keep-alive while
nothing else is sent (a long prefill). The model's thinking stays in the message text, as on the
other routes. Errors have OpenAI's shape; one raised mid-stream is a response.failed event.
docs/responses.md lists every request field and what mtplx does with it.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mtplx.api import GenerationResponse
from mtplx.server.core import Core, Generation, SystemContext, checked_generation, mtplx_stats
from mtplx.server.http_errors import APIError, unsupported
from mtplx.server.queue import Job, JobStream
from mtplx.server.responses_requests import (ADVISORY, LOGPROBS_INCLUDE, CustomTool, CustomToolCallItem,
                                             CustomToolCallOutputItem, FunctionCallItem, FunctionCallOutputItem,
                                             FunctionTool, HostedTool, MediaPart, MessageItem, NamedToolChoice,
                                             NamespaceTool, OtherToolChoice, ReasoningItem, RefusalPart,
                                             ResponsesRequest)
from mtplx.server.tools import Answer, ToolCall, ToolFormat, check_tools, parse_arguments, tool_format

NAMESPACE_DELIMITER = "__"  # Codex's own (codex-rs ToolName::canonical_flat_name)


def flat_name(namespace: str | None, name: str) -> str:
    """The name a namespaced tool has in the prompt: ``ns__name``, stray underscores around the
    delimiter trimmed, as Codex flattens namespaces, so the model sees the names Codex would."""
    if namespace is None:
        return name
    return f"{namespace.rstrip('_')}{NAMESPACE_DELIMITER}{name.lstrip('_')}"


def thinking_for_effort(effort: str | None) -> dict[str, Any]:
    """A reasoning effort -> the chat template's thinking switch: "none" and "minimal" turn
    thinking off; any other effort leaves the template's default (Qwen's templates have a switch,
    not an effort dial)."""
    return {"enable_thinking": False} if effort in ("none", "minimal") else {}


# -- request -> template -----------------------------------------------------------------------

@dataclass(frozen=True)
class ToolName:
    """What the client calls a tool the prompt names by its flat name."""

    name: str
    namespace: str | None = None
    custom: bool = False


@dataclass
class Tools:
    """The request's tools as the template renders them (OpenAI's chat shape; None: no tools, no
    tool-call parsing) and the client's name of each."""

    rendered: list[dict[str, Any]] | None = None
    names: dict[str, ToolName] = field(default_factory=dict)

    def client_name(self, flat: str) -> ToolName:
        return self.names.get(flat, ToolName(flat))


def _custom_function(t: CustomTool, description: str | None) -> dict[str, Any]:
    what = "The tool's input, as free text."
    if t.format is not None and t.format.type == "grammar":
        what += f" It must follow this {t.format.syntax} grammar:\n{t.format.definition}"
    out: dict[str, Any] = {"name": t.name, "description": description, "parameters": {
        "type": "object", "properties": {"input": {"type": "string", "description": what}}, "required": ["input"]}}
    return {k: v for k, v in out.items() if v is not None}


def _tools(body: ResponsesRequest, fmt: ToolFormat | None, grammar: bool) -> Tools:
    choice = body.tool_choice
    if isinstance(choice, OtherToolChoice):
        raise unsupported("tool_choice", f"a tool_choice of type {choice.type!r} names tools mtplx does not run or "
                                         "restrict; use 'auto' or 'none'")
    out = Tools()
    functions: list[dict[str, Any]] = []
    strict: list[str] = []

    def add(t: FunctionTool | CustomTool, where: str, ns: NamespaceTool | None = None) -> None:
        flat = flat_name(ns.name if ns else None, t.name)
        if flat in out.names:
            raise APIError(400, f"Two tools are named {flat!r} (a namespace's tools are named "
                                f"<namespace>{NAMESPACE_DELIMITER}<name> here).", param=f"{where}.name",
                           code="invalid_value")
        out.names[flat] = ToolName(t.name, ns.name if ns else None, isinstance(t, CustomTool))
        description = "\n\n".join(d for d in (ns.description if ns else None, t.description) if d) or None
        if isinstance(t, CustomTool):
            fn = _custom_function(t, description)
        else:
            if t.strict:
                strict.append(f"{where}.strict")
            fn = {"name": flat, "description": description, "parameters": t.parameters}
            fn = {k: v for k, v in fn.items() if v is not None}
        fn["name"] = flat
        functions.append({"type": "function", "function": fn})

    for i, t in enumerate(body.tools or []):
        if isinstance(t, NamespaceTool):
            for j, sub in enumerate(t.tools):
                add(sub, f"tools[{i}].tools[{j}]", t)
        elif not isinstance(t, HostedTool):  # a hosted tool runs on OpenAI's servers: not offered
            add(t, f"tools[{i}]")
    if not functions:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs a function tool in 'tools'.", param="tool_choice",
                           code="invalid_value")
        return out
    if choice == "none":
        return Tools(names=out.names)  # the model is not told about the tools, so it answers in text
    check_tools(fmt, forced=choice == "required" or isinstance(choice, NamedToolChoice), strict=strict,
                response_format=grammar)
    out.rendered = functions
    return out


def _text(content: str | list[Any], param: str) -> str:
    """A message's or a tool output's text parts, joined with newlines (as for Chat Completions)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, MediaPart):
            raise APIError(400, f"Content part type {part.type!r} is not supported: this model reads text only.",
                           param=f"{param}[{j}]", code="invalid_value")
        texts.append(part.refusal if isinstance(part, RefusalPart) else part.text)
    return "\n".join(texts)


def template_messages(body: ResponsesRequest, fmt: ToolFormat | None) -> list[dict[str, Any]]:
    """The request's instructions and input items -> the chat template's (OpenAI-like) messages."""
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    context = SystemContext(body.instructions)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, ReasoningItem):
            continue
        if isinstance(item, MessageItem):
            text = _text(item.content, f"{where}.content")
            if item.role in ("system", "developer"):  # Qwen's templates know no "developer" role
                context.add(text, out)
                continue
            if item.role == "user":
                text = "\n".join(context.take() + [text])
            out.append({"role": item.role, "content": text})
            continue
        if fmt is None:
            raise unsupported(f"{where}.type", "this model's chat template does not render tool calls or their "
                                               "results")
        if isinstance(item, (FunctionCallItem, CustomToolCallItem)):
            if isinstance(item, FunctionCallItem):
                arguments = parse_arguments(item.arguments, f"{where}.arguments")
            else:
                arguments = {"input": item.input}
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": flat_name(item.namespace, item.name), "arguments": arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, (FunctionCallOutputItem, CustomToolCallOutputItem)):
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output, f"{where}.output")})
    return context.close(out)


def _refuse(body: ResponsesRequest) -> None:
    """Fields the API defines that a server keeping no state, running no hosted tool, cannot honour."""
    stored = "mtplx stores no responses or conversations; send the whole conversation in 'input'"
    for name in ("previous_response_id", "conversation"):
        if getattr(body, name) is not None:
            raise unsupported(name, stored)
    if body.prompt is not None:
        raise unsupported("prompt", "stored prompts live on OpenAI's servers; send the text in 'instructions' "
                                    "and 'input'")
    if body.background:
        raise unsupported("background", "a response is generated while the request waits or streams")
    if body.top_logprobs:
        raise unsupported("top_logprobs", "/v1/responses returns no logprobs; /v1/chat/completions does")
    if LOGPROBS_INCLUDE in (body.include or []):
        raise unsupported("include", f"{LOGPROBS_INCLUDE!r}: /v1/responses returns no logprobs; "
                                     "/v1/chat/completions does")


def _advisory(body: ResponsesRequest) -> list[str]:
    """The advisory fields a request set (ADVISORY), for the server's log."""
    seen = [name for name in ("prompt_cache_key", "prompt_cache_retention", "metadata", "client_metadata", "user",
                              "safety_identifier", "service_tier", "truncation", "max_tool_calls",
                              "parallel_tool_calls", "include", "stream_options") if getattr(body, name) is not None]
    if body.store:
        seen.append("store")
    if body.reasoning and (body.reasoning.summary or body.reasoning.generate_summary):
        seen.append("reasoning.summary")
    if body.text and body.text.verbosity:
        seen.append("text.verbosity")
    tools = body.tools or []
    inner = [s for t in tools if isinstance(t, NamespaceTool) for s in t.tools]
    if any(not isinstance(t, (HostedTool, NamespaceTool)) and t.defer_loading for t in tools + inner):
        seen.append("defer_loading")
    if any(isinstance(t, HostedTool) for t in tools):
        seen.append("hosted tools")
    if not isinstance(body.input, str) and any(isinstance(i, ReasoningItem) for i in body.input):
        seen.append("reasoning items")
    return seen


# -- the answer ----------------------------------------------------------------------------------

def _hex() -> str:
    return uuid.uuid4().hex


def _message(mid: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message item; ``text`` None: no content part yet (as output_item.added sends it)."""
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(prompt_tokens: int, r: GenerationResponse | None) -> dict[str, Any]:
    """The Responses API's usage; ``cached_tokens``: prompt tokens a prompt cache served instead
    of a prefill. The model's thinking is part of its text, so it counts as output tokens."""
    done = r.generation_tokens if r is not None else 0
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": r.cached_tokens if r is not None else 0, "cache_write_tokens": 0},
            "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + done}


@dataclass
class Shell:
    """What every Response object of one request carries: its id, time, model and the request's
    settings, echoed as the API does."""

    body: ResponsesRequest
    model: str
    tools: Tools
    rid: str = field(default_factory=lambda: f"resp_{_hex()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, status: str, output: list[dict[str, Any]], *, last: GenerationResponse | None = None,
                 job: Job | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        out = {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": b.reasoning.effort if b.reasoning else None,
                          "summary": b.reasoning.summary if b.reasoning else None},
            "temperature": b.temperature, "top_p": b.top_p,
            "text": b.text.model_dump(by_alias=True, exclude_none=True) if b.text else {"format": {"type": "text"}},
            "tool_choice": b.tool_choice.model_dump() if hasattr(b.tool_choice, "model_dump")
            else b.tool_choice or "auto",
            "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in b.tools or []],
            "truncation": b.truncation or "disabled", "metadata": b.metadata or {}, "user": b.user,
            "usage": _usage(len(job.ids), last) if job is not None and last is not None else None,
        }
        if job is not None and last is not None:
            out["mtplx"] = mtplx_stats(last, job)
        return out

    def call_item(self, call: ToolCall, status: str, *, done: bool = True) -> dict[str, Any]:
        """A parsed call -> a function_call item (or custom_tool_call for a freeform tool), under the
        name the client gave the tool. ``done`` False: the arguments not yet sent (output_item.added)."""
        name = self.tools.client_name(call.name)
        extra = {"namespace": name.namespace} if name.namespace else {}
        suffix = call.id.removeprefix("call_")
        if name.custom:
            return {"type": "custom_tool_call", "id": f"ctc_{suffix}", "call_id": call.id, "name": name.name,
                    "input": custom_input(call) if done else "", **extra}
        return {"type": "function_call", "id": f"fc_{suffix}", "call_id": call.id, "name": name.name,
                "arguments": call.arguments_json if done else "", "status": status, **extra}


def custom_input(call: ToolCall) -> str:
    """A freeform tool's input: the string the model wrote as its one parameter (anything else it
    wrote is passed on as JSON, so nothing is lost)."""
    args = call.arguments
    if set(args) == {"input"} and isinstance(args["input"], str):
        return args["input"]
    return json.dumps(args, ensure_ascii=False)


def _output(shell: Shell, pieces: list[Any], incomplete: bool) -> list[dict[str, Any]]:
    """A whole answer's pieces -> output items: consecutive text in one message, each call an item."""
    items: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, ToolCall):
            items.append(shell.call_item(piece, "completed"))
        elif items and items[-1]["type"] == "message":
            items[-1]["content"][0]["text"] += piece
        else:
            items.append(_message(f"msg_{_hex()}", piece, "completed"))
    if not items:
        items.append(_message(f"msg_{_hex()}", "", "completed"))
    if incomplete and items[-1]["type"] == "message":
        items[-1]["status"] = "incomplete"
    return items


class _Events:
    """One stream's SSE events, numbered in order (``sequence_number``) as the API numbers them."""

    def __init__(self) -> None:
        self.seq = itertools.count()

    def __call__(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, **data, "sequence_number": next(self.seq)}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _StreamedOutput:
    """The output items of a stream as they are made: opens and closes the message that text goes
    into, and sends each call whole (the parser hands it over once it is complete)."""

    def __init__(self, shell: Shell, ev: _Events):
        self.shell, self.ev = shell, ev
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the message text is streaming into

    def text(self, piece: str) -> Iterator[str]:
        ev = self.ev
        if self.open is None:
            self.open = _message(f"msg_{_hex()}", None, "in_progress")
            self.items.append(self.open)
            index = len(self.items) - 1
            yield ev("response.output_item.added", output_index=index, item=self.open)
            yield ev("response.content_part.added", item_id=self.open["id"], output_index=index, content_index=0,
                     part=_text_part(""))
            self.open["content"] = [_text_part("")]
        if piece:
            self.open["content"][0]["text"] += piece
            yield ev("response.output_text.delta", item_id=self.open["id"], output_index=len(self.items) - 1,
                     content_index=0, delta=piece, logprobs=[])

    def close(self, status: str = "completed") -> Iterator[str]:
        if self.open is None:
            return
        ev, item, index = self.ev, self.open, len(self.items) - 1
        part = item["content"][0]
        yield ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                 text=part["text"], logprobs=[])
        yield ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part)
        item["status"] = status
        yield ev("response.output_item.done", output_index=index, item=item)
        self.open = None

    def call(self, call: ToolCall) -> Iterator[str]:
        yield from self.close()
        ev, index = self.ev, len(self.items)
        item = self.shell.call_item(call, "completed")
        self.items.append(item)
        yield ev("response.output_item.added", output_index=index,
                 item=self.shell.call_item(call, "in_progress", done=False))
        if item["type"] == "custom_tool_call":
            yield ev("response.custom_tool_call_input.delta", item_id=item["id"], output_index=index,
                     delta=item["input"])
            yield ev("response.custom_tool_call_input.done", item_id=item["id"], output_index=index,
                     input=item["input"])
        else:
            yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                     delta=item["arguments"])
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                     arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=index, item=item)


# -- the route -----------------------------------------------------------------------------------

class ResponsesRoutes:
    """``POST /v1/responses`` over one :class:`Core`."""

    def __init__(self, core: Core):
        self.core = core
        self.fmt = tool_format(core.tokenizer)

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/responses", self.responses, methods=["POST"])
        return router

    async def prepare(self, body: ResponsesRequest) -> tuple[str, Generation, Tools]:
        core = self.core
        model = core.resolve_model(body.model)
        _refuse(body)
        core.note_advisory(_advisory(body), ADVISORY)
        g = checked_generation(max_tokens=body.max_output_tokens, max_tokens_param="max_output_tokens",
                               temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                               seed=body.seed, depth=body.depth, strict_greedy=body.strict_greedy,
                               lookup=body.lookup)
        g.grammar = await core.compile_format(body.text.response_format() if body.text else None)
        tools = _tools(body, self.fmt, grammar=g.grammar is not None)
        # A grammar applies from the first generated token, so the model cannot think first.
        kwargs = {"enable_thinking": False} if g.grammar is not None else thinking_for_effort(
            body.reasoning.effort if body.reasoning else None)
        g.ids, g.boundaries = await core.encode_chat(template_messages(body, self.fmt), tools=tools.rendered,
                                                     template_kwargs=kwargs, param="input")
        return model, g, tools

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        core = self.core
        model, g, tools = await self.prepare(body)
        answer = Answer(self.fmt if tools.rendered else None, tools.rendered)
        shell = Shell(body, model, tools)
        job = core.submit(g)
        if body.stream:
            return JobStream(self.stream(job, answer, shell), core.scheduler, job)
        out = await core.collect(request, job)
        last = out.last
        incomplete = last.finish_reason == "length"
        items = _output(shell, answer.feed(out.text, final=True), incomplete)
        return JSONResponse(shell("incomplete" if incomplete else "completed", items, last=last, job=job))

    async def stream(self, job: Job, answer: Answer, shell: Shell) -> AsyncIterator[str]:
        ev = _Events()
        out = _StreamedOutput(shell, ev)
        # Sent before the prefill: the client knows at once that the request is being served.
        yield ev("response.created", response=shell("in_progress", []))
        yield ev("response.in_progress", response=shell("in_progress", []))
        last = None
        try:
            async for r in self.core.steps(job, keepalive=True):
                if r is None:  # nothing for a while (a long prefill): a comment every SSE client skips
                    yield ": keep-alive\n\n"
                    continue
                last = r
                for piece in answer.feed(r.text, final=bool(r.finish_reason)):
                    for line in out.call(piece) if isinstance(piece, ToolCall) else out.text(piece):
                        yield line
            incomplete = last is not None and last.finish_reason == "length"
            if not out.items:  # nothing at all: one empty message, as the whole answer has
                for line in out.text(""):
                    yield line
            for line in out.close("incomplete" if incomplete else "completed"):
                yield line
            status = "incomplete" if incomplete else "completed"
            yield ev(f"response.{status}", response=shell(status, out.items, last=last, job=job))
        except APIError as e:
            error = {"code": e.code or e.type, "message": e.message}
            yield ev("response.failed", response=shell("failed", out.items, error=error))


def responses_routes(core: Core) -> APIRouter:
    return ResponsesRoutes(core).router()
