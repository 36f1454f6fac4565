"""The request core every API dialect shares: errors, prompt encoding, the queue and the engine,
and usage. The OpenAI routes (:mod:`mtplx.server.openai`) and the Anthropic routes
(:mod:`mtplx.server.anthropic`) each turn their request into a :class:`Generation` and their
answer out of :class:`GenerationResponse` objects; everything between is here, once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mtplx import knobs
from mtplx._version import __version__
from mtplx.api import GenerationResponse, default_depth, reuse_boundaries
from mtplx.engine.prompt_cache import PromptCacheLRU
from mtplx.errors import MtplxError
from mtplx.knobs import KnobError
from mtplx.server.capacity import Capacity
from mtplx.server.metrics import Metrics
from mtplx.server.queue import Job, QueueFull, Scheduler, ShuttingDown, until_disconnect

RETRY_AFTER_S = 1
FINGERPRINT = f"mtplx-{__version__}"

# -- errors ------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as JSON. ``type_`` and ``code`` follow OpenAI's vocabulary; the
    Anthropic routes render the same error in Anthropic's shape (:func:`error_response`)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """OpenAI's shape: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's shape: {"type": "error", "error": {type, message}}."""
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}


# Anthropic names errors by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 499: "api_error",
                    500: "api_error", 503: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_response(err: APIError, path: str) -> JSONResponse:
    """``err`` in the shape of the API that ``path`` belongs to."""
    body = err.anthropic_body() if is_anthropic(path) else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


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


def validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """Turn pydantic's first complaint into one sentence."""
    errors = exc.errors()
    first = _param(tuple(errors[0].get("loc", ()))) or ""
    # A union field reports one error per member; the one that is not a type mismatch says
    # what is actually wrong (too many stop strings, not "should be a string"; an unknown
    # content block type, not "content should be a string").
    related = [e for e in errors if (_param(tuple(e.get("loc", ()))) or "").startswith(first)]
    err = next((e for e in related if not str(e.get("type", "")).endswith("_type")), errors[0])
    param = _param(tuple(err.get("loc", ())))
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
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: '{param}'. mtplx does not support it "
                             "(the README lists every supported field).", param=param, code="unsupported_parameter")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


def unsupported(param: str, why: str) -> APIError:
    """A field mtplx understands but cannot honour: refused, never silently dropped."""
    return APIError(400, f"'{param}' is not supported: {why}.", param=param, code="unsupported_parameter")


def knob(name: str, value: Any, param: str | None = None) -> Any:
    """A decoding knob checked by :mod:`mtplx.knobs` (the one definition of its limits);
    ``param`` names the request field when it differs from the knob's name."""
    try:
        return knobs.check(name, value)
    except KnobError as e:
        raise APIError(400, str(e), param=param or e.param, code="invalid_value") from None


def engine_error(exc: BaseException) -> APIError:
    """An exception raised while generating -> the error the client sees."""
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), type_="server_error", code="unavailable")
    if isinstance(exc, (MtplxError, ValueError)):
        return APIError(400, str(exc))
    return APIError(500, f"Generation failed ({type(exc).__name__}); see the server log.", type_="server_error")


# -- request bodies ----------------------------------------------------------------------------

class StrictModel(BaseModel):
    """Base of every request body. strict=True: a string where a number belongs is a 400, not
    silently coerced; extra="forbid": a field mtplx does not know is a 400, not silently
    dropped (OpenAI answers unknown fields the same way)."""

    model_config = ConfigDict(strict=True, extra="forbid")


# -- generations -------------------------------------------------------------------------------

@dataclass
class Generation:
    """What one request asks the engine for, in mtplx's terms (every dialect maps onto it)."""

    ids: list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    depth: int | None = None
    stop: list[str] = field(default_factory=list)
    boundaries: tuple[int, ...] = ()  # where the next turn may diverge (prompt-cache snapshots)
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    response_format: dict[str, Any] | None = None  # OpenAI's shape, validated; None or "text" = free text


# Stop strings one request may give (OpenAI's API allows 4, Anthropic's more; the scanner's
# cost grows with each).
MAX_STOPS = 16


