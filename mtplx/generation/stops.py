"""Stop strings: checked once, then found in the streamed text across chunk boundaries.

The cut is a function of the whole text, not of how it arrived: MTP emits several tokens per
step, and a step's text may hold more than one stop string, so the scanner takes the stop that
is complete first in the text (the earliest end; of two ending at the same character, the
longer), whatever the order of the list. That is also where a reader going character by
character would stop, so AR, MTP at any depth and any chunking cut at the same place.
"""

from __future__ import annotations

from typing import Any, Sequence

from mtplx.errors import MtplxError


def check_stop(stop: Any) -> list[str]:
    """Stop strings as a list: ``None`` is none, one string is one stop (as OpenAI's API takes it)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    stops = list(stop) if isinstance(stop, (list, tuple)) else [stop]
    for s in stops:
        if not isinstance(s, str):
            raise MtplxError(f"stop must be a string or a list of strings, and it holds {s!r}",
                             fix="pass stop strings, e.g. stop=['\\n\\n']")
    return stops


class StopScanner:
    """Finds stop strings across chunk boundaries and holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        # Text that may be the start of a stop is held back until it cannot be.
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, segment: str, final: bool = False) -> tuple[str, bool]:
        """Add ``segment``; returns (text that is now safe to emit, whether a stop was found).
        ``final`` releases the held-back tail (nothing more will come)."""
        self.text += segment
        best: tuple[int, int, str] | None = None  # (end, -length, stop): the earliest end, then the longest
        for s in self.stops:
            # Text before `sent` held no complete stop (the hold-back guarantees it), so a match
            # starts no earlier than len(s) characters before it.
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1 and (best is None or (at + len(s), -len(s)) < best[:2]):
                best = (at + len(s), -len(s), s)
        if best is not None:
            end, _, s = best
            at = end - len(s)
            out = self.text[self.sent : at]
            self.sent = at
            self.matched = s
            return out, True
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out, False
