"""How long work reports itself: bars on a terminal, a line per phase elsewhere, or nothing.

Downloads draw huggingface_hub's own tqdm bars on a terminal (snapshot_download's, and one
per ranged read); in a log or a pipe those bars would be a stream of carriage returns, so
they are switched off and each phase prints one line instead. ``quiet`` prints nothing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, TextIO


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None):
        if mode not in ("auto", "bars", "lines", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bars" if self.stream.isatty() else "lines"
        self.mode = mode

    @classmethod
    def silent(cls) -> "Progress":
        return cls("quiet")

    @property
    def bars(self) -> bool:
        return self.mode == "bars"

    def phase(self, text: str) -> None:
        """One line saying what starts now (bars, if any, draw below it)."""
        if self.mode != "quiet":
            print(text, file=self.stream, flush=True)

    @contextmanager
    def hub_bars(self) -> Iterator[None]:
        """huggingface_hub's progress bars on while inside, only when drawing bars."""
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        if self.bars:
            enable_progress_bars()
        else:
            disable_progress_bars()
        try:
            yield
        finally:
            (disable_progress_bars if was_disabled else enable_progress_bars)()

    def byte_bar(self, total: int, desc: str):
        """A bytes bar (huggingface_hub's tqdm) on a terminal; a do-nothing stand-in elsewhere."""
        if self.bars:
            from huggingface_hub.utils import tqdm

            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream)
        return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass
