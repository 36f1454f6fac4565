"""The HTTP connection layer under the app: uvicorn's h11 protocol with deadlines for a request
to arrive, and a server that shuts down gracefully.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but has no deadline
for a request that has started to arrive: a client that sends half its headers (or a body
shorter than its Content-Length) and then nothing kept a connection and its buffers for as long
as it liked (slowloris). Here the headers must be complete within ``header_timeout`` seconds of
the connection opening (or of the previous response, on a kept-alive connection), and the body
within ``body_timeout`` seconds of the headers; past either, the server answers ``408 Request
Timeout`` and closes the connection. ``mtplx serve`` runs with this protocol (h11 also when
httptools is installed).

Graceful shutdown (:class:`Server`): on SIGTERM or Ctrl-C, uvicorn closes its listening sockets,
waits ``timeout_graceful_shutdown`` seconds for open responses, then cancels their tasks (a
queued request's client got a bare 500 and the log a CancelledError) and only then tells the app.
:class:`Server` first awaits the app's drain (``app.state.drain``, see ``mtplx.server.app``):
new requests get 503 with Retry-After, queued ones end at once with an error in their dialect,
running ones may finish within ``shutdown_timeout`` seconds and end with an error past it. What
is left for uvicorn's own window is writing those last answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Awaitable, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0  # --shutdown-timeout: how long running generations may take to finish

log = logging.getLogger("mtplx.server")

_MESSAGE = b"The request did not arrive in time.\n"
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


class DeadlineH11Protocol(H11Protocol):
    """h11 with a deadline for each request's headers and body (see the module doc)."""

    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: Any = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """(Re)arm the deadline for what the client still owes: headers (their state IDLE) or the
        body (SEND_BODY); none once the request is whole."""
        state = self.conn.their_state
        owed = state if state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing() else None
        if owed is self._waiting_for:
            return
        self._cancel()
        self._waiting_for = owed
        if owed is not None:
            seconds = self.header_timeout if owed is h11.IDLE else self.body_timeout
            self._deadline = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        what = "headers" if self._waiting_for is h11.IDLE else "body"
        log.info("mtplx: closed a connection from %s whose request %s did not arrive in time", self.client, what)
        # A 408 unless this request's response has begun (the app may answer before the body).
        if what == "headers" or self.cycle is None or not self.cycle.response_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def deadline_protocol(header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S) -> type:
    """:class:`DeadlineH11Protocol` with other deadlines (tests use short ones)."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})


def config(app: Any, host: str, port: int, log_level: str, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration ``mtplx serve`` runs: the deadline protocol, and a short
    window for uvicorn's own part of a shutdown (after :class:`Server`'s drain, only the last
    answers are still being written; without the drain, open streams are cancelled, which frees
    the engine)."""
    kwargs.setdefault("http", DeadlineH11Protocol)
    kwargs.setdefault("timeout_graceful_shutdown", 3)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, **kwargs)


class Server(uvicorn.Server):
    """uvicorn's server with a graceful shutdown: ``drain(shutdown_timeout, give_up)`` is awaited
    before uvicorn closes anything (see the module doc); a second Ctrl-C (uvicorn's force exit)
    gives up waiting."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float, Callable[[], bool]], Awaitable[None]] | None,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT_S):
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.drain is not None:
            try:
                await self.drain(self.shutdown_timeout, lambda: self.force_exit)
            except Exception:  # noqa: BLE001 - uvicorn's own shutdown must still run
                log.exception("mtplx: the graceful part of the shutdown failed")
        await super().shutdown(sockets)
