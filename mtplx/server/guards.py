"""Checks every HTTP request passes before any route sees it: the Host header (DNS rebinding)
and the size of the body (read into memory only up to a limit).

Pure ASGI, so the body limit holds for chunked uploads that declare no Content-Length: the body
is read here, at most ``max_body_bytes`` of it, and replayed to the app.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from mtplx.server.errors import APIError, error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


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
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect, when the client leaves

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: dict, receive: Callable, send: Callable, err: APIError) -> None:
        # Close the connection: the unread part of a refused body must not be parsed as the
        # next request.
        response = error_response(err, scope.get("path", ""))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
