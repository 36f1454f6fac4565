"""OpenAI's routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
server-sent events or returned whole.

Every field of a request is either honoured or refused with a 400 that names it; none is
silently dropped. A few fields that only label a request for OpenAI's own bookkeeping (``user``,
``metadata``, ``service_tier``, ...) are accepted and have no effect; docs/server.md lists every
field and what mtplx does with it. ``model`` may be omitted (the server's first name is used);
a name the server does not answer to is a 404 ``model_not_found``. Validation failures are
HTTP 400 in OpenAI's error shape, never FastAPI's 422.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mtplx.api import GenerationResponse
from mtplx.generation.stops import check_stop
from mtplx.server.core import FINGERPRINT, Core, Generation, checked_generation, mtplx_stats
from mtplx.server.http_errors import APIError, openai_body, unsupported
from mtplx.server.logprob_text import TokenText
from mtplx.server.openai_requests import (ChatCompletionRequest, ChatMessage, CommonRequest, CompletionRequest,
                                          MessageToolCall, NamedToolChoice)
from mtplx.server.queue import Job, JobStream
from mtplx.server.tools import Answer, ToolCall, ToolFormat, check_tools, parse_arguments, tool_format

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# chat_template_kwargs reach the template as variables; these would change what the server
# itself controls.
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                            "return_dict", "chat_template", "continue_final_message", "return_assistant_tokens_mask"}


def _refuse_unsupported(body: CommonRequest) -> None:
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


def _generation(body: CommonRequest) -> Generation:
    """The request's decoding knobs, each checked by mtplx.core.knobs (ids and the response_format's
    grammar are filled in later)."""
    _refuse_unsupported(body)
    max_tokens, param = body.max_tokens, "max_tokens"
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        # OpenAI: max_completion_tokens supersedes the deprecated max_tokens. Both, with
        # different values, is a contradiction the request must resolve, not one mtplx picks.
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise APIError(400, f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' "
                                f"({body.max_completion_tokens}) disagree; send only max_completion_tokens "
                                "(max_tokens is its deprecated name).", param="max_tokens", code="invalid_value")
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    return checked_generation(
        max_tokens=max_tokens, max_tokens_param=param, temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
        depth=body.depth, stop=check_stop(body.stop), logprobs=_logprobs(body), strict_greedy=body.strict_greedy,
        lookup=body.lookup)


def usage(prompt_tokens: int, r: GenerationResponse | None) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: prompt tokens a prompt cache
    served instead of a prefill (OpenAI's field for its own prompt caching)."""
    done = r.generation_tokens if r is not None else 0
    cached = r.cached_tokens if r is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _logprobs(body: CommonRequest) -> int | None:
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


@dataclass
class _Chunks:
    """The chunks of one streamed answer: the same id, time and model on each."""

    chat: bool
    model: str
    include_usage: bool
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.rid = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def __call__(self, delta: dict[str, Any] | None = None, finish: str | None = None, logprobs: Any = None,
                 **extra: Any) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": logprobs,
                      "finish_reason": finish}
        out = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": FINGERPRINT, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        out.update(extra)
        return out


