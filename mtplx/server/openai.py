"""OpenAI's routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
server-sent events or returned whole.

Every field of a request is either honoured or refused with a 400 that names it; none is
silently dropped. A few fields that only label a request for OpenAI's own bookkeeping (``user``,
``metadata``, ``service_tier``, ...) are accepted and have no effect; the README lists every
field and what mtplx does with it. ``model`` may be omitted (the server's first name is used);
a name the server does not answer to is a 404 ``model_not_found``. Validation failures are
HTTP 400 in OpenAI's error shape, never FastAPI's 422.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import Field

from mtplx.engine.constraints import ResponseFormatError, grammar_for
from mtplx.prompts import check_stop
from mtplx.server.core import (FINGERPRINT, MAX_STOPS, APIError, Core, Generation, StrictModel, checked_generation,
                               mtplx_stats, unsupported, usage)
from mtplx.server.queue import Job, JobStream
from mtplx.server.logprobs import TokenText
from mtplx.server.tools import Answer, ToolCall, ToolFormat, tool_format

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# chat_template_kwargs reach the template as variables; these would change what the server
# itself controls.
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                            "return_dict", "chat_template", "continue_final_message", "return_assistant_tokens_mask"}


# -- request bodies ----------------------------------------------------------------------------

class ContentPart(StrictModel):
    type: str
    text: str | None = None


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON object, as the API returned it


class MessageToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; Qwen's template has no place for it
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant (vLLM's field; Qwen's template renders it)
    refusal: str | None = None  # accepted, as clients send back the assistant messages they got


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # refused when true: arguments are not constrained to the schema


class JsonSchemaFormat(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's shape, checked as the engine will compile it (a schema the grammar engine
        cannot enforce is a 400 here, not an error after the request is queued)."""
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise APIError(400, "'response_format.json_schema' goes with type 'json_schema', and only with it.",
                           param="response_format.json_schema", code="invalid_value")
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            try:
                validator_for(self.json_schema.schema_).check_schema(self.json_schema.schema_)
            except SchemaError as e:
                raise APIError(400, f"Invalid value for 'response_format.json_schema.schema': not a valid JSON "
                                    f"Schema ({e.message}).", param="response_format.json_schema.schema",
                               code="invalid_value") from None
        out = self.model_dump(by_alias=True, exclude_none=True)
        try:
            grammar_for(out)
        except ResponseFormatError as e:
            raise APIError(400, f"Invalid value for 'response_format': {e}", param="response_format",
                           code="invalid_value") from None
        return out


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Common(StrictModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="mtplx/vLLM extension; 0 or -1 disables it")
    min_p: float | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    depth: int | str | None = Field(None, description="mtplx extension: draft depth, 'auto' (adaptive), "
                                                       "0 = plain AR, or N drafts per step")
    # Refused unless neutral: mtplx samples one choice from the model's own law.
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted, no effect: labels for OpenAI's bookkeeping.
    user: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = Field(None, description="mtplx extension (also chat_template_kwargs)")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: every call the model writes is returned
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None  # refused: thinking is on or off (enable_thinking)
    store: bool | None = None  # refused when true: nothing is stored
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def _refuse_unsupported(body: _Common) -> None:
    if body.n not in (None, 1):
        raise unsupported("n", "the server generates one choice per request (n=1)")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise unsupported(name, "mtplx samples from the model's own distribution; only 0 is accepted")
    if body.logit_bias:
        raise unsupported("logit_bias", "mtplx samples from the model's own distribution")
    if isinstance(body, ChatCompletionRequest):
        if body.reasoning_effort is not None:
            raise unsupported("reasoning_effort", "thinking is on or off; set chat_template_kwargs.enable_thinking")
        if body.store:
            raise unsupported("store", "mtplx stores no completions")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise unsupported("echo", "the prompt is not returned with the completion")
        if body.suffix:
            raise unsupported("suffix", "mtplx does not fill in the middle")
        if body.best_of not in (None, 1):
            raise unsupported("best_of", "the server generates one choice per request")


