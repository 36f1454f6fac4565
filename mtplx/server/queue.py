"""One model, one worker thread, a bounded queue in front of it.

Why one generation at a time: the engine decodes a single sequence, the tokenizer's streaming
detokenizer is shared state, and on one machine two interleaved generations would each run at
half speed anyway. Why a dedicated thread rather than the event loop's thread pool: MLX work
blocks for a whole engine step, and keeping it on one long-lived thread means the event loop
stays free to accept, reject (429) and stream, and MLX always runs on the same thread.

Handing results back: the worker pushes :class:`Event` objects into each job's asyncio queue
with ``loop.call_soon_threadsafe``; the request handler awaits them. Cancelling is a flag the
worker reads between engine steps (each yielded ``GenerationResponse`` is one step), so a
client that leaves frees the engine after at most one more step, and a job cancelled while it
is still queued is removed and never runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mtplx.api import EncodedPrompt, GenerationResponse, stream_generate
from mtplx.engine.prompt_cache import PromptCache, PromptCacheLRU
from mtplx.server.metrics import Metrics

log = logging.getLogger("mtplx.server")


class QueueFull(Exception):
    """Every queue slot is taken; the caller answers 429."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work."""


@dataclass
class Event:
    """``chunk`` carries one engine step; ``error`` an exception raised by the engine; ``done``
    comes last, always (``outcome`` is completed, cancelled, dropped or error)."""

    kind: str
    response: GenerationResponse | None = None
    error: BaseException | None = None
    outcome: str = ""


class Job:
    """One request's generation: the token ids, the stream_generate keyword arguments, and the
    channel back to the event loop that created it."""

    def __init__(self, ids: list[int], kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 boundaries: tuple[int, ...] = ()):
        self.ids = ids
        self.kwargs = kwargs
        self.boundaries = boundaries  # where a later prompt may diverge (prompt-cache snapshots)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self._loop = loop

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            # The loop is closed (server gone): nobody is listening, so stop generating.
            self.cancelled.set()

    async def next_event(self) -> Event:
        return await self.events.get()


class Scheduler:
    """A bounded FIFO of jobs and the single worker thread that runs them.

    ``max_queue`` counts jobs waiting, not the one running: with the default 8, nine requests
    can be in the server at once and the tenth gets a 429.
    """

    def __init__(self, model: Any, tokenizer: Any, metrics: Metrics, max_queue: int = 8,
                 prompt_caches: PromptCacheLRU | None = None):
        if max_queue < 1:
            raise ValueError(f"the queue size must be >= 1, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        # Only the worker thread runs generations, so a cache it checks out is never read by
        # another request while it is written.
        self.prompt_caches = prompt_caches
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        metrics.bind(lambda: self.depth, lambda: self.busy)

    # -- state ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.alive:
            return
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._work, name="mtplx-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, end queued ones with an error, cancel the running one, and wait for
        the worker (bounded: a daemon thread never keeps the process alive)."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in pending:
            job.cancelled.set()
            self._finish(job, "dropped", ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the queue -----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Idempotent; a no-op for a finished job. A queued job is dropped at once so that it
        frees its slot; a running one stops at the worker's next check."""
        if job.finished.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # running (the worker will see the flag) or already taken
        self._finish(job, "dropped")

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                if job.cancelled.is_set():
                    # Cancelled between its removal check and now: never run it.
                    self._finish(job, "dropped")
                    continue
                self._running = job
            try:
                self._execute(job)
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one request
                log.exception("mtplx worker: unexpected error")
                self._finish(job, "error", e)  # whoever waits on this job must still hear "done"
            finally:
                with self._cond:
                    self._running = None

    def _execute(self, job: Job) -> None:
        cache = self.prompt_caches.checkout(job.ids) if self.prompt_caches is not None else None
        try:
            self._run(job, cache)
        finally:
            if cache is not None:
                self.prompt_caches.checkin(cache)

    def _run(self, job: Job, cache: PromptCache | None) -> None:
        gen = stream_generate(self.model, self.tokenizer, EncodedPrompt(job.ids, job.boundaries), prompt_cache=cache,
                              **job.kwargs)
        last: GenerationResponse | None = None
        outcome, error = "completed", None
        try:
            # Check the flag before asking for each step, so a cancelled job costs no more
            # than the step already under way when the client left.
            while not job.cancelled.is_set():
                r = next(gen, None)
                if r is None:
                    break
                last = r
                job.emit(Event("chunk", response=r))
                if r.finish_reason:
                    break
            else:
                outcome = "cancelled"
        except Exception as e:  # noqa: BLE001 - reported to the client, the worker lives on
            outcome, error = "error", e
            if not _is_user_error(e):
                log.exception("mtplx worker: generation failed")
        finally:
            gen.close()
        stats = last.stats if last is not None else None
        if outcome == "completed" and last is not None and not last.finish_reason:
            outcome = "cancelled"
        if outcome == "cancelled" and last is None:
            outcome = "dropped"  # cancelled as the worker took it: no step ran
        self.metrics.record_generation(outcome, stats)
        with self._cond:
            self._running = None
        self._finish(job, outcome, error, record=False)

    def _finish(self, job: Job, outcome: str, error: BaseException | None = None, record: bool = True) -> None:
        if job.finished.is_set():
            return
        job.finished.set()
        if record:
            self.metrics.record_generation(outcome)
        if error is not None:
            job.emit(Event("error", error=error, outcome=outcome))
        job.emit(Event("done", outcome=outcome))


# -- the request side --------------------------------------------------------------------------

class JobStream(StreamingResponse):
    """A server-sent-event response that cancels its job however it ends (finished, client
    gone, server stopping), so the engine is freed even on ASGI servers that do not cancel
    the body iterator when the client leaves."""

    def __init__(self, content: AsyncIterator[str], scheduler: Scheduler, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._scheduler, self._job = scheduler, job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._scheduler.cancel(self._job)


async def until_disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body is already read, so the next ASGI message
    a server sends is http.disconnect; run it as a task beside a non-streamed generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _is_user_error(e: BaseException) -> bool:
    from mtplx.errors import MtplxError

    return isinstance(e, (MtplxError, ValueError))
