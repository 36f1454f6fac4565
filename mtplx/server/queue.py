"""One model, one engine thread stepping a batch of rows, a bounded queue in front of it.

Continuous batching: the engine thread owns a decoder (``mtplx.server.decoders``: the batched
decoder, with room for ``--max-batch`` rows, 1 included) and loops: take waiting jobs into the
batch while there is room (``--max-batch`` rows, and the memory their caches need, see
``capacity``), run one step of every row, hand each row's new text to its request, and let rows
leave at once when they finish (end of sequence, max_tokens, a stop string) or are cancelled (the
client left). A row joins and leaves at a step boundary, so the others pause for at most one
step. Each row carries its own sampler, seed, grammar, logprobs, stop strings and prompt cache;
its text is made by its own :class:`~mtplx.generation.row_text.RowText`.

Why one thread: MLX work blocks for a whole step, and keeping it on one long-lived thread means
the event loop stays free to accept, reject (429) and stream, and MLX always runs on the same
thread.

A failing row fails alone: an exception while a row joins (its prompt cache, its checks), in its
own host work during a step (its grammar: ``decoders.GuardedConstraint``; its text) or while it
leaves ends that row's request with the error, and the other rows go on unchanged. Only an
exception from the batched step itself ends every row in it; the thread lives on with a fresh
decoder. If the thread ever exits otherwise, every request it holds hears why at once, /health
answers 503 and new requests are refused (``died``).

Admission is counted once, at submit: a job holds a place from the moment it is admitted until
it finishes, and at most ``max_batch + max_queue`` places exist, so how many simultaneous
requests are admitted never depends on how far the engine thread has got (issue 21, row 15).

Shutting down (``drain``, then ``end_running``, then ``stop``): no more admissions, queued jobs
end at once with :class:`ShuttingDown`, running rows may finish, and whatever still runs when
the caller's deadline passes ends with :class:`ShuttingDown` too. Each job ended meanwhile is
logged on one line.

Handing results back: the engine thread pushes :class:`Event` objects into each job's asyncio
queue with ``loop.call_soon_threadsafe``; the request handler awaits them. Cancelling is a flag
the engine thread reads between steps, so a client that leaves frees its row after at most one
more step, and a job cancelled while it is still queued is removed and never runs.
"""

from __future__ import annotations

import asyncio
import itertools
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
from mtplx.server.decoders import GuardedConstraint, make_decoder
from mtplx.server.metrics import Metrics

log = logging.getLogger("mtplx.server")


class QueueFull(Exception):
    """Every queue slot is taken; the caller answers 429."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work."""


