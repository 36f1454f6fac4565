"""Errors the server answers with: one type (:class:`APIError`), its two wire shapes (OpenAI's
and Anthropic's), and which exceptions are the client's fault.

The line between a 400 and a 500: only :class:`~mtplx.errors.MtplxError` (which includes
:class:`~mtplx.core.knobs.KnobError`) says the request was wrong. Anything else raised while a
request is served (a ``ValueError`` from MLX about shapes or dtypes, an ``AttributeError``)
is a fault of the server: it is logged with its traceback and answered 500, never passed off
as a bad request.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mtplx.core import knobs
from mtplx.errors import MtplxError
from mtplx.core.knobs import KnobError

log = logging.getLogger("mtplx.server")


class APIError(Exception):
    """An error answered as JSON. ``type_`` and ``code`` follow OpenAI's vocabulary; the
    Anthropic shape is derived from the status (:func:`anthropic_body`)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def openai_body(err: APIError) -> dict[str, Any]:
    """OpenAI's shape: {"error": {message, type, param, code}}."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


# Anthropic names errors by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 499: "api_error", 500: "api_error", 503: "overloaded_error"}


def anthropic_body(err: APIError) -> dict[str, Any]:
    """Anthropic's shape: {"type": "error", "error": {type, message}}."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"), "message": err.message}}


ANTHROPIC_PREFIX = "/v1/messages"


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_response(err: APIError, path: str) -> JSONResponse:
    """``err`` in the shape of the API that ``path`` belongs to."""
    body = anthropic_body(err) if is_anthropic(path) else openai_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def unsupported(param: str, why: str) -> APIError:
    """A field mtplx understands but cannot honour: refused, never silently dropped."""
    return APIError(400, f"'{param}' is not supported: {why}.", param=param, code="unsupported_parameter")


def knob(name: str, value: Any, param: str | None = None) -> Any:
    """A decoding knob checked by :mod:`mtplx.core.knobs` (the one definition of its limits);
    ``param`` names the request field when it differs from the knob's name."""
    try:
        return knobs.check(name, value)
    except KnobError as e:
        raise APIError(400, str(e), param=param or e.param, code="invalid_value") from None


def is_client_error(exc: BaseException) -> bool:
    """The request was wrong (400), as opposed to the server failing (500)."""
    return isinstance(exc, MtplxError)


def from_exception(exc: BaseException, what: str = "Generation") -> APIError:
    """An exception raised while serving a request -> the error the client sees. A server
    fault is logged here, with its traceback."""
    if isinstance(exc, APIError):
        return exc
    if is_client_error(exc):
        return APIError(400, str(exc), param=getattr(exc, "param", None),
                        code="invalid_value" if isinstance(exc, KnobError) else None)
    log.error("mtplx: %s failed", what.lower(), exc_info=exc)
    return APIError(500, f"{what} failed ({type(exc).__name__}); see the server log.", type_="server_error")


# -- request validation (pydantic) -> one sentence --------------------------------------------

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
    if kind == "lone_surrogate":  # StrictModel's check: the path inside the model it checked
        where = (err.get("ctx") or {}).get("param") or ""
        at = _param(tuple(err.get("loc", ()))) or ""
        param = (f"{at}.{where}" if at and where and not where.startswith("[") else at + where) or None
        what = f"'{param}' holds" if param else "A key of the request body holds"
        return APIError(400, f"{what} a lone UTF-16 surrogate (such as \\ud800 without its pair), which is not "
                             "Unicode text. Send valid text: the character itself, or its escaped surrogate pair.",
                        param=param, code="invalid_value")
    if param is None:  # the body as a whole
        if "json" not in ctype.lower():
            return APIError(400, f"Unsupported Content-Type {ctype or '(none)'!r}: send the request body as JSON "
                                 "with Content-Type: application/json.", code="invalid_content_type")
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: '{param}'. mtplx does not support it "
                             "(docs/server.md lists every supported field).", param=param, code="unsupported_parameter")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")
