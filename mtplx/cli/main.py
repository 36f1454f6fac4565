"""The console entry point (`mtplx = mtplx.cli.main:main`; ``python -m mtplx`` comes here too).

Ctrl-C at any moment ends the process with one line and exit 130, importing included. Until
:func:`main` runs, SIGINT goes to a handler that exits at once: a KeyboardInterrupt raised
while this module finishes importing, or as ``main()`` is called, would land outside any
``try`` and print a traceback. ``main`` then hands Ctrl-C back to Python as KeyboardInterrupt
(the chat stops a reply with it) and turns whatever reaches it into the same line and exit.
Only the interpreter's own start-up comes before this; it takes milliseconds. A write to a pipe
whose reader left (`mtplx models | head -1`) ends the process quietly, exit 141
(:mod:`mtplx.cli.broken_pipe`).

Import this module only to run the CLI (it sets that handler); the click group lives in
:mod:`mtplx.cli.commands`. Nothing here imports more than the standard library until ``main`` runs.
"""

from __future__ import annotations

import signal
import sys

from mtplx.cli.broken_pipe import reader_gone
from mtplx.cli.ctrl_c import from_ctrl_c, interrupted

try:
    _PREVIOUS = signal.signal(signal.SIGINT, interrupted)
except ValueError:  # imported outside the main thread: signals are not ours to set
    _PREVIOUS = None


def main(argv: list[str] | None = None) -> None:
    try:
        if _PREVIOUS is not None:
            signal.signal(signal.SIGINT, _PREVIOUS)
        code = _run(argv)
        # What is still buffered is written now, where a closed pipe can be caught, rather
        # than by the interpreter's last flush (which would print "Exception ignored").
        sys.stdout.flush()
        sys.exit(code)
    except KeyboardInterrupt:
        interrupted()
    except BrokenPipeError:  # the reader went away (`mtplx models | head -1`): stop quietly
        reader_gone()


def _run(argv: list[str] | None) -> int:
    import click

    from mtplx.cli.commands import cli

    # standalone_mode=False: click would print "Aborted!" and exit 1 for a Ctrl-C that lands
    # while it parses the command line; here every exit code is decided in one place.
    try:
        rv = cli.main(args=argv, prog_name="mtplx", standalone_mode=False)
    except click.exceptions.Abort as e:
        if from_ctrl_c(e):
            interrupted()
        click.echo("Aborted!", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    # --help and --version come back as their exit code; a command returns None.
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    main()
