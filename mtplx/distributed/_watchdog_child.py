"""The watchdog process of one rank (standard library only: started with ``python -I -S``).

It runs beside its rank for the whole run and does two things:

- Deadlines. The rank writes ``arm SECONDS MESSAGE`` before a wait on another rank and
  ``disarm`` after it. If a deadline passes, this process prints MESSAGE (one line) and kills
  the rank with SIGKILL. It has to be a separate process: a rank blocked in
  ``mx.distributed.init`` holds the GIL, so no thread of its own could run, and a ring
  ``recv`` whose peer is alive but silent never returns.
- Standard error. The rank's stderr comes through here, and the ring backend's own chatter
  about a lost peer ("[ring] Socket 7 was closed by the peer", eleven lines) is dropped, so a
  failure reads as the one line mtplx prints (unless MLX_RING_VERBOSE asks for it).

It ends when the rank closes its end of both pipes (the rank exited).
"""

import os
import select
import signal
import sys
import time

PREFIX = b"[ring] "


class Relay:
    """Copies bytes to ``out`` except whole lines that start with PREFIX."""

    def __init__(self, out: int, drop: bool):
        self.out = out
        self.drop = drop
        self.held = b""  # the start of a line that may turn out to be a ring line
        self.passing = False  # inside a line being copied
        self.dropping = False  # inside a line being dropped

    def feed(self, data: bytes) -> None:
        if not self.drop:
            self._write(data)
            return
        buf, self.held = self.held + data, b""
        while buf:
            if self.passing or self.dropping:
                end = buf.find(b"\n")
                chunk, buf = (buf, b"") if end < 0 else (buf[: end + 1], buf[end + 1 :])
                if self.passing:
                    self._write(chunk)
                if end >= 0:
                    self.passing = self.dropping = False
            elif buf.startswith(PREFIX):
                self.dropping = True
            elif PREFIX.startswith(buf):
                self.held = buf
                return
            else:
                self.passing = True

    def close(self) -> None:
        if self.held:
            self._write(self.held)
            self.held = b""

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.out, data):]
            except OSError:
                return


def main() -> None:
    parent, relay_fd = int(sys.argv[1]), int(sys.argv[2])
    control = sys.stdin.fileno()
    out = sys.stderr.fileno()
    relay = Relay(out, drop=not os.environ.get("MLX_RING_VERBOSE"))
    deadline, message, pending = None, b"", b""
    open_fds = [control, relay_fd]
    while open_fds:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(open_fds, [], [], timeout)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            relay.close()
            relay._write(message + b"\n")
            try:
                os.kill(parent, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if fd == relay_fd:
                if data:
                    relay.feed(data)
                else:
                    relay.close()
                    open_fds.remove(fd)
                continue
            if not data:  # the rank closed its watchdog: no more deadlines
                open_fds.remove(fd)
                deadline = None
                continue
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"arm "):
                    _, seconds, message = line.split(b" ", 2)
                    deadline = time.monotonic() + float(seconds)
                elif line == b"disarm":
                    deadline = None


if __name__ == "__main__":
    main()
