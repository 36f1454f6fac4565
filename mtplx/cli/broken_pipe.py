"""What any `mtplx` command does when the reader of its output goes away (`mtplx models | head -1`):
stop quietly, as a Unix filter does, never "unexpected BrokenPipeError ... a bug".

Standard library only: the entry point (:mod:`mtplx.cli.main`) uses this before anything else
is imported.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

# 128 + SIGPIPE: what a shell reports for a filter the closed pipe stopped (`yes | head -1`), so a
# script under `set -o pipefail` sees the same status from mtplx as from any other filter.
EXIT_BROKEN_PIPE = 141


def reader_gone() -> NoReturn:
    """End the process after a write to a closed pipe: nothing printed (whoever reads stderr
    asked for the head of the output, not for a complaint), exit 141."""
    # Python flushes stdout once more on its way out; pointed at /dev/null, that flush cannot
    # fail again and print "Exception ignored ... BrokenPipeError" (with exit status 120).
    for stream in (sys.stdout, sys.stderr):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # closed, or replaced by an object with no descriptor
            pass
    sys.exit(EXIT_BROKEN_PIPE)
