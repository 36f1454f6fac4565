"""The `mtplx` click group: every command registered, and what each kind of failure prints.

A mistake the user can fix (an :class:`MtplxError`, a knob out of range) is one line and exit
1; click's usage errors keep click's form and exit 2; Ctrl-C is one line and exit 130; a reader
that closed the pipe (`mtplx models | head -1`) ends the command quietly with exit 141; only an
unexpected exception says "bug" (set MTPLX_DEBUG=1 to see its traceback). The console entry
point, with its guard around the imports, is :mod:`mtplx.cli.main`.
"""

from __future__ import annotations

import os
import sys

import click

from mtplx._version import __version__
from mtplx.cli.broken_pipe import reader_gone
from mtplx.cli.ctrl_c import from_ctrl_c, interrupted
from mtplx.errors import MtplxError


class MtplxGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MtplxError as e:
            click.echo(f"mtplx: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            interrupted()
        except BrokenPipeError:  # before Exception: the reader left, nothing went wrong here
            reader_gone()
        except click.exceptions.Abort as e:
            if from_ctrl_c(e):
                interrupted()
            raise
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("MTPLX_DEBUG"):
                raise
            click.echo(f"mtplx: error: unexpected {type(e).__name__}: {e}. This is a bug in mtplx; "
                       "rerun with MTPLX_DEBUG=1 to see the traceback and report it.", err=True)
            sys.exit(2)


@click.group(cls=MtplxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtplx")
def cli() -> None:
    """mtplx: faster local Qwen3.5/3.6 decoding on MLX with the model's own MTP head.

    Speculative decoding with exact rejection sampling: the output law is the model's own, on
    every backend. Greedy output is identical to plain greedy decoding where the backend rounds
    a T-row verify pass as T single-row steps (true on MLX's CPU backend, measured by the
    tests); `mtplx doctor --exactness` measures it on yours. Start with `mtplx start`
    (interactive) or `mtplx run --model demo "def fib(n):"`.
    """


def _register() -> None:
    from mtplx.cli import bench_cmd, doctor_cmd, graft_cmd, info_cmd, run_cmd

    for module in (run_cmd, bench_cmd, graft_cmd, info_cmd, doctor_cmd):
        for command in module.COMMANDS:
            cli.add_command(command)
    for optional in ("mtplx.cli.start_cmd", "mtplx.cli.serve_cmd", "mtplx.cli.launch_cmd"):
        try:
            module = __import__(optional, fromlist=["COMMANDS"])
        except ImportError:
            continue
        for command in module.COMMANDS:
            cli.add_command(command)


_register()
