"""Checks every HTTP request passes before any route sees it: the Host header (DNS rebinding),
the size of the body (read into memory only up to a limit) and how deeply a JSON body nests.

Pure ASGI, so the body limit holds for chunked uploads that declare no Content-Length: the body
is read here, at most ``max_body_bytes`` of it, and replayed to the app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Any, Callable, Iterable

import numpy as np

from mtplx.server.http_errors import APIError, error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# How deeply a JSON body may nest (objects and arrays). Pydantic, the chat template (Jinja),
# jsonschema and llguidance all recurse over what they are given, and a body nested ~900 deep
# (3.6 KB) raised RecursionError in them: a 500 and a long traceback. A response_format schema
# may nest 64 levels (engine/schema_limits.py) inside the 4 of the body around it.
MAX_JSON_DEPTH = 100
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """How deeply ``body`` nests, for JSON (for anything else, a number that means nothing):
    strings dropped, then a running sum of the brackets left. C speed: an 8 MiB body of
    brackets takes milliseconds, and nothing recurses."""
    brackets = np.frombuffer(_STRING.sub(b"", body), dtype=np.uint8)
    steps = _STEP[brackets]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0)) if steps.size else 0


def host_name(header: str) -> str:
    """'[::1]:8000' -> '::1', 'LocalHost.:80' -> 'localhost'."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """``allowed_hosts``: ``None`` checks no Host header (a server bound to a public address,
    reached under names it cannot know); otherwise loopback names and these names pass, and
    ``"*"`` among them turns the check off. A page on another site that rebinds its DNS name to
    127.0.0.1 still sends its own name as Host, so it gets 403."""

    def __init__(self, app: Any, *, max_body_bytes: int, allowed_hosts: Iterable[str] | None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        names = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.allowed = None if names is None or "*" in names else names

    def host_ok(self, header: str | None) -> bool:
        if self.allowed is None:
            return True
        if not header:
            return False
        name = host_name(header)
        return is_loopback_name(name) or name in self.allowed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.host_ok(host):
            names = ", ".join(["localhost", "127.0.0.1", "::1", *sorted(self.allowed or ())])
            await self._refuse(scope, receive, send, APIError(
                403, f"Host {host!r} is not allowed: this server answers to {names} only (a check against DNS "
                     "rebinding). Reach it by one of those, or start it with --allowed-hosts NAME.",
                type_="permission_error", code="host_not_allowed"))
            return
        limit = self.max_body_bytes
        too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                                  "(mtplx serve --max-body-mb).", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # A large body is measured off the event loop (8 MiB takes about a second here).
        depth = 0 if "json" not in headers.get("content-type", "").lower() else \
            json_depth(body) if len(body) < 2**16 else await asyncio.to_thread(json_depth, body)
        if depth > MAX_JSON_DEPTH:
            await self._refuse(scope, receive, send, APIError(
                400, f"The request body nests {depth} levels deep (objects and arrays inside each other); this "
                     f"server takes at most {MAX_JSON_DEPTH}.", code="invalid_body"))
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when the client leaves

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: dict, receive: Callable, send: Callable, err: APIError) -> None:
        # Close the connection: the unread part of a refused body must not be parsed as the
        # next request.
        response = error_response(err, scope.get("path", ""))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
