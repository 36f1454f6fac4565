"""``create_app``: the FastAPI app that assembles the request core and the API routes, and
answers discovery (``/v1/models``, ``/health``, ``/metrics``) and errors."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtplx._version import __version__
from mtplx.server.core import APIError, Core, validation_error
from mtplx.server.metrics import CONTENT_TYPE, MetricsMiddleware
from mtplx.server.openai import openai_routes


def create_app(model: Any, tokenizer: Any, *, model_id: str = "mtplx", depth: int | None = None,
               queue_size: int = 8, max_tokens_default: int = 512) -> FastAPI:
    """An app serving ``model``. ``depth`` is the default draft depth (None: the tuned or
    contract default); ``queue_size`` is how many requests may wait behind the running one."""
    core = Core(model, tokenizer, model_id=model_id, depth=depth, queue_size=queue_size,
                max_tokens_default=max_tokens_default)
    scheduler, metrics = core.scheduler, core.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core.start()
        try:
            yield
        finally:
            core.stop()

    app = FastAPI(title="mtplx", version=__version__, lifespan=lifespan)
    app.state.core, app.state.scheduler, app.state.metrics = core, scheduler, metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(request, exc).response())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, msg, code=None, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log (uvicorn prints it), never to the client.
        return APIError(500, f"Internal server error ({type(exc).__name__}); see the server log.",
                        type_="server_error").response()

    app.include_router(openai_routes(core))

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