def checked_generation(*, max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, min_p: Any, seed: Any,
                       depth: Any, max_tokens_param: str = "max_tokens", **rest: Any) -> Generation:
    """A :class:`Generation` with each decoding knob checked by :func:`knob` (ids are filled in
    later); ``rest`` (stop, logprobs, response_format) is taken as given."""
    return Generation([], max_tokens=knob("max_tokens", max_tokens, max_tokens_param),
                      temperature=knob("temperature", temperature), top_p=knob("top_p", top_p),
                      top_k=knob("top_k", top_k), min_p=knob("min_p", min_p), seed=knob("seed", seed),
                      depth=knob("depth", depth), **rest)


@dataclass
class Outcome:
    """A whole generation: its text and every engine step (the last one carries the totals)."""

    text: str
    steps: list[GenerationResponse]

    @property
    def last(self) -> GenerationResponse:
        return self.steps[-1]


def _chars(value: Any) -> int:
    """Characters of text in a JSON-like value: a lower bound on what the template renders."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_chars(v) for v in value)
    return 0


def usage(prompt_tokens: int, r: GenerationResponse | None) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: prompt tokens a prompt cache
    served instead of a prefill (OpenAI's field for its own prompt caching)."""
    done = r.generation_tokens if r is not None else 0
    cached = r.cached_tokens if r is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def mtplx_stats(r: GenerationResponse, depth: int) -> dict[str, Any]:
    """The ``mtplx`` field of a response: how the speculation went."""
    return {"tokens_per_second": round(r.generation_tps, 3), "prompt_tokens_per_second": round(r.prompt_tps, 3),
            "acceptance": [round(a, 4) for a in r.acceptance], "tokens_per_step": round(r.tokens_per_step, 4),
            "depth": depth}


