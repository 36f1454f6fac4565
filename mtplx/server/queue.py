"""One model, one engine thread stepping a batch of rows, a bounded queue in front of it.

Continuous batching: the engine thread owns a decoder (``mtplx.server.decoders``) and loops:
take waiting jobs into the batch while there is room (``--max-batch`` rows, and the memory
their caches need, see ``capacity``), run one step of every row, hand each row's new text to its
request, and let rows leave at once when they finish (end of sequence, max_tokens, a stop
string) or are cancelled (the client left). A row joins and leaves at a step boundary, so the
others pause for at most one step. Each row carries its own sampler, seed, grammar, logprobs,
stop strings and prompt cache; its text is made by its own :class:`~mtplx.generation.row_text.RowText`.

Why one thread: MLX work blocks for a whole step, and keeping it on one long-lived thread means
the event loop stays free to accept, reject (429) and stream, and MLX always runs on the same
thread. ``--max-batch 1`` is the one-at-a-time server: one row, the single-sequence engine.

Admission is counted once, at submit: a job holds a place from the moment it is admitted until
it finishes, and at most ``max_batch + max_queue`` places exist, so how many simultaneous
requests are admitted never depends on how far the engine thread has got (issue 21, row 15).

Handing results back: the engine thread pushes :class:`Event` objects into each job's asyncio
queue with ``loop.call_soon_threadsafe``; the request handler awaits them. Cancelling is a flag
the engine thread reads between steps, so a client that leaves frees its row after at most one
more step, and a job cancelled while it is still queued is removed and never runs.
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

from mtplx.api import EncodedPrompt, GenerationResponse, row_spec
from mtplx.engine.prompt_cache import PromptCache, PromptCacheLRU
from mtplx.generation.row_text import RowSpec, RowText
from mtplx.server.capacity import Capacity
from mtplx.server.decoders import make_decoder
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
        self.need = 0  # bytes its row's caches may take (set when it is taken into the batch)
        self._loop = loop

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            # The loop is closed (server gone): nobody is listening, so stop generating.
            self.cancelled.set()

    async def next_event(self) -> Event:
        return await self.events.get()


@dataclass
class _Row:
    """A job in the batch: its request, its text, the decoder's row and the prompt cache it holds."""

    job: Job
    spec: RowSpec
    text: RowText
    row: Any
    cache: PromptCache | None
    need: int  # bytes its caches may grow to (capacity)
    last: GenerationResponse | None = None


