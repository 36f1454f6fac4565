"""The OpenAI-compatible HTTP API: request models, error mapping, and the two completion
endpoints (streamed as server-sent events or returned whole).

Compatibility choices, where OpenAI and llama-server differ:

* ``model`` is optional and any name is accepted, as llama-server does: one model is served,
  and chat UIs often send a stale or made-up name. Responses carry the served model's id.
* Unknown request fields are ignored (llama-server, vLLM), so clients that send
  ``frequency_penalty``, ``logit_bias`` and the like keep working; those have no effect.
* Validation failures are HTTP 400 in OpenAI's error shape, never FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtplx._version import __version__
from mtplx.api import GenerationResponse, default_depth, encode_prompt
from mtplx.errors import MtplxError
from mtplx.server.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from mtplx.server.queue import Job, JobStream, QueueFull, Scheduler, ShuttingDown, until_disconnect

MAX_DEPTH = 8  # the runtime contract's ceiling (mtplx.artifact.contract.MAX_DEPTH)
MAX_STOPS = 16
RETRY_AFTER_S = 1
FINGERPRINT = f"mtplx-{__version__}"


# -- request bodies ----------------------------------------------------------------------------
# strict=True: a string where a number belongs is a 400, not silently coerced.

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
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


# -- errors ------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'list[ContentPart]', 0) -> 'messages[0].content[0]'.
    Pydantic adds the union member it tried ('str', 'list[str]') to the path; drop those."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in _TYPE_TAGS and "[" not in p:
            out += f".{p}" if out else p
    return out or None


def _validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """Turn pydantic's first complaint into one OpenAI-style sentence."""
    errors = exc.errors()
    param = _param(tuple(errors[0].get("loc", ())))
    # A union field reports one error per member; the one that is not a type mismatch says
    # what is actually wrong (e.g. too many stop strings, not "should be a string").
    same = [e for e in errors if _param(tuple(e.get("loc", ()))) == param]
    err = next((e for e in same if not str(e.get("type", "")).endswith("_type")), errors[0])
    kind = err.get("type", "")
    ctype = request.headers.get("content-type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"Could not parse the JSON body of the request ({detail}). "
                             "Send a JSON object with Content-Type: application/json.", code="invalid_json")
    if param is None:  # the body as a whole
        if "json" not in ctype.lower():
            return APIError(400, f"Unsupported Content-Type {ctype or '(none)'!r}: send the request body as JSON "
                                 "with Content-Type: application/json.", code="invalid_content_type")
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


# -- responses ---------------------------------------------------------------------------------

def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _mtplx_stats(r: GenerationResponse, depth: int) -> dict[str, Any]:
    return {"tokens_per_second": round(r.generation_tps, 3), "prompt_tokens_per_second": round(r.prompt_tps, 3),
            "acceptance": [round(a, 4) for a in r.acceptance], "tokens_per_step": round(r.tokens_per_step, 4),
            "depth": depth}


def _usage(prompt_tokens: int, r: GenerationResponse | None) -> dict[str, int]:
    done = r.generation_tokens if r is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


# -- the app -----------------------------------------------------------------------------------