class EngineStopped(ShuttingDown):
    """The engine thread exited on an error: nothing more can be generated until a restart."""


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
    channel back to the event loop that created it. ``id`` names it in the log."""

    _ids = itertools.count(1)

    def __init__(self, ids: list[int], kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 boundaries: tuple[int, ...] = ()):
        self.id = next(self._ids)
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
    guard: GuardedConstraint | None = None
    last: GenerationResponse | None = None

    @property
    def failed(self) -> BaseException | None:
        """The exception its own host work raised during a step (its grammar), if any."""
        return self.guard.error if self.guard is not None else None


class Scheduler:
    """A bounded FIFO of jobs and the engine thread that decodes them in a batch.

    ``max_batch`` rows decode together; ``max_queue`` more may wait. With the defaults (a batch
    sized from memory, queue 8), ``max_batch + 8`` requests can be in the server at once and the
    next gets a 429.
    """

    def __init__(self, model: Any, tokenizer: Any, metrics: Metrics, max_queue: int = 8,
                 prompt_caches: PromptCacheLRU | None = None, max_batch: int = 1,
                 capacity: Capacity | None = None, prefill_chunk: int | None = None):
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
        self.prefill_chunk = prefill_chunk
        self.capacity = capacity
        self._pending: deque[Job] = deque()
        self._admitted = 0  # jobs holding a place: waiting, joining or in the batch
        self._batch: list[_Row] = []  # engine thread only (its length is read for metrics)
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False  # shutting down: no admissions; running rows may finish
        self._end_running: ShuttingDown | None = None  # the drain's deadline passed: end the rows with it
        self._died: BaseException | None = None  # why the engine thread exited, if it did on an error
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
    def admitted(self) -> int:
        """Jobs holding a place: waiting, joining or decoding."""
        with self._cond:
            return self._admitted

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._died is None

    @property
    def accepting(self) -> bool:
        """Whether a new job would be admitted (room aside): the engine runs and no shutdown began."""
        return self.alive and not (self._draining or self._stopping)

    @property
    def shutting_down(self) -> bool:
        """A shutdown began (and the engine did not die: see :attr:`died`)."""
        return (self._draining or self._stopping) and self._died is None

    @property
    def died(self) -> BaseException | None:
        """The exception that ended the engine thread, if one did."""
        return self._died

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.alive:
            return
        with self._cond:
            self._stopping = self._draining = False
            self._end_running, self._died = None, None
        self._thread = threading.Thread(target=self._work, name="mtplx-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Shutdown's first stage: refuse new jobs, end the queued ones now with
        :class:`ShuttingDown`; the rows decoding go on (see :meth:`end_running`)."""
        with self._cond:
            self._draining = True
            pending, self._pending = list(self._pending), deque()
            running = len(self._batch)
        log.warning("mtplx: shutting down: %d queued request(s) end now, %d running may finish", len(pending), running)
        for job in pending:
            job.cancelled.set()
            self._finish(job, "dropped", ShuttingDown("the server is shutting down; retry on another server or later"))

    def end_running(self, why: str = "the server is shutting down and this generation did not finish in time") -> None:
        """Shutdown's deadline: the engine thread ends every running row with :class:`ShuttingDown`
        at its next step boundary."""
        with self._cond:
            self._draining = True
            self._end_running = ShuttingDown(why)
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, end queued ones with an error, end the running rows, and wait for
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
            if self._died is not None:
                raise EngineStopped(self._why_dead())
            if self._stopping or self._draining or not self.alive:
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
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - whatever ends the thread, every request must hear it
            with self._cond:
                self._died = e
            log.critical("mtplx engine: the engine thread stopped (%s: %s). Every request it held ends with an "
                         "error, new ones get 503 and /health answers 503: restart the server.",
                         type(e).__name__, e, exc_info=e)
            self._end_all(EngineStopped(self._why_dead()))

    def _why_dead(self) -> str:
        e = self._died
        return f"the server's engine stopped ({type(e).__name__}: {e}); the server must be restarted"

    def _loop(self) -> None:
        decoder = make_decoder(self.model, self.max_batch, self.prefill_chunk)
        while True:
            with self._cond:
                while not self._pending and not self._batch and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = self._take()
                ending = self._end_running
            for job in joining:
                self._join(decoder, job)  # a request that cannot join fails alone
            if ending is not None:
                for r in list(self._batch):
                    self._leave(decoder, r, "cancelled", ending)
            self._leave_cancelled(decoder)
            if self._batch:
                decoder = self._step(decoder)
        for r in list(self._batch):  # stopping: every row still running ends
            self._leave(decoder, r, "cancelled", ShuttingDown("the server is shutting down"))

    def _end_all(self, error: BaseException) -> None:
        """The thread is gone: every job it held, queued or running, ends with ``error`` now."""
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            rows, self._batch = list(self._batch), []
        for r in rows:  # (their prompt caches are dropped: their state is unknown)
            r.job.cancelled.set()
            self._finish(r.job, "error", error)
        for job in pending:
            job.cancelled.set()
            self._finish(job, "dropped", error)

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
        cache = None
        added = False
        try:
            if self.prompt_caches is not None:
                cache = self.prompt_caches.checkout(job.ids)
            spec = row_spec(self.model, self.tokenizer, EncodedPrompt(job.ids, job.boundaries), prompt_cache=cache,
                            **job.kwargs)
            guard = None
            if spec.constraint is not None:
                spec.constraint = guard = GuardedConstraint(spec.constraint)
            text = RowText(self.tokenizer, spec)
            added = True
            row = decoder.add(spec)
        except Exception as e:  # noqa: BLE001 - reported to the client, the engine thread lives on
            if cache is not None and not added:  # untouched: it still serves its conversation
                self._checkin(cache)
            # (one the decoder began to prepare is dropped: its state is unknown)
            self.metrics.record_generation("error")
            self._finish(job, "error", e, record=False)
            return
        with self._cond:
            self._batch.append(_Row(job, spec, text, row, cache, job.need, guard))

    def _checkin(self, cache: PromptCache) -> None:
        try:
            self.prompt_caches.checkin(cache)
        except Exception:  # noqa: BLE001 - the cache is dropped; the request is not at fault
            log.exception("mtplx engine: returning a prompt cache to the LRU failed; it is dropped")

    def _leave_cancelled(self, decoder: Any) -> None:
        for r in [r for r in self._batch if r.job.cancelled.is_set()]:
            self._leave(decoder, r, "cancelled")

    def _step(self, decoder: Any) -> Any:
        """One step of every row; returns the decoder to step next. A row whose own work fails
        (its grammar, its text) leaves with its error; a failure of the batched step itself ends
        every row in it, and a fresh decoder takes the next rows."""
        self.metrics.record_batch(len(self._batch))
        try:
            out = decoder.step()
        except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one step
            log.exception("mtplx engine: a batched step failed; its %d row(s) end with an error", len(self._batch))
            for r in list(self._batch):  # whoever waits on these rows must still hear "done"
                self._leave(decoder, r, "error", e)
            return make_decoder(self.model, self.max_batch, self.prefill_chunk)
        by_row = {id(r.row): r for r in self._batch}
        for row, emitted in out:
            r = by_row.get(id(row))
            if r is None or r.failed is not None:
                continue  # a failed row's output is discarded (it leaves below)
            try:
                r.last = r.text.feed(emitted.tokens, row.stats, emitted.logprobs)
            except Exception as e:  # noqa: BLE001 - its detokenizer or stop scan: this row only
                self._leave(decoder, r, "error", e)
                continue
            if r.text.finish:
                self._leave(decoder, r, "completed", final=r.last)
            else:
                r.job.emit(Event("chunk", response=r.last))
        for r in list(self._batch):
            failed = r.failed or getattr(r.row, "error", None)  # (a decoder may end one row on its own error)
            if failed is not None:
                self._leave(decoder, r, "error", failed)
            elif r.row.done:
                try:  # the engine ended the row without a finish of the text's (the context is full)
                    r.last = r.text.end(r.row.stats)
                except Exception as e:  # noqa: BLE001 - this row only
                    self._leave(decoder, r, "error", e)
                    continue
                self._leave(decoder, r, "completed", final=r.last)
        return decoder

    def _leave(self, decoder: Any, r: _Row, outcome: str, error: BaseException | None = None,
               final: GenerationResponse | None = None) -> None:
        """``r`` leaves the batch now: its decoder row goes, its prompt cache returns to the LRU,
        its request hears ``final`` (its last chunk, for a completed row) and the outcome. A
        failure here ends the request with that error instead of a completion."""
        with self._cond:
            if r in self._batch:
                self._batch.remove(r)
        try:
            decoder.remove(r.row)  # a no-op for a row the decoder already let go (done)
            if r.cache is not None:
                self.prompt_caches.checkin(r.cache)
        except Exception as e:  # noqa: BLE001 - this row only
            if error is None:
                outcome, error, final = "error", e, None
            else:
                log.exception("mtplx engine: a row failed (%s), and so did its leaving", type(error).__name__)
        if outcome == "cancelled" and r.last is None and error is None:
            outcome = "dropped"  # cancelled before any step ran
        stats = r.last.stats if r.last is not None else None
        self.metrics.record_generation(outcome, stats)
        if final is not None:
            r.job.emit(Event("chunk", response=final))
        self._finish(r.job, outcome, error, record=False)

    def _finish(self, job: Job, outcome: str, error: BaseException | None = None, record: bool = True) -> None:
        with self._cond:
            if job.finished.is_set():
                return
            job.finished.set()
            self._admitted -= 1
            shutting_down = self._draining or self._stopping
        if record:
            self.metrics.record_generation(outcome)
        if shutting_down or isinstance(error, ShuttingDown):
            said = f": {error}" if error is not None else ""
            log.warning("mtplx: shutdown: request %d (%d prompt tokens) ended %s%s", job.id, len(job.ids), outcome, said)
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
