"""OpenAI's routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
server-sent events or returned whole.

Compatibility choices, where OpenAI and llama-server differ:

* ``model`` is optional and any name is accepted, as llama-server does: one model is served,
  and chat UIs often send a stale or made-up name. Responses carry the served model's id.
* Unknown request fields are ignored (llama-server, vLLM), so clients that send
  ``frequency_penalty``, ``logit_bias`` and the like keep working; those have no effect.
* Validation failures are HTTP 400 in OpenAI's error shape, never FastAPI's 422.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, field_validator

from mtplx.server.core import (FINGERPRINT, APIError, Core, Generation, StrictModel, cancelled_error, mtplx_stats,
                               usage)
from mtplx.server.queue import Job, JobStream

MAX_DEPTH = 8  # the runtime contract's ceiling (mtplx.artifact.contract.MAX_DEPTH)
MAX_STOPS = 16


# -- request bodies ----------------------------------------------------------------------------

class ContentPart(StrictModel):
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Common(StrictModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="mtplx/vLLM extension; 0 or -1 disables it")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    depth: int | None = Field(None, ge=0, le=MAX_DEPTH, description="mtplx extension: draft depth, 0 = plain AR")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: the server generates one choice per request")
        return v


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = Field(None, description="mtplx extension (also chat_template_kwargs)")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None


# -- responses ---------------------------------------------------------------------------------

def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _generation(body: _Common, ids: list[int], max_tokens: int | None) -> Generation:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_k = 0 if body.top_k == -1 else body.top_k
    return Generation(ids, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=top_k,
                      min_p=body.min_p, seed=body.seed, depth=body.depth, stop=stop)


def openai_routes(core: Core) -> APIRouter:
    router = APIRouter()
    model_id = core.model_id

    async def stream(job: Job, *, chat: bool, prompt_tokens: int, depth: int, include_usage: bool) -> AsyncIterator[str]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False, **extra: Any) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                   "model": model_id, "system_fingerprint": FINGERPRINT, "choices": [choice]}
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

    async def respond(request: Request, body: _Common, ids: list[int], max_tokens: int | None, chat: bool) -> Response:
        job, depth = core.submit(_generation(body, ids, max_tokens))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(stream(job, chat=chat, prompt_tokens=len(ids), depth=depth, include_usage=include_usage),
                             core.scheduler, job)
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
            "created": int(time.time()), "model": model_id, "system_fingerprint": FINGERPRINT,
            "choices": [choice], "usage": usage(len(ids), last), "mtplx": mtplx_stats(last, depth),
        })

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        thinking = body.enable_thinking
        ctk = body.chat_template_kwargs or {}
        if "enable_thinking" in ctk:
            if not isinstance(ctk["enable_thinking"], bool):
                raise APIError(400, "Invalid value for 'chat_template_kwargs.enable_thinking': expected a boolean.",
                               param="chat_template_kwargs.enable_thinking", code="invalid_value")
            thinking = ctk["enable_thinking"]
        ids = await core.encode(messages, thinking, "messages")
        return await respond(request, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.echo or body.suffix:
            raise APIError(400, "'echo' and 'suffix' are not supported.", param="echo" if body.echo else "suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", param="prompt")
            prompt = prompt[0]
        ids = await core.encode(prompt, None, "prompt")
        return await respond(request, body, ids, body.max_tokens, chat=False)

    return router


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
