"""`mtplx serve`: an OpenAI-compatible HTTP API on one model (FastAPI + uvicorn)."""

from __future__ import annotations

import ipaddress
import socket

import click

from mtplx.cli.options import DistributedOptions, distributed_options, force_option, load_model, model_option
from mtplx.errors import MtplxError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Fail with one clear sentence before loading anything, rather than uvicorn's log line
    after the model is in memory. (A race with another process is still possible; uvicorn
    reports that case itself.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            raise MtplxError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                             fix="choose another --port or stop the process using it") from e


@click.command("serve")
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server, unauthenticated, to the network.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--depth", "-d", type=click.IntRange(0, 8), default=None,
              help="Default draft depth (default: tuned, else the contract's). Requests may override it.")
@click.option("--no-mtp", is_flag=True, help="Plain autoregressive decoding only (depth 0).")
@click.option("--queue-size", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Requests that may wait behind the running one; beyond that the server answers 429.")
@click.option("--max-tokens-default", type=click.IntRange(1), default=512, show_default=True,
              help="max_tokens for requests that do not set it.")
@click.option("--model-id", default=None, help="Name reported by /v1/models and in responses (default: --model).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@force_option
@distributed_options
def serve(model_ref: str, host: str, port: int, depth: int | None, no_mtp: bool, queue_size: int,
          max_tokens_default: int, model_id: str | None, log_level: str, force: bool, distributed: DistributedOptions | None) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /metrics).

    One generation runs at a time; up to --queue-size more wait their turn. Point any OpenAI
    client at http://HOST:PORT/v1 (the API key is not checked).
    """
    import uvicorn

    from mtplx.server.app import create_app

    if no_mtp and depth:
        raise click.UsageError("--no-mtp decodes at depth 0; drop --depth or --no-mtp")
    if not is_loopback(host):
        click.echo(f"warning: binding to {host}: anyone who can reach this machine on port {port} can use the "
                   "model; the server has no authentication.", err=True)
    _check_port(host, port)  # with --distributed only rank 0 listens, but every rank checks: they run alike
    model, tokenizer = load_model(model_ref, mtp=not no_mtp, force=force, distributed=distributed)
    app = create_app(model, tokenizer, model_id=model_id or model_ref, depth=0 if no_mtp else depth,
                     queue_size=queue_size, max_tokens_default=max_tokens_default)
    shown = f"[{host}]" if ":" in host else host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else shown  # a wildcard is not an address to visit
    base = f"http://{shown}:{port}/v1"
    click.echo(f"mtplx serving {model_id or model_ref} at {base}  (queue {queue_size}, Ctrl-C to stop)")
    click.echo(f"try: curl {base}/chat/completions -H 'Content-Type: application/json' "
               f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'")
    # A short graceful-shutdown window: open streams are cancelled (which frees the engine)
    # instead of Ctrl-C waiting for a long generation to finish.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)


COMMANDS = [serve]