class Scheduler:
    """A bounded FIFO of jobs and the engine thread that decodes them in a batch.

    ``max_batch`` rows decode together; ``max_queue`` more may wait. With the defaults (a batch
    sized from memory, queue 8), ``max_batch + 8`` requests can be in the server at once and the
    next gets a 429.
    """

    def __init__(self, model: Any, tokenizer: Any, metrics: Metrics, max_queue: int = 8,
                 prompt_caches: PromptCacheLRU | None = None, max_batch: int = 1,
                 capacity: Capacity | None = None):
        if max_queue < 1:
            raise ValueError(f"the queue size must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"the batch size must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        # Only the engine thread runs generations, so a cache it checks out is never read by
        # another request while it is written.
        self.prompt_caches = prompt_caches
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.capacity = capacity
        self._pending: deque[Job] = deque()
        self._admitted = 0  # jobs holding a place: waiting, joining or in the batch
        self._batch: list[_Row] = []  # engine thread only (its length is read for metrics)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        metrics.bind(lambda: self.depth, lambda: self.busy, lambda: self.running)

    # -- state ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting for a place in the batch."""
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        """Rows in the batch."""
        with self._cond:
            return len(self._batch)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._admitted > len(self._pending)

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
        """Refuse new jobs, end queued ones with an error, cancel the running rows, and wait for
        the engine thread (bounded: a daemon thread never keeps the process alive)."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            for r in self._batch:
                r.job.cancelled.set()
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
            if self._admitted >= self.max_batch + self.max_queue:
                raise QueueFull(f"the server holds {self.max_batch + self.max_queue} requests "
                                f"({self.max_batch} decoding, {self.max_queue} waiting)")
            self._admitted += 1
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Idempotent; a no-op for a finished job. A queued job is dropped at once so that it
        frees its place; a row in the batch leaves at the engine thread's next check."""
        if job.finished.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # in the batch (the engine thread will see the flag) or already taken
        self._finish(job, "dropped")

    # -- the engine thread ---------------------------------------------------------------------

    def _work(self) -> None:
        decoder = make_decoder(self.model, self.max_batch)
        while True:
            with self._cond:
                while not self._pending and not self._batch and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = self._take()
            for job in joining:
                self._join(decoder, job)  # a request that cannot join fails alone
            try:
                self._leave_cancelled(decoder)
                if self._batch:
                    self._step(decoder)
            except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one step
                log.exception("mtplx engine: a step failed; every row in it ends with an error")
                for r in list(self._batch):  # whoever waits on these rows must still hear "done"
                    self._leave(decoder, r, "error", e)
                decoder = make_decoder(self.model, self.max_batch)
        for r in list(self._batch):  # stopping: every row still running is cancelled
            self._leave(decoder, r, "cancelled")

    def _take(self) -> list[Job]:
        """Waiting jobs that join now (under the lock): while the batch has room and, past the
        first row, the rows' caches fit in memory."""
        joining: list[Job] = []
        held = sum(r.need for r in self._batch)
        while self._pending and len(self._batch) + len(joining) < self.max_batch:
            job = self._pending[0]
            need = self.capacity.row(len(job.ids), job.kwargs.get("max_tokens") or 0) if self.capacity else 0
            if self.capacity is not None and not self.capacity.fits(need, held, len(self._batch) + len(joining)):
                break  # it waits for rows to leave (first in, first served: no overtaking)
            self._pending.popleft()
            job.need = need
            held += need
            joining.append(job)
        return joining

    def _join(self, decoder: Any, job: Job) -> None:
        if job.cancelled.is_set():  # cancelled between its removal check and now: never run it
            self._finish(job, "dropped")
            return
        cache = self.prompt_caches.checkout(job.ids) if self.prompt_caches is not None else None
        try:
            spec = row_spec(self.model, self.tokenizer, EncodedPrompt(job.ids, job.boundaries), prompt_cache=cache,
                            **job.kwargs)
            text = RowText(self.tokenizer, spec)
            row = decoder.add(spec)
        except Exception as e:  # noqa: BLE001 - reported to the client, the engine thread lives on
            if cache is not None:
                self.prompt_caches.checkin(cache)
            self.metrics.record_generation("error")
            self._finish(job, "error", e, record=False)
            return
        with self._cond:
            self._batch.append(_Row(job, spec, text, row, cache, job.need))

    def _leave_cancelled(self, decoder: Any) -> None:
        for r in [r for r in self._batch if r.job.cancelled.is_set()]:
            self._leave(decoder, r, "cancelled")

    def _step(self, decoder: Any) -> None:
        """One step of every row (a batched step that raises fails every row in it: see _work)."""
        self.metrics.record_batch(len(self._batch))
        out = decoder.step()
        by_row = {id(r.row): r for r in self._batch}
        for row, emitted in out:
            r = by_row.get(id(row))
            if r is None:
                continue
            r.last = r.text.feed(emitted.tokens, row.stats, emitted.logprobs)
            r.job.emit(Event("chunk", response=r.last))
            if r.text.finish:
                self._leave(decoder, r, "completed")
        for r in [r for r in self._batch if r.row.done]:
            error = getattr(r.row, "error", None)
            if error is not None:
                self._leave(decoder, r, "error", error)
            else:  # the engine ended the row without a finish of the text's (the context is full)
                r.last = r.text.end(r.row.stats)
                r.job.emit(Event("chunk", response=r.last))
                self._leave(decoder, r, "completed")

    def _leave(self, decoder: Any, r: _Row, outcome: str, error: BaseException | None = None) -> None:
        """``r`` leaves the batch now: its decoder row goes, its prompt cache returns to the LRU,
        its request hears the outcome."""
        decoder.remove(r.row)  # a no-op for a row the decoder already let go (done)
        if r.cache is not None:
            self.prompt_caches.checkin(r.cache)
        with self._cond:
            if r in self._batch:
                self._batch.remove(r)
        if outcome == "cancelled" and r.last is None:
            outcome = "dropped"  # cancelled before any step ran
        stats = r.last.stats if r.last is not None else None
        self.metrics.record_generation(outcome, stats)
        self._finish(r.job, outcome, error, record=False)

    def _finish(self, job: Job, outcome: str, error: BaseException | None = None, record: bool = True) -> None:
        with self._cond:
            if job.finished.is_set():
                return
            job.finished.set()
            self._admitted -= 1
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
