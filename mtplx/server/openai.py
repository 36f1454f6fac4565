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
from pydantic import Field

from mtplx.server.core import (FINGERPRINT, APIError, Core, Generation, StrictModel, knob, mtplx_stats,
                               unsupported, usage)
from mtplx.server.queue import Job, JobStream

MAX_STOPS = 16
# chat_template_kwargs reach the template as variables; these would change what the server
# itself controls.
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                            "return_dict", "chat_template", "continue_final_message", "return_assistant_tokens_mask"}


# -- request bodies ----------------------------------------------------------------------------

class ContentPart(StrictModel):
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; Qwen's template has no place for it


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
    depth: int | None = Field(None, description="mtplx extension: draft depth, 0 = plain AR")
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
    max_tokens = getattr(body, max_tokens_param)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Generation(
        [], max_tokens=knob("max_tokens", max_tokens, max_tokens_param),
        temperature=knob("temperature", body.temperature), top_p=knob("top_p", body.top_p),
        top_k=knob("top_k", 0 if body.top_k == -1 else body.top_k), min_p=knob("min_p", body.min_p),
        seed=knob("seed", body.seed), depth=knob("depth", body.depth), stop=stop)


# -- responses ---------------------------------------------------------------------------------

def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def openai_routes(core: Core) -> APIRouter:
    router = APIRouter()

    async def stream(job: Job, *, chat: bool, model: str, prompt_tokens: int, depth: int,
                     include_usage: bool) -> AsyncIterator[str]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False, **extra: Any) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                   "model": model, "system_fingerprint": FINGERPRINT, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return out

        last = None
        try:
            if chat:
                yield _sse(chunk(role=True))
            async for last in core.steps(job):
                if last.text:
                    yield _sse(chunk(last.text))
                if last.finish_reason:
                    yield _sse(chunk(finish=last.finish_reason, mtplx=mtplx_stats(last, depth)))
            if include_usage:
                final = chunk(usage=usage(prompt_tokens, last), mtplx=mtplx_stats(last, depth))
                final["choices"] = []
                yield _sse(final)
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def respond(request: Request, body: _Common, model: str, g: Generation, chat: bool) -> Response:
        job, depth = core.submit(g)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(stream(job, chat=chat, model=model, prompt_tokens=len(g.ids), depth=depth,
                                    include_usage=include_usage), core.scheduler, job)
        out = await core.collect(request, job)
        last = out.last
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": last.finish_reason}
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
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        g.ids = await core.encode_chat(messages, template_kwargs=_template_kwargs(body))
        return await respond(request, body, model, g, chat=True)

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
        return await respond(request, body, model, g, chat=False)

    return router


def _template_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
    """chat_template_kwargs (passed to the template as variables) and the enable_thinking shortcut."""
    kwargs = dict(body.chat_template_kwargs or {})
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise unsupported(f"chat_template_kwargs.{key}", "the server sets it itself")
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise APIError(400, "Invalid value for 'chat_template_kwargs.enable_thinking': expected a boolean.",
                       param="chat_template_kwargs.enable_thinking", code="invalid_value")
    if body.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", body.enable_thinking)
    return kwargs


def _message_dict(m: ChatMessage, i: int) -> dict[str, str]:
    """OpenAI message -> the template's {role, content}. Text parts are joined with newlines
    (vLLM's rule); other parts (images, audio) cannot reach a text-only model."""
    if isinstance(m.content, list):
        for part in m.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"Content part type {part.type!r} is not supported; only 'text' parts are.",
                               param=f"messages[{i}].content", code="invalid_value")
        content = "\n".join(p.text or "" for p in m.content)
    else:
        content = m.content or ""
    # Qwen's template knows no "developer" role; OpenAI defines it as the new name for system.
    return {"role": "system" if m.role == "developer" else m.role, "content": content}
