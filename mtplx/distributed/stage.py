"""The two kinds of pipeline stage a :class:`~mtplx.model.trunk.Trunk` can be.

The trunk walks its own layer range and asks its stage for the pass's input (``enter``) and
to pass the output on (``leave``).

- :class:`LeaderStage` (rank 0, the last layers, the lm_head and the MTP head): a pass starts
  by sending the control message (block tokens, and the decision on the previous verify) down
  the pipeline, then waits for the hidden state the other ranks computed. The engine above it
  is the single-process engine, unchanged: drafting, acceptance and sampling happen here.
- :class:`FollowerStage` (every other rank): the first stage (rank size-1) embeds the tokens
  of the control message, the others receive the previous rank's hidden state; each sends its
  output on. follow.py runs the loop that feeds it control messages.

Both count time per pass in two buckets, "step" (verify blocks and single-token AR steps) and
"prefill" (everything else), for ``mtplx bench --distributed``.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mtplx.distributed.link import Link
from mtplx.distributed.protocol import MESSAGE_SIZE, NO_DECISION, Control, Op
from mtplx.distributed.watchdog import DistributedError
from mtplx.model.trunk import cache_arrays

MIB = 1 << 20
# Seconds a process whose pipeline broke may take to report it and exit by itself.
BROKEN_GRACE = 5.0


def bucket(op: Op, length: int) -> str:
    return "step" if op is Op.VERIFY or length == 1 else "prefill"


@dataclass
class Counters:
    """Passes and seconds by bucket: ``compute`` is this rank's own work on a pass, ``wait``
    the time it spent waiting for the ranks before it (on the leader: for the whole pipeline)."""

    passes: dict[str, int] = field(default_factory=lambda: {"step": 0, "prefill": 0})
    compute: dict[str, float] = field(default_factory=lambda: {"step": 0.0, "prefill": 0.0})
    wait: dict[str, float] = field(default_factory=lambda: {"step": 0.0, "prefill": 0.0})

    def add(self, kind: str, compute: float, wait: float) -> None:
        self.passes[kind] += 1
        self.compute[kind] += compute
        self.wait[kind] += wait


# One row per rank in a STATS reply (float32).
ROW = ("rank", "first_layer", "end_layer", "step_passes", "step_compute_s", "step_wait_s", "prefill_passes",
       "prefill_compute_s", "prefill_wait_s", "weights_mib", "active_mib", "peak_mib")


@dataclass
class RankStats:
    rank: int
    layers: tuple[int, int]  # [first, end) of the trunk's layers this rank holds
    counters: Counters
    weights_mib: float
    active_mib: float
    peak_mib: float

    def row(self) -> list[float]:
        c = self.counters
        return [self.rank, *self.layers, c.passes["step"], c.compute["step"], c.wait["step"], c.passes["prefill"],
                c.compute["prefill"], c.wait["prefill"], self.weights_mib, self.active_mib, self.peak_mib]

    @classmethod
    def from_row(cls, row: list[float]) -> "RankStats":
        r = dict(zip(ROW, row))
        c = Counters(passes={"step": int(r["step_passes"]), "prefill": int(r["prefill_passes"])},
                     compute={"step": r["step_compute_s"], "prefill": r["prefill_compute_s"]},
                     wait={"step": r["step_wait_s"], "prefill": r["prefill_wait_s"]})
        return cls(int(r["rank"]), (int(r["first_layer"]), int(r["end_layer"])), c, r["weights_mib"], r["active_mib"],
                   r["peak_mib"])


class _Stage:
    def __init__(self, link: Link, layers: tuple[int, int], hidden_size: int, dtype: mx.Dtype, weights_bytes: int):
        self.link = link
        self.layers = layers
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.weights_bytes = weights_bytes
        self.counters = Counters()

    def stats(self) -> RankStats:
        return RankStats(self.link.rank, self.layers, copy.deepcopy(self.counters), self.weights_bytes / MIB,
                         mx.get_active_memory() / MIB, mx.get_peak_memory() / MIB)

    def _recv_hidden(self, length: int) -> tuple[mx.array, float]:
        return self.link.recv((1, length, self.hidden_size), self.dtype, "the hidden state of the block")


class LeaderStage(_Stage):
    """Rank 0. The engine's passes, heartbeats and stats requests share one lock, so a message
    and its answer are never interleaved with another's."""

    def __init__(self, link: Link, layers: tuple[int, int], hidden_size: int, dtype: mx.Dtype, weights_bytes: int):
        super().__init__(link, layers, hidden_size, dtype, weights_bytes)
        self.lock = threading.Lock()
        self._reset = True
        self._record: Any = None
        self._last_activity = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.broken: DistributedError | None = None
        self._broken_at = 0.0

    # -- the trunk's hooks --------------------------------------------------------------------

    def new_sequence(self) -> None:
        """The engine made a fresh cache: the other ranks drop theirs at the next pass."""
        self._reset = True
        self._record = None

    def enter(self, trunk: Any, tokens: mx.array, record: Any) -> mx.array:
        keep = NO_DECISION
        if self._record is not None:
            if self._record.accepted is None:
                raise DistributedError("a verify pass was not committed before the next pass: the other ranks cannot "
                                       "roll back to the same prefix")
            keep = self._record.accepted
        self._record = record
        ids = [int(t) for t in tokens.reshape(-1).tolist()]
        control = Control(Op.VERIFY if record is not None else Op.FORWARD, self._reset, keep, ids)
        self._reset = False
        with self.lock:
            try:
                self._send_control(control)
                if not control.inline:
                    self.link.send(mx.array(ids, dtype=mx.int32), "the block's tokens", stream=mx.cpu)
                hidden, waited = self._recv_hidden(len(ids))
            except DistributedError as e:
                # A command ends with this error; a server would answer the request with it and
                # go on, so the heartbeat ends the process if it is still there a little later.
                self.broken, self._broken_at = e, time.monotonic()
                raise
            self._last_activity = time.monotonic()
        self.counters.add(bucket(control.op, len(ids)), 0.0, waited)
        return hidden

    def leave(self, hidden: mx.array) -> mx.array:
        return hidden

    # -- control of the followers ---------------------------------------------------------------

    def gather_stats(self) -> list[RankStats]:
        """Every rank's counters and memory, by rank."""
        with self.lock:
            self._send_control(Control(Op.STATS))
            rows, _ = self.link.recv((self.link.size - 1, len(ROW)), mx.float32, "the other ranks' statistics",
                                     stream=mx.cpu)
        return [self.stats()] + sorted((RankStats.from_row(r) for r in rows.tolist()), key=lambda s: s.rank)

    def start_heartbeat(self) -> None:
        """While the engine is idle (a server between requests, a prompt being read), prove
        every few seconds that all ranks are there, so none waits out its deadline."""
        self._heartbeat = threading.Thread(target=self._beat, name="mtplx-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        """End the followers' loops (they exit); failures are ignored, the run is over anyway."""
        self._stopped.set()
        with self.lock:
            try:
                self._send_control(Control(Op.STOP))
            except DistributedError:
                pass

    def _send_control(self, control: Control) -> None:
        self.link.send(control.encode(), "a control message", stream=mx.cpu)

    def _beat(self) -> None:
        # This thread evaluates MLX arrays (the ping and its answer) while the engine thread
        # may be inside its own evaluation: MLX evaluates from several threads safely since
        # 0.31.2 (the floor in pyproject.toml), and tests/test_mlx_threads.py overlaps the two.
        # The lock keeps a ping from interleaving with the engine's own messages.
        interval = self.link.timeout / 4
        while not self._stopped.wait(min(interval / 4, 1.0)):
            if self.broken is not None and time.monotonic() - self._broken_at > BROKEN_GRACE:
                self._end(self.broken)
            if time.monotonic() - self._last_activity < interval or not self.lock.acquire(blocking=False):
                continue
            try:
                if self._stopped.is_set():
                    return
                self._send_control(Control(Op.PING))
                self.link.recv((1,), mx.int32, "the answer to a heartbeat", stream=mx.cpu)
                self._last_activity = time.monotonic()
            except DistributedError as e:
                self._end(e)
            finally:
                self.lock.release()

    @staticmethod
    def _end(error: DistributedError) -> None:
        """A rank is gone: end this process too, whatever else it is doing (a server)."""
        print(f"mtplx: error: {error}", file=sys.stderr, flush=True)
        os._exit(1)


class FollowerStage(_Stage):
    """Ranks 1 .. size-1: a range of layers and nothing else of the model's computation."""

    @property
    def first(self) -> bool:
        """The rank holding the first layers: it embeds tokens instead of receiving hiddens."""
        return self.link.rank == self.link.size - 1

    def new_sequence(self) -> None:
        pass

    def enter(self, trunk: Any, tokens: mx.array, record: Any) -> mx.array:
        if self.first:
            self._waited = 0.0
            return trunk.embed(tokens)
        hidden, self._waited = self._recv_hidden(tokens.shape[1])
        return hidden

    def leave(self, hidden: mx.array) -> mx.array:
        return mx.distributed.send(hidden.astype(self.dtype), self.link.downstream, group=self.link.group)

    def receive_control(self) -> Control:
        """The next control message, passed on to the next follower; a long block's tokens
        follow it to the first stage only."""
        message, _ = self.link.recv((MESSAGE_SIZE,), mx.int32, "the leader's next message", stream=mx.cpu)
        control = Control.decode(message.tolist())
        if self.link.downstream != 0:
            self.link.send(message, "a control message", stream=mx.cpu)
        if self.first and not control.inline:
            tokens, _ = self.link.recv((control.length,), mx.int32, "the block's tokens", stream=mx.cpu)
            control.tokens = tokens.tolist()
        return control

    def answer_ping(self) -> None:
        if self.link.downstream == 0:
            self.link.send(mx.array([1], dtype=mx.int32), "the answer to a heartbeat", stream=mx.cpu)

    def report_stats(self) -> None:
        """Append this rank's row to the rows of the ranks before it and pass them on."""
        rows = [self.stats().row()]
        if not self.first:
            earlier, _ = self.link.recv((self.link.size - 1 - self.link.rank, len(ROW)), mx.float32,
                                        "the other ranks' statistics", stream=mx.cpu)
            rows = earlier.tolist() + rows
        self.link.send(mx.array(rows, dtype=mx.float32), "statistics", stream=mx.cpu)

    def run_pass(self, trunk: Any, control: Control, cache: list, record: Any) -> None:
        """This rank's layers on one block; the output is on its way downstream on return."""
        t0 = time.perf_counter()
        tokens = mx.array([control.tokens], dtype=mx.int32) if self.first else mx.zeros((1, control.length), mx.int32)
        hidden, _ = trunk.hidden(tokens, cache, record)
        self.link.evaluate([hidden, *cache_arrays(cache)], "passing on the hidden state", self.link.downstream)
        elapsed = time.perf_counter() - t0
        self.counters.add(bucket(control.op, control.length), elapsed - self._waited, self._waited)
