"""Bounded waits between ranks: no rank of a run hangs when another dies or never joins.

A rank that dies outright closes its sockets, and the ring backend then fails every pending
send or receive of its neighbours at once: :func:`connection_lost` turns that into one clear
error. A rank that is alive but silent (a host that froze, a cable pulled, a peer that never
started) gives no such signal: a ring ``recv`` then waits forever, and ``mx.distributed.init``
waits for its neighbours holding the GIL. Those waits run under :meth:`Watchdog.waiting`: a
small process of its own (_watchdog_child.py) kills the rank with one line on stderr when the
deadline passes, and the rank's neighbours then see a closed socket and end too.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mtplx.errors import MtplxError

_CHILD = Path(__file__).with_name("_watchdog_child.py")


class DistributedError(MtplxError):
    """A distributed run cannot go on: a rank died, never joined, or disagrees with the others."""


def connection_lost(rank: int, peer: int, what: str) -> DistributedError:
    return DistributedError(f"rank {rank} lost its connection to rank {peer} while {what}: that rank stopped or its "
                            "host became unreachable, so the run ends on every rank",
                            fix="look at that rank's own output for the cause, then start the run again")


class Watchdog:
    """Deadlines for one rank's waits, enforced from outside the rank (see the module doc).

    Creating it routes this process's stderr through the watchdog process."""

    def __init__(self, rank: int):
        self.rank = rank
        read_end, write_end = os.pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_CHILD), str(os.getpid()), str(read_end)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(read_end,))
        os.close(read_end)
        sys.stderr.flush()
        self._stderr = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._armed = False
        atexit.register(self._finish)

    def arm(self, seconds: float, message: str) -> None:
        who = f"rank {self.rank}" if self.rank >= 0 else "this rank"
        line = " ".join(f"mtplx: error: {who}: {message}".split())
        self._send(f"arm {seconds:.3f} {line}\n")
        self._armed = True

    def disarm(self) -> None:
        if self._armed:
            self._send("disarm\n")
            self._armed = False

    @contextmanager
    def waiting(self, seconds: float, message: str) -> Iterator[None]:
        """Run the block with a deadline: past ``seconds``, ``message`` is printed and this
        process is killed."""
        self.arm(seconds, message)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        """No more deadlines (stderr keeps flowing through the watchdog until exit)."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()

    def _finish(self) -> None:
        """At exit: give stderr back and let the watchdog copy what is left before this
        process ends, so no line of it appears after the shell prompt."""
        self.close()
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._stderr, 2)  # the last writer of the relay pipe: the watchdog sees its end
        try:
            self._process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass

    def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line.encode())
        self._process.stdin.flush()