def _generation(body: _Common, max_tokens_param: str = "max_tokens") -> Generation:
    """The request's decoding knobs, each checked by mtplx.knobs (ids are filled in later)."""
    _refuse_unsupported(body)
    return checked_generation(
        max_tokens=getattr(body, max_tokens_param), max_tokens_param=max_tokens_param, temperature=body.temperature,
        top_p=body.top_p, top_k=0 if body.top_k == -1 else body.top_k, min_p=body.min_p, seed=body.seed,
        depth=body.depth, stop=check_stop(body.stop), logprobs=_logprobs(body),
        response_format=body.response_format.as_dict() if getattr(body, "response_format", None) else None)


def _logprobs(body: _Common) -> int | None:
    """How many alternatives per token to report, or None for no logprobs."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
        k, param = (body.top_logprobs or 0, "top_logprobs") if body.logprobs else (None, "logprobs")
    else:
        k, param = getattr(body, "logprobs", None), "logprobs"
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"Invalid value for '{param}': must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k}.",
                       param=param, code="invalid_value")
    return k


# -- responses ---------------------------------------------------------------------------------

def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finish_reason(answer: Answer, engine_reason: str | None) -> str | None:
    return "tool_calls" if answer.called and engine_reason == "stop" else engine_reason


def _tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
    return out if index is None else {"index": index, **out}


def openai_routes(core: Core) -> APIRouter:
    router = APIRouter()
    fmt = tool_format(core.tokenizer)
    token_text = TokenText(core.tokenizer)

    def logprobs_json(lps: list[Any] | None, chat: bool, k: int | None, offset: int) -> dict[str, Any] | None:
        if k is None:
            return None
        if chat:
            return {"content": token_text.chat(lps), "refusal": None}
        return token_text.completion(lps, offset, k)

    async def stream(job: Job, answer: Answer, *, chat: bool, model: str, prompt_tokens: int, depth: int | str,
                     include_usage: bool, k: int | None) -> AsyncIterator[str]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, logprobs: Any = None,
                  **extra: Any) -> dict:
            if chat:
                choice = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": logprobs,
                          "finish_reason": finish}
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                   "model": model, "system_fingerprint": FINGERPRINT, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return out

        last = None
        calls = offset = 0
        try:
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}))
            async for last in core.steps(job):
                # A step's logprobs ride on its first chunk (or on one of their own).
                lp = logprobs_json(last.logprobs, chat, k, offset)
                if lp is not None and not chat:
                    offset += sum(map(len, lp["tokens"]))
                for piece in answer.feed(last.text, final=bool(last.finish_reason)):
                    if isinstance(piece, ToolCall):
                        yield _sse(chunk({"tool_calls": [_tool_call_json(piece, calls)]}, logprobs=lp))
                        calls += 1
                    else:
                        yield _sse(chunk({"content": piece}, logprobs=lp))
                    lp = None
                if lp is not None and (lp.get("content") or lp.get("tokens")):
                    yield _sse(chunk({}, logprobs=lp))
                if last.finish_reason:
                    yield _sse(chunk(finish=_finish_reason(answer, last.finish_reason), mtplx=mtplx_stats(last, depth)))
            if include_usage:
                final = chunk(usage=usage(prompt_tokens, last), mtplx=mtplx_stats(last, depth))
                final["choices"] = []
                yield _sse(final)
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def respond(request: Request, body: _Common, model: str, g: Generation, answer: Answer,
                      chat: bool) -> Response:
        job, depth = core.submit(g)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(stream(job, answer, chat=chat, model=model, prompt_tokens=len(g.ids), depth=depth,
                                    include_usage=include_usage, k=g.logprobs), core.scheduler, job)
        out = await core.collect(request, job)
        last = out.last
        pieces = answer.feed(out.text, final=True)
        text = "".join(p for p in pieces if isinstance(p, str))
        finish = _finish_reason(answer, last.finish_reason)
        all_logprobs = [lp for r in out.steps for lp in r.logprobs or []]
        logprobs = logprobs_json(all_logprobs, chat, g.logprobs, 0)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = [_tool_call_json(p) for p in pieces if isinstance(p, ToolCall)]
            if calls:
                message.update(content=text or None, tool_calls=calls)
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return JSONResponse({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT,
            "choices": [choice], "usage": usage(len(g.ids), last), "mtplx": mtplx_stats(last, depth),
        })

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = core.resolve_model(body.model)
        g = _generation(body, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        tools = _tools(body, fmt)
        messages = [_message_dict(m, i, fmt) for i, m in enumerate(body.messages)]
        g.ids, g.boundaries = await core.encode_chat(messages, tools=tools, template_kwargs=_template_kwargs(body, g))
        return await respond(request, body, model, g, Answer(fmt if tools else None, tools), chat=True)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = core.resolve_model(body.model)
        g = _generation(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise unsupported("prompt", "one prompt per request (a list of one string or of token ids)")
            prompt = prompt[0]
        g.ids = await core.encode_text(prompt, "prompt") if isinstance(prompt, str) else core.check_ids(prompt, "prompt")
        return await respond(request, body, model, g, Answer(None, None), chat=False)

    return router


def _tools(body: ChatCompletionRequest, fmt: ToolFormat | None) -> list[dict[str, Any]] | None:
    """The tools to render into the prompt (None: none, and no tool-call parsing)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'.", param="tool_choice", code="invalid_value")
        return None
    if choice == "none":
        return None  # the model is not told about the tools, so it answers in text
    if choice == "required" or isinstance(choice, NamedToolChoice):
        raise unsupported("tool_choice", "mtplx cannot force a tool call (that needs constrained decoding of the "
                                         "call); use 'auto' or 'none'")
    for i, tool in enumerate(body.tools):
        if tool.function.strict:
            raise unsupported(f"tools[{i}].function.strict", "the arguments the model writes are not constrained "
                                                             "to the schema; leave strict unset or false")
    if fmt is None:
        raise unsupported("tools", "this model's chat template does not render tools (mlx-lm recognises no "
                                   "tool-call format in it)")
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _template_kwargs(body: ChatCompletionRequest, g: Generation) -> dict[str, Any]:
    """chat_template_kwargs (passed to the template as variables) and the enable_thinking shortcut.
    A grammar (response_format) applies from the first generated token, so the model could not
    think first: thinking is off then, and asking for it is refused (as the Python API does)."""
    kwargs = dict(body.chat_template_kwargs or {})
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise unsupported(f"chat_template_kwargs.{key}", "the server sets it itself")
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise APIError(400, "Invalid value for 'chat_template_kwargs.enable_thinking': expected a boolean.",
                       param="chat_template_kwargs.enable_thinking", code="invalid_value")
    if body.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", body.enable_thinking)
    if g.response_format is not None and g.response_format.get("type") != "text":
        if kwargs.get("enable_thinking"):
            raise unsupported("enable_thinking", "thinking cannot be combined with a response_format: the grammar "
                                                 "applies from the first generated token")
        kwargs["enable_thinking"] = False
    return kwargs


