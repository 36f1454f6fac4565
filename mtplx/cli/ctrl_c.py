"""What Ctrl-C does to any `mtplx` command: one line on stderr, exit 130, never a traceback.

Standard library only: the entry point (:mod:`mtplx.cli.main`) uses this before anything else
is imported.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

INTERRUPTED = "mtplx: interrupted"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


def interrupted(*_signal_args: object) -> NoReturn:
    """End the process after Ctrl-C. Also usable as a SIGINT handler (it ignores its arguments)."""
    # A second Ctrl-C while the interpreter shuts down would print a traceback from wherever it
    # lands; ignore it, the user's intent is already being carried out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    # On a terminal the ^C echo (or a half-printed reply) ends the line; start a fresh one.
    lead = "\n" if sys.stderr.isatty() else ""
    sys.stderr.write(f"{lead}{INTERRUPTED}\n")
    sys.stderr.flush()
    sys.exit(EXIT_INTERRUPTED)


def from_ctrl_c(e: BaseException) -> bool:
    """Whether click turned a Ctrl-C into this Abort (click.prompt raises Abort from None, which
    still records the KeyboardInterrupt as the context)."""
    return isinstance(e.__cause__, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt)