class Core:
    """One model behind a queue: encodes prompts, submits generations and hands back their steps."""

    def __init__(self, model: Any, tokenizer: Any, *, served_model_names: Sequence[str] = ("mtplx",),
                 depth: int | None = None, queue_size: int = 8, max_tokens_default: int = 512,
                 prompt_cache_bytes: int = 0, max_batch: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.served_model_names = list(dict.fromkeys(n for n in served_model_names if n))
        if not self.served_model_names:
            raise MtplxError("the server needs at least one model name to answer to",
                             fix="pass --served-model-name NAME")
        self.model_id = self.served_model_names[0]
        self.max_tokens_default = max_tokens_default
        self.metrics = Metrics()
        # Prompt caches of recent conversations, bounded in bytes; 0 turns them off.
        self.prompt_caches = PromptCacheLRU(model, prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.metrics.prompt_caches = self.prompt_caches
        # Rows decoding together: --max-batch, by default as many as the memory left for their
        # caches holds (capacity.py); rows wait while the batch's caches would not fit.
        capacity = Capacity.of_machine(model, prompt_cache_bytes)
        self.max_batch = capacity.default_max_batch() if max_batch is None else max_batch
        self.scheduler = Scheduler(model, tokenizer, self.metrics, max_queue=queue_size,
                                   prompt_caches=self.prompt_caches, max_batch=self.max_batch, capacity=capacity)
        self.depth = default_depth(model) if depth is None else depth
        if self.depth > 0 and not model.has_mtp:
            raise MtplxError(f"depth {self.depth} needs an MTP head and this model has none",
                             fix="use --depth 0 or --no-mtp")
        # No token decodes to more than `longest` characters, so a text of n characters has at
        # least n / longest tokens; Unicode normalization may merge up to a few code points
        # into one before tokenizing, hence the factor. Beyond this a prompt cannot fit, and
        # is refused before the tokenizer spends seconds and gigabytes on it.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = model.max_context * max(longest, 1) * 4
        # Chat templates and BPE run on their own thread: a long prompt must not stall the event
        # loop, and one thread means the tokenizer is never used concurrently.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtplx-tokenize")

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's ``model`` selects (absent: the first one); another name is
        a 404 ``model_not_found``, as OpenAI answers."""
        if name is None or name in self.served_model_names:
            return self.model_id
        served = ", ".join(repr(n) for n in self.served_model_names)
        raise APIError(404, f"The model '{name}' does not exist; this server serves {served} "
                            "(mtplx serve --served-model-name sets these names).",
                       param="model", code="model_not_found")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # -- prompts -------------------------------------------------------------------------------

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_prompt_chars:
            raise APIError(400, f"The prompt has {n_chars} characters, more than this model's context of "
                                f"{self.model.max_context} tokens can hold.", param=param,
                           code="context_length_exceeded")

    def check_ids(self, ids: list[Any], param: str) -> list[int]:
        """Token ids from the request, checked against the vocabulary before anything touches
        the model (an id past the embedding table reads memory beyond it)."""
        if len(ids) >= self.model.max_context:
            raise self._too_long(len(ids))
        try:
            return knobs.check_token_ids(ids, self.model.vocab_size, param=param)
        except KnobError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    async def _tokenize(self, fn: Callable[[], Any], param: str) -> list[int]:
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the conversation
            raise APIError(400, f"Could not build the prompt: {e}", param=param) from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    async def encode_text(self, text: str, param: str) -> list[int]:
        self.check_prompt_chars(len(text), param)
        return await self._tokenize(lambda: self.tokenizer.encode(text), param)

    async def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          param: str = "messages") -> tuple[list[int], tuple[int, ...]]:
        """Messages (and tools) through the model's chat template, with the generation prompt;
        returns the ids and, with prompt caches on, where the next turn may diverge from them.
        ``template_kwargs`` reach the template as variables (``enable_thinking``, ...)."""
        self.check_prompt_chars(sum(_chars(m) for m in messages) + _chars(tools), param)
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        ids = await self._tokenize(lambda: self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **kwargs), param)
        if self.prompt_caches is None:
            return ids, ()
        boundaries = await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, lambda: reuse_boundaries(self.tokenizer, messages, ids, **kwargs))
        return ids, boundaries

    def _too_long(self, n: int) -> APIError:
        return APIError(400, f"The prompt has {n} tokens, at or over the model's context of "
                             f"{self.model.max_context}.", code="context_length_exceeded")

    # -- generations ---------------------------------------------------------------------------

    def submit(self, g: Generation) -> tuple[Job, int]:
        """Queue ``g``; returns the job and the depth it runs at."""
        model = self.model
        if not g.ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        if len(g.ids) >= model.max_context:
            raise self._too_long(len(g.ids))
        depth = self.depth if g.depth is None else g.depth
        if depth > 0 and not model.has_mtp:
            raise APIError(400, "This server's model has no MTP head; only depth 0 is available.", param="depth")
        kwargs = dict(max_tokens=g.max_tokens or self.max_tokens_default, temperature=g.temperature,
                      top_p=g.top_p, top_k=g.top_k, min_p=g.min_p, depth=depth, seed=g.seed, stop=g.stop,
                      logprobs=g.logprobs)
        if g.response_format is not None and g.response_format.get("type") != "text":
            kwargs["response_format"] = g.response_format
        job = Job(g.ids, kwargs, asyncio.get_running_loop(), boundaries=g.boundaries)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry shortly.", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type_="server_error", code="unavailable") from e
        return job, depth

    async def steps(self, job: Job) -> AsyncIterator[GenerationResponse]:
        """The job's engine steps as they come; an engine failure or a cancellation before the
        last step raises :class:`APIError`. The job is cancelled however the caller stops."""
        finished = False
        try:
            while (ev := await job.next_event()).kind != "done":
                if ev.kind == "chunk":
                    finished = bool(ev.response.finish_reason)
                    yield ev.response
                else:
                    raise engine_error(ev.error)
            if not finished:
                raise APIError(503, "The generation was cancelled before it finished.", type_="server_error")
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; frees the engine otherwise

    async def collect(self, request: Request, job: Job) -> Outcome:
        """Wait for the whole generation; a client that leaves meanwhile cancels it."""
        # Events arrive every engine step, so disconnects are watched by a task of their own
        # rather than between events (a long generation would otherwise never notice).
        watcher = asyncio.create_task(until_disconnect(request))

        def on_disconnect(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                self.scheduler.cancel(job)

        watcher.add_done_callback(on_disconnect)
        steps: list[GenerationResponse] = []
        try:
            async for r in self.steps(job):
                steps.append(r)
        except APIError:
            if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                raise APIError(499, "The client closed the request.") from None
            raise
        finally:
            watcher.cancel()
        return Outcome("".join(r.text for r in steps), steps)