class OpenAIRoutes:
    """The two routes over one :class:`Core`: each turns its request into a
    :class:`Generation` and hands it to :meth:`respond`, which streams or returns the answer."""

    def __init__(self, core: Core):
        self.core = core
        self.fmt = tool_format(core.tokenizer)
        self.token_text = TokenText(core.tokenizer)

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        return router

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        core, fmt = self.core, self.fmt
        model = core.resolve_model(body.model)
        g = _generation(body)
        tools = _tools(body, fmt)
        g.grammar = await core.compile_format(body.response_format.as_dict() if body.response_format else None)
        messages = [_message_dict(m, i, fmt) for i, m in enumerate(body.messages)]
        g.ids, g.boundaries = await core.encode_chat(messages, tools=tools, template_kwargs=_template_kwargs(body, g))
        return await self.respond(request, body, model, g, Answer(fmt if tools else None, tools), chat=True)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        core = self.core
        model = core.resolve_model(body.model)
        g = _generation(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise unsupported("prompt", "one prompt per request (a list of one string or of token ids)")
            prompt = prompt[0]
        g.ids = await core.encode_text(prompt, "prompt") if isinstance(prompt, str) else core.check_ids(prompt, "prompt")
        return await self.respond(request, body, model, g, Answer(None, None), chat=False)

    async def respond(self, request: Request, body: CommonRequest, model: str, g: Generation, answer: Answer,
                      chat: bool) -> Response:
        core = self.core
        job = core.submit(g)
        if body.stream:
            chunks = _Chunks(chat, model, bool(body.stream_options and body.stream_options.include_usage))
            return JobStream(self.stream(job, answer, chunks, k=g.logprobs), core.scheduler, job)
        out = await core.collect(request, job)
        last = out.last
        pieces = answer.feed(out.text, final=True)
        text = "".join(p for p in pieces if isinstance(p, str))
        finish = _finish_reason(answer, last.finish_reason)
        all_logprobs = [lp for r in out.steps for lp in r.logprobs or []]
        logprobs = self.logprobs_json(all_logprobs, chat, g.logprobs, 0)
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
            "choices": [choice], "usage": usage(len(g.ids), last), "mtplx": mtplx_stats(last, job),
        })

    async def stream(self, job: Job, answer: Answer, chunk: _Chunks, k: int | None) -> AsyncIterator[str]:
        chat = chunk.chat
        last = None
        calls = offset = 0
        try:
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}))
            async for r in self.core.steps(job, keepalive=True):
                if r is None:
                    # Nothing for a while (a long prefill): an empty delta, a chunk every client
                    # parses, keeps an idle timeout that counts chunks (not bytes) from firing.
                    yield _sse(chunk({"content": ""}))
                    continue
                last = r
                # A step's logprobs ride on its first chunk (or on one of their own).
                lp = self.logprobs_json(last.logprobs, chat, k, offset)
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
                    yield _sse(chunk(finish=_finish_reason(answer, last.finish_reason), mtplx=mtplx_stats(last, job)))
            if chunk.include_usage:
                final = chunk(usage=usage(len(job.ids), last), mtplx=mtplx_stats(last, job))
                final["choices"] = []
                yield _sse(final)
        except APIError as e:
            yield _sse(openai_body(e))
        yield "data: [DONE]\n\n"

    def logprobs_json(self, lps: list[Any] | None, chat: bool, k: int | None, offset: int) -> dict[str, Any] | None:
        if k is None:
            return None
        if chat:
            return {"content": self.token_text.chat(lps), "refusal": None}
        return self.token_text.completion(lps, offset, k)


def openai_routes(core: Core) -> APIRouter:
    return OpenAIRoutes(core).router()


def _tools(body: ChatCompletionRequest, fmt: ToolFormat | None) -> list[dict[str, Any]] | None:
    """The tools to render into the prompt (None: none, and no tool-call parsing)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'.", param="tool_choice", code="invalid_value")
        return None
    if choice == "none":
        return None  # the model is not told about the tools, so it answers in text
    check_tools(fmt, forced=choice == "required" or isinstance(choice, NamedToolChoice),
                strict=[f"tools[{i}].function.strict" for i, t in enumerate(body.tools) if t.function.strict],
                response_format=body.response_format is not None and body.response_format.type != "text")
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
    if g.grammar is not None:
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
        for j, part in enumerate(m.content):
            if part.type != "text":
                raise APIError(400, f"Content part type {part.type!r} is not supported: this model and server take "
                                    "text only. Send the content as a string, or as parts "
                                    "{\"type\": \"text\", \"text\": ...}.",
                               param=f"messages[{i}].content[{j}]", code="invalid_value")
            if part.text is None:
                raise APIError(400, "A 'text' content part needs its 'text'.", param=f"messages[{i}].content[{j}].text",
                               code="missing_required_parameter")
            for other in ("image_url", "input_audio", "file"):  # on a text part: a mix-up, never dropped
                if getattr(part, other) is not None:
                    raise APIError(400, f"A 'text' content part takes no '{other}': this model and server take "
                                        "text only.", param=f"messages[{i}].content[{j}].{other}",
                                   code="invalid_value")
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
