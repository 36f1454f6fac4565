"""A progress bar for a chat turn's prefill, when it outlasts about a second.

`/thinking on` renders the whole history anew, so the next turn prefills all of it (27-57 s on
the demo for a long conversation) before its first token. The prefill runs inside the decoder
(mtplx/engine), which reports nothing until that token; rather than thread a callback through
the API and the engine, the chat knows both figures a bar needs: how many tokens are to be
prefilled (the prompt less what its prompt cache serves) and how fast this model prefilled on
the earlier turns. The bar is therefore an estimate, and says so; it is drawn by tqdm (already
installed as huggingface_hub's dependency) on standard error, from a thread, and erased when the
first token arrives.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

DELAY = 1.0  # seconds: a prefill expected (or found) to take longer than this gets a bar
TICK = 0.2


class PrefillBar:
    """``with PrefillBar(tokens, rate) as bar: ...; bar.stop()`` around the wait for the first
    token. ``rate``: prefill tokens per second seen before (None: not known yet, the bar then
    shows only the elapsed time). ``stop`` returns whether a bar was drawn (its line is erased,
    so the caller reprints what the line held)."""

    def __init__(self, tokens: int, rate: float | None, file: TextIO | None = None, delay: float = DELAY):
        self.tokens = tokens
        self.rate = rate if rate and rate > 0 else None
        self.file = file
        self.delay = delay
        self.bar: Any = None
        self.shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def estimate(self) -> float | None:
        return self.tokens / self.rate if self.rate else None

    def __enter__(self) -> "PrefillBar":
        if self.tokens <= 0:
            return self
        t0 = time.time()
        if self.estimate is not None and self.estimate > self.delay:
            self._open(t0)  # expected to be long: at once, before the wait
        self._thread = threading.Thread(target=self._run, args=(t0,), name="mtplx-prefill-bar", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _open(self, t0: float) -> None:
        from tqdm import tqdm

        if self.rate is not None:
            fmt = "{desc} (estimated from earlier turns): {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
        else:
            fmt = "{desc}: {elapsed}"
        self.bar = tqdm(total=self.tokens, desc=f"prefill of {self.tokens:,} tokens", unit="tok", leave=False,
                        file=self.file or sys.stderr, bar_format=fmt, dynamic_ncols=True, mininterval=TICK)
        # Its clock (time.time, as tqdm's) counts the whole wait, not from when it was drawn.
        self.bar.start_t = self.bar.last_print_t = t0
        self.shown = True

    def _run(self, t0: float) -> None:
        if self.bar is None:
            if self._stop.wait(self.delay):
                return  # the first token came first: no bar
            self._open(t0)
        while not self._stop.wait(TICK):
            elapsed = time.time() - t0
            # Never full before the first token: the estimate may be short, the end is not a guess.
            done = min(int(elapsed * self.rate), self.tokens - 1) if self.rate is not None else 0
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)
            else:
                self.bar.refresh()

    def stop(self) -> bool:
        """End the bar (erasing its line); returns whether one was drawn."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return self.shown
