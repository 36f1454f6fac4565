"""One rank's place in the ring, and its transfers: bounded in time, failures made clear.

Messages always travel from rank r to rank r-1 (mod size), the direction of mlx-lm's pipeline
(rank size-1 holds the first layers, rank 0 the last): the leader, rank 0, sends control to
rank size-1, which embeds the tokens and passes its hidden state to size-2, and so on back to
rank 0. Every rank therefore receives from ``upstream`` (r+1) and sends to ``downstream``
(r-1), the two neighbours the ring backend connects.
"""

from __future__ import annotations

import re
import time
from typing import Sequence

import mlx.core as mx

from mtplx.distributed.watchdog import DistributedError, Watchdog, connection_lost

# Seconds a rank waits for another before the run is ended (mtplx --distributed-timeout).
DEFAULT_TIMEOUT = 120.0


def is_backend_error(e: RuntimeError) -> bool:
    """An error of the distributed backend itself (its messages start with its tag), as opposed
    to one of the computation a transfer was evaluated with (an allocation failure, say)."""
    return re.match(r"\[(ring|jaccl|mpi|nccl)\]", str(e)) is not None


class Link:
    def __init__(self, group: mx.distributed.Group, watchdog: Watchdog, timeout: float = DEFAULT_TIMEOUT):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.upstream = (self.rank + 1) % self.size
        self.downstream = (self.rank - 1) % self.size
        self.watchdog = watchdog
        self.timeout = timeout

    def send(self, x: mx.array, what: str, stream: mx.Stream | mx.Device | None = None) -> None:
        """Send ``x`` downstream now (a send blocks once the socket's buffer is full)."""
        self.evaluate([mx.distributed.send(x, self.downstream, group=self.group, stream=stream)],
                      f"sending {what}", self.downstream)

    def recv(self, shape: Sequence[int], dtype: mx.Dtype, what: str, timeout: float | None = None,
             stream: mx.Stream | mx.Device | None = None) -> tuple[mx.array, float]:
        """Receive from upstream; returns (the array, seconds waited)."""
        x = mx.distributed.recv(shape, dtype, self.upstream, group=self.group, stream=stream)
        t0 = time.perf_counter()
        self.evaluate([x], f"waiting for {what}", self.upstream, timeout)
        return x, time.perf_counter() - t0

    def evaluate(self, arrays: list, what: str, peer: int, timeout: float | None = None) -> None:
        """``mx.eval(arrays)`` whose graph sends to or receives from ``peer``: at most
        ``timeout`` seconds, and a lost connection becomes one clear error."""
        seconds = self.timeout if timeout is None else timeout
        message = (f"no progress for {seconds:g} s while {what} (rank {peer}): that rank died, froze or cannot be "
                   "reached, so the run ends on every rank. If a single step can take longer on these machines, "
                   "raise --distributed-timeout")
        with self.watchdog.waiting(seconds, message):
            try:
                mx.eval(arrays)
            except RuntimeError as e:
                if not is_backend_error(e):
                    raise
                raise connection_lost(self.rank, peer, what) from e

    def gather(self, row: mx.array, what: str, timeout: float | None = None) -> mx.array:
        """Every rank's ``row``, stacked by rank (a collective: all ranks call it)."""
        out = mx.distributed.all_gather(row[None], group=self.group, stream=mx.cpu)
        seconds = self.timeout if timeout is None else timeout
        with self.watchdog.waiting(seconds, f"the other ranks did not answer within {seconds:g} s while {what}: "
                                            "a rank died, is still loading, or cannot be reached"):
            try:
                mx.eval(out)
            except RuntimeError as e:
                if not is_backend_error(e):
                    raise
                raise DistributedError(f"rank {self.rank} lost a connection while {what}: another rank stopped "
                                       "or its host became unreachable, so the run ends on every rank") from e
        return out