def _message_dict(m: ChatMessage, i: int, fmt: ToolFormat | None) -> dict[str, Any]:
    """OpenAI message -> what the chat template reads. Text parts are joined with newlines
    (vLLM's rule); other parts (images, audio) cannot reach a text-only model. Tool calls carry
    their arguments as an object, which is what templates iterate over."""
    if isinstance(m.content, list):
        for part in m.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"Content part type {part.type!r} is not supported; only 'text' parts are.",
                               param=f"messages[{i}].content", code="invalid_value")
        content = "\n".join(p.text or "" for p in m.content)
    else:
        content = m.content or ""
    # Qwen's template knows no "developer" role; OpenAI defines it as the new name for system.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if (m.tool_calls or m.role == "tool") and fmt is None:
        raise unsupported(f"messages[{i}].{'tool_calls' if m.tool_calls else 'role'}",
                          "this model's chat template does not render tool calls or their results")
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, "Only assistant messages carry 'tool_calls'.", param=f"messages[{i}].tool_calls",
                           code="invalid_value")
        out["tool_calls"] = [_template_tool_call(c, f"messages[{i}].tool_calls[{j}]")
                             for j, c in enumerate(m.tool_calls)]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    return out


def _template_tool_call(call: MessageToolCall, param: str) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": parse_arguments(call.function.arguments,
                                                                                 f"{param}.function.arguments")}}


def parse_arguments(text: str, param: str) -> dict[str, Any]:
    """A tool call's arguments, a JSON object in a string, as the object."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise APIError(400, f"Invalid value for '{param}': not JSON ({e}).", param=param, code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, f"Invalid value for '{param}': expected a JSON object.", param=param, code="invalid_value")
    return value
