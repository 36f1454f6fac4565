"""``create_app``: the FastAPI app that assembles the request core, the request guard and the
OpenAI and Anthropic routes, and answers discovery (``/v1/models``, ``/health``, ``/metrics``)
and errors."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtplx._version import __version__
from mtplx.server.anthropic import anthropic_routes
from mtplx.server.capacity import Capacity
from mtplx.server.core import RETRY_AFTER_S, Core
from mtplx.server.http_errors import APIError, error_response, from_exception, is_client_error, validation_error
from mtplx.server.guards import RequestGuard
from mtplx.server.metrics import CONTENT_TYPE, MetricsMiddleware
from mtplx.server.openai import openai_routes
from mtplx.server.responses import responses_routes

log = logging.getLogger("mtplx.server")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def default_prompt_cache_bytes() -> int:
    # The share is inspect's, which counts the memory a request's caches may take the same way.
    from mtplx.artifact.inspect import PROMPT_CACHE_SHARE
    from mtplx.core.device import machine_memory_bytes

    return int(machine_memory_bytes() * PROMPT_CACHE_SHARE)


def create_app(model: Any, tokenizer: Any, *, served_model_names: Sequence[str] = ("mtplx",),
               depth: int | str | None = None, queue_size: int = 8, max_tokens_default: int | None = 512,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: Iterable[str] | None = (),
               prompt_cache_bytes: int | None = None, max_batch: int | None = None,
               strict_greedy: bool | float = False, prefill_chunk: int | None = None,
               prompt_cache_dir: str | Path | None = None, prompt_cache_disk_bytes: int | None = None,
               lookup: int | str = "auto", capacity: Capacity | None = None, kv_bits: int | None = None,
               kv_group_size: int = 64) -> FastAPI:
    """An app serving ``model``.

    ``served_model_names``: the names requests may ask for (the first is the one reported);
    ``depth``: the default draft depth ("auto", N, or None: what `mtplx tune` saved, else auto); ``queue_size``:
    how many requests may wait behind the running one; ``max_body_bytes``: the largest request
    body read (413 beyond); ``allowed_hosts``: Host names accepted besides loopback ones, or
    ``None`` to accept any Host (only for a server bound to a public address);
    ``prompt_cache_bytes``: the bound on the prompt caches of recent conversations (None: a
    tenth of the machine's memory; 0: no prompt cache); ``max_batch``: rows decoded together (None:
    sized from the memory left for the rows' caches, at most 8; 1: one generation at a time);
    ``strict_greedy``: the default for requests that do not set it (mtplx.engine.strict);
    ``prompt_cache_dir``: the prompt caches' disk tier (mtplx.engine.prompt_cache_disk; None: in
    memory only), bounded by ``prompt_cache_disk_bytes`` (None: 10 GiB or a quarter of the free
    disk, whichever is less); ``capacity``: the memory the rows' caches may take
    (mtplx.server.capacity; None: sized from this machine's memory); ``kv_bits`` /
    ``kv_group_size``: every request's attention KV stored quantized (mtplx.model.kv_quant; None:
    full precision), its prompt caches kept apart from other settings'."""
    if prompt_cache_bytes is None:
        prompt_cache_bytes = default_prompt_cache_bytes()
    core = Core(model, tokenizer, served_model_names=served_model_names, depth=depth, queue_size=queue_size,
                max_tokens_default=max_tokens_default, prompt_cache_bytes=prompt_cache_bytes, max_batch=max_batch,
                strict_greedy=strict_greedy, prefill_chunk=prefill_chunk, prompt_cache_dir=prompt_cache_dir,
                prompt_cache_disk_bytes=prompt_cache_disk_bytes, lookup=lookup, capacity=capacity,
                kv_bits=kv_bits, kv_group_size=kv_group_size)
    model_id = core.model_id
    scheduler, metrics = core.scheduler, core.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core.start()
        try:
            yield
        finally:
            core.stop()

    async def drain(timeout: float, give_up: Callable[[], bool] = lambda: False) -> None:
        """A graceful shutdown's first part (``mtplx.server.http.Server`` awaits it before closing
        connections): stop admitting (503 with Retry-After), end the queued requests now, let the
        running ones finish within ``timeout`` seconds (or until ``give_up()``), then end those
        still running. Every request ended gets its error in its own dialect."""
        scheduler.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if scheduler.busy:
            log.warning("mtplx: shutting down: waiting up to %g s for %d running request(s)", timeout, scheduler.running)
        while scheduler.busy and loop.time() < deadline and not give_up():
            await asyncio.sleep(0.05)
        if scheduler.busy:
            scheduler.end_running()
            # The rows end at the engine's next step boundary; one step is short, but bounded anyway.
            until = loop.time() + 10
            while scheduler.busy and loop.time() < until and not give_up():
                await asyncio.sleep(0.05)

    app = FastAPI(title="mtplx", version=__version__, lifespan=lifespan)
    app.state.core = core
    app.state.drain = drain
    # The last added is the outermost: metrics count what the guard refuses too.
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # Every error answers in the shape of the API its path belongs to (OpenAI or Anthropic).
    app.add_exception_handler(APIError, lambda request, exc: error_response(exc, request.url.path))
    app.add_exception_handler(RequestValidationError,
                              lambda request, exc: error_response(validation_error(request, exc), request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        err = APIError(exc.status_code, msg, code=None, headers=getattr(exc, "headers", None))
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body": not UTF-8
            bad = exc.__cause__
            err = APIError(400, f"The request body is not valid UTF-8 (byte 0x{bad.object[bad.start]:02x} at offset "
                                f"{bad.start}). Send JSON encoded as UTF-8.", code="invalid_json")
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log (uvicorn prints it), never to the client. An
        # MtplxError that escaped a route's own checks is still the request's fault: a 400.
        if is_client_error(exc):
            return error_response(from_exception(exc), request.url.path)
        err = APIError(500, f"Internal server error ({type(exc).__name__}); see the server log.", type_="server_error")
        return error_response(err, request.url.path)

    app.include_router(openai_routes(core))
    app.include_router(anthropic_routes(core))
    app.include_router(responses_routes(core))

    created = int(time.time())

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "mtplx"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in core.listed_names]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict[str, Any]:
        core.resolve_model(name)
        return card(name)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> dict[str, Any]:
        # Clients probe the base URL before their first request (Claude Code sends HEAD /).
        return {"name": "mtplx", "version": __version__, "model": model_id,
                "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
                              "/v1/models", "/health", "/metrics"]}

    @app.get("/health")
    async def health() -> JSONResponse:
        # 200 only while a request would be admitted: not once shutting down, nor with the engine gone.
        ok = scheduler.accepting
        status = "ok" if ok else "shutting_down" if scheduler.shutting_down else "error"
        body = {"status": status, "model": model_id, "busy": scheduler.busy, "queue_depth": scheduler.depth,
                "queue_size": queue_size, "batch_size": scheduler.running, "max_batch": core.max_batch}
        if scheduler.died is not None:
            body["error"] = f"the engine stopped ({type(scheduler.died).__name__}: {scheduler.died}); restart the server"
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