def create_app(model: Any, tokenizer: Any, *, model_id: str = "mtplx", depth: int | None = None,
               queue_size: int = 8, max_tokens_default: int = 512) -> FastAPI:
    """An app serving ``model``. ``depth`` is the default draft depth (None: the tuned or
    contract default); ``queue_size`` is how many requests may wait behind the running one."""
    metrics = Metrics()
    scheduler = Scheduler(model, tokenizer, metrics, max_queue=queue_size)
    server_depth = default_depth(model) if depth is None else depth
    if server_depth > 0 and not model.has_mtp:
        raise MtplxError(f"depth {server_depth} needs an MTP head and this model has none", fix="use --depth 0 or --no-mtp")
    # Chat templates and BPE run on their own thread: a long prompt must not stall the event
    # loop, and one thread means the tokenizer is never used concurrently.
    tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtplx-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            tok_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mtplx", version=__version__, lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: _validation_error(request, exc).response())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, msg, code=None, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log (uvicorn prints it), never to the client.
        return APIError(500, f"Internal server error ({type(exc).__name__}); see the server log.",
                        type_="server_error").response()

    # -- helpers bound to this app -------------------------------------------------------------

    async def encode(prompt: Any, thinking: bool | None, param: str) -> list[int]:
        try:
            return await asyncio.get_running_loop().run_in_executor(tok_pool, encode_prompt, tokenizer, prompt, thinking)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the conversation
            raise APIError(400, f"Could not build the prompt: {e}", param=param) from e

    def submit(body: _Common, ids: list[int], max_tokens: int | None) -> tuple[Job, int]:
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        if len(ids) >= model.max_context:
            raise APIError(400, f"The prompt has {len(ids)} tokens, at or over the model's context of "
                                f"{model.max_context}.", code="context_length_exceeded")
        depth = server_depth if body.depth is None else body.depth
        if depth > 0 and not model.has_mtp:
            raise APIError(400, "This server's model has no MTP head; only depth 0 is available.", param="depth")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top_k = 0 if body.top_k == -1 else body.top_k
        kwargs = dict(max_tokens=max_tokens or max_tokens_default, temperature=body.temperature, top_p=body.top_p,
                      top_k=top_k, min_p=body.min_p, depth=depth, seed=body.seed, stop=stop)
        job = Job(ids, kwargs, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry shortly.", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type_="server_error", code="unavailable") from e
        return job, depth

    def engine_error(exc: BaseException) -> APIError:
        if isinstance(exc, ShuttingDown):
            return APIError(503, str(exc), type_="server_error", code="unavailable")
        if isinstance(exc, (MtplxError, ValueError)):
            return APIError(400, str(exc))
        return APIError(500, f"Generation failed ({type(exc).__name__}); see the server log.", type_="server_error")

    async def collect(request: Request, job: Job) -> tuple[str, GenerationResponse]:
        """Wait for the whole generation; a client that leaves meanwhile cancels it."""
        # Events arrive every engine step, so disconnects are watched by a task of their own
        # rather than between events (a long generation would otherwise never notice).
        watcher = asyncio.create_task(until_disconnect(request))

        def on_disconnect(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                scheduler.cancel(job)

        watcher.add_done_callback(on_disconnect)
        text: list[str] = []
        last: GenerationResponse | None = None
        try:
            while (ev := await job.next_event()).kind != "done":
                if ev.kind == "chunk":
                    last = ev.response
                    text.append(last.text)
                else:
                    raise engine_error(ev.error)
        finally:
            watcher.cancel()
            scheduler.cancel(job)  # a no-op once finished; frees the engine if we were cancelled
        if last is None or not last.finish_reason:
            if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                raise APIError(499, "The client closed the request.")
            raise APIError(503, "The generation was cancelled before it finished.", type_="server_error")
        return "".join(text), last

    async def stream(job: Job, *, chat: bool, prompt_tokens: int, depth: int, usage: bool) -> AsyncIterator[str]:
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
            if usage:
                out["usage"] = None
            out.update(extra)
            return out

        last: GenerationResponse | None = None
        finished = failed = False
        try:
            if chat:
                yield _sse(chunk(role=True))
            while (ev := await job.next_event()).kind != "done":
                if ev.kind == "chunk":
                    last = ev.response
                    if last.text:
                        yield _sse(chunk(last.text))
                    if last.finish_reason:
                        finished = True
                        yield _sse(chunk(finish=last.finish_reason, mtplx=_mtplx_stats(last, depth)))
                else:
                    failed = True
                    yield _sse(engine_error(ev.error).body())
            if not finished and not failed:
                yield _sse(APIError(503, "The generation was cancelled before it finished.", type_="server_error").body())
            if usage and finished:
                final = chunk(usage=_usage(prompt_tokens, last), mtplx=_mtplx_stats(last, depth))
                final["choices"] = []
                yield _sse(final)
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(job)

    async def respond(request: Request, body: _Common, ids: list[int], max_tokens: int | None, chat: bool) -> Response:
        job, depth = submit(body, ids, max_tokens)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(stream(job, chat=chat, prompt_tokens=len(ids), depth=depth, usage=usage), scheduler, job)
        text, last = await collect(request, job)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return JSONResponse({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_id, "system_fingerprint": FINGERPRINT,
            "choices": [choice], "usage": _usage(len(ids), last), "mtplx": _mtplx_stats(last, depth),
        })

    # -- endpoints -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        thinking = body.enable_thinking
        ctk = body.chat_template_kwargs or {}
        if "enable_thinking" in ctk:
            if not isinstance(ctk["enable_thinking"], bool):
                raise APIError(400, "Invalid value for 'chat_template_kwargs.enable_thinking': expected a boolean.",
                               param="chat_template_kwargs.enable_thinking", code="invalid_value")
            thinking = ctk["enable_thinking"]
        ids = await encode(messages, thinking, "messages")
        return await respond(request, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.echo or body.suffix:
            raise APIError(400, "'echo' and 'suffix' are not supported.", param="echo" if body.echo else "suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", param="prompt")
            prompt = prompt[0]
        ids = await encode(prompt, None, "prompt")
        return await respond(request, body, ids, body.max_tokens, chat=False)

    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "mtplx"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "error", "model": model_id, "busy": scheduler.busy,
                             "queue_depth": scheduler.depth, "queue_size": queue_size},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


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
