"""`mtplx serve`: OpenAI- and Anthropic-compatible HTTP APIs on one model (FastAPI + uvicorn)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import click

from mtplx.cli.options import (DistributedOptions, FiniteFloatRange, distributed_options, force_option, graft_if_needed,
                               knob, kv_options, load_model, lookup_option, model_option, strict_options,
                               yes_option)
from mtplx.errors import MtplxError


def split_names(values: tuple[str, ...], option: str = "--served-model-name") -> list[str]:
    """Repeatable options that also take comma-separated lists: ('a,b', 'c') -> [a, b, c]. An
    empty name ('', ',', 'a,,b') is refused, naming ``option``: dropped silently, an option that
    names nothing would fall back to the defaults the user meant to replace."""
    names = [n.strip() for v in values for n in v.split(",")]
    if not all(names):
        given = " ".join(repr(v) for v in values)
        raise click.BadParameter(f"{given} holds an empty name: give NAME or NAME,NAME,... with no empty item",
                                 param_hint=f"'{option}'")
    return names


# Claude Code asks for its own model names (a Sonnet for the session, a Haiku for background
# tasks): a server of one model answers them by default, so the agent works unconfigured.
AGENT_MODEL_PATTERNS = ("claude-*",)


def default_served_names(model_ref: str) -> list[str]:
    """The names a server answers to by default: the --model value as typed, for a local
    directory also its last component (what people call the model), and the coding agents'
    own model names (AGENT_MODEL_PATTERNS)."""
    names = [model_ref]
    path = Path(model_ref).expanduser()
    if path.is_dir() and path.resolve().name not in names:
        names.insert(0, path.resolve().name)
    return names + list(AGENT_MODEL_PATTERNS)


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
            raise MtplxError(f"cannot listen on {host}:{port}: {e.strerror or e}", fix=_bind_fix(e, host)) from e


def _bind_fix(e: OSError, host: str) -> str:
    """The fix that fits why the bind failed: the address (no such name, not this machine's),
    the port's privilege, or the port in use."""
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        return (f"{host!r} is not an address of this machine: pass --host 127.0.0.1 (this machine only), 0.0.0.0 "
                "(every network interface) or one of this machine's own addresses")
    if e.errno == errno.EACCES:
        return "ports below 1024 need administrator rights: choose a --port from 1024 up"
    if e.errno == errno.EADDRINUSE:
        return "choose another --port or stop the process using it"
    return "check --host and --port"


def _size(n: int) -> str:
    """Bytes for the banner in a unit that shows them (--prompt-cache-gb 0.005 is 5.1 MiB, not
    "0.0 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _disk_dir(value: str | None, disk_gb: float | None, no_cache: bool, distributed: bool) -> Path | None:
    """The prompt caches' disk folder (None: none), checked writable before the model loads."""
    from mtplx.artifact.paths import prompt_cache_dir

    off = (value is not None and value.strip().lower() == "none") or disk_gb == 0
    if no_cache or distributed:
        if (value is not None and not off) or disk_gb:
            why = "--no-prompt-cache (or --prompt-cache-gb 0)" if no_cache else "--distributed"
            raise click.UsageError(f"the disk tier keeps the prompt caches' snapshots, and {why} turns them off: "
                                   "drop --prompt-cache-dir / --prompt-cache-disk-gb")
        return None
    if off:
        return None
    path = Path(value).expanduser() if value is not None else prompt_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:
        raise MtplxError(f"the prompt cache folder cannot be created ({e.strerror or e})", path=path,
                         fix="pass --prompt-cache-dir a folder you can write to, or 'none'") from None
    if not writable:
        raise MtplxError("the prompt cache folder is not writable", path=path,
                         fix="pass --prompt-cache-dir a folder you can write to, or 'none'")
    return path


def _strict_note(model: object, no_mtp: bool, batch: int, margin: float) -> str:
    """What --strict-greedy will do on this server, said once at start: it acts on greedy
    (temperature 0) requests only, and with --no-mtp only on rows decoded together."""
    from mtplx.api import sampling_from

    default_t = sampling_from(model, None, None, None, None).temperature
    where = "requests at temperature 0"
    if no_mtp and batch == 1:
        return ("note: --strict-greedy changes nothing with --no-mtp at batch 1: every token already comes from a "
                "one-row decode step")
    if no_mtp:
        where += " while they decode together with others (with --no-mtp a lone row decodes one row at a time)"
    default = ("requests that set no temperature are greedy (this model's default)" if default_t == 0 else
               f"requests that set no temperature sample at {default_t:g}, whose law is exact without it")
    return f"strict greedy (margin {margin:g}) applies to {where}; {default}"


@click.command("serve")
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server, unauthenticated, to the network.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--depth", "-d", default=None, metavar="N|auto", callback=knob("depth", text=True),
              help="Default draft depth: auto (the default unless `mtplx tune` saved one), 0 = plain AR, or N. "
                   "Requests may override it.")
@click.option("--no-mtp", is_flag=True, help="Plain autoregressive decoding only (depth 0).")
@click.option("--queue-size", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Requests that may wait beyond the --max-batch decoding ones: the server holds at most "
                   "max-batch + queue-size requests at once and answers 429 beyond that, however they arrive.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Requests decoded together, each row at its own acceptance (continuous batching: a request "
                   "joins and leaves at a step boundary). Default: as many rows of 8K tokens as half the memory "
                   "left after the weights and the prompt caches holds, at most 8. 1: one at a time.")
@click.option("--max-tokens-default", type=click.IntRange(1), default=None,
              help="max_tokens for requests that do not set it. Default: as many as the context leaves after "
                   "the prompt, as OpenAI's and Anthropic's APIs do (Codex sends no limit; a 512 default cut its "
                   "answers short), and never more than this machine's memory holds after the prompt.")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME[,NAME...]",
              help="Model names requests may ask for (repeatable or comma-separated; the first is reported in "
                   "responses); a name with * or ? is a pattern ('claude-*'). Other names get 404 model_not_found. "
                   "Default: --model as given, a directory's name, and 'claude-*' (Claude Code's own names).")
@click.option("--allowed-hosts", multiple=True, metavar="NAME[,NAME...]",
              help="Host header names accepted besides localhost/127.0.0.1/::1 (repeatable or comma-separated; "
                   "'*' accepts any). A loopback server refuses other names with 403 (DNS rebinding); a server "
                   "bound to another address checks Host only when this is given.")
@click.option("--max-body-mb", type=FiniteFloatRange(0.001, 1024), default=8, show_default=True,
              help="Largest request body read, in MiB; larger requests get 413 before they are read.")
@click.option("--prompt-cache-gb", type=FiniteFloatRange(0.0, 4096), default=None,
              help="Memory for the prompt caches of recent conversations (a request that extends one prefills "
                   "only its new tokens); least recently used go first. Default: a tenth of the machine's memory.")
@click.option("--no-prompt-cache", is_flag=True, help="Prefill every request in full (no prompt cache).")
@click.option("--prompt-cache-dir", default=None, metavar="DIR|none",
              help="Where prompt caches are also kept on disk, so a conversation resumes after a restart without "
                   "prefilling again (docs/prompt-cache.md#disk-tier); 'none' keeps them in memory only. "
                   "Default: prompt-cache/ in mtplx's cache folder (MTPLX_CACHE, ~/.cache/mtplx).")
@click.option("--prompt-cache-disk-gb", type=FiniteFloatRange(0.0, 1 << 20), default=None,
              help="Disk for those caches, in GiB; least recently used go first. 0 keeps them in memory only. "
                   "Default: 10, or a quarter of the free disk space if that is less.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--prefill-chunk", type=click.IntRange(1, 1 << 16), default=None,
              help="Prompt tokens a joining request prefills per step; running requests wait that long between "
                   "their tokens while a long prompt joins. Default: the API's own chunk, 64 on MLX's CPU backend "
                   "and 2048 on a GPU (docs/batching.md gives the measured trade-off).")
@click.option("--shutdown-timeout", type=FiniteFloatRange(0, 3600), default=30, show_default=True,
              help="Seconds running generations may take to finish on SIGTERM or Ctrl-C; new requests get 503 and "
                   "queued ones an error at once, and those still running past this end with an error.")
@strict_options
@lookup_option
@kv_options
@force_option
@yes_option
@distributed_options
def serve(model_ref: str, host: str, port: int, depth: int | str | None, no_mtp: bool, queue_size: int,
          max_batch: int | None, max_tokens_default: int | None, served_model_names: tuple[str, ...],
          allowed_hosts: tuple[str, ...],
          max_body_mb: float, prompt_cache_gb: float | None, no_prompt_cache: bool, log_level: str,
          prompt_cache_dir: str | None, prompt_cache_disk_gb: float | None,
          shutdown_timeout: float, prefill_chunk: int | None, strict_greedy: bool | float, lookup: int | str,
          kv_bits: int | None, kv_group_size: int, force: bool, yes: bool,
          distributed: DistributedOptions | None) -> None:
    """Serve MODEL over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), the
    Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages,
    /v1/messages/count_tokens), with /health and /metrics.

    Up to --max-batch generations decode together; up to --queue-size more wait their turn. Point any OpenAI
    client at http://HOST:PORT/v1, or an Anthropic client at http://HOST:PORT (the API key is
    not checked).
    """
    from mtplx.engine.strict import check as strict_check
    from mtplx.server import http
    from mtplx.server.app import create_app
    from mtplx.server.guards import is_loopback_name

    if no_mtp and depth not in (None, 0):
        raise click.UsageError("--no-mtp decodes at depth 0; drop --depth or --no-mtp")
    if no_prompt_cache and prompt_cache_gb:
        raise click.UsageError("--no-prompt-cache turns the cache off; drop --prompt-cache-gb or --no-prompt-cache")
    if distributed is not None and prompt_cache_gb:
        raise click.UsageError("--prompt-cache-gb is not supported with --distributed (prompt caches stay off)")
    cache_bytes = 0 if no_prompt_cache else None if prompt_cache_gb is None else int(prompt_cache_gb * 2**30)
    disk_dir = _disk_dir(prompt_cache_dir, prompt_cache_disk_gb, no_prompt_cache or cache_bytes == 0,
                         distributed is not None)
    disk_bytes = None if prompt_cache_disk_gb is None else int(prompt_cache_disk_gb * 2**30)
    if distributed is not None and max_batch is not None and max_batch > 1:
        raise click.UsageError("--max-batch above 1 is not supported with --distributed (every rank would have to "
                               "step the same rows): drop --max-batch")
    if distributed is not None:  # a prompt cache's forks and snapshots would have to reach every rank
        cache_bytes = 0
        max_batch = 1
    names = split_names(served_model_names) or default_served_names(model_ref)
    hosts = split_names(allowed_hosts, "--allowed-hosts")
    loopback = is_loopback_name(host.strip("[]").lower())
    if not loopback:
        click.echo(f"warning: binding to {host}: anyone who can reach this machine on port {port} can use the "
                   "model; the server has no authentication.", err=True)
    _check_port(host, port)
    model_ref = graft_if_needed(model_ref, yes)
    model, tokenizer = load_model(model_ref, mtp=not no_mtp, force=force, distributed=distributed)
    app = create_app(model, tokenizer, served_model_names=names, depth=0 if no_mtp else depth,
                     queue_size=queue_size, max_tokens_default=max_tokens_default,
                     max_body_bytes=int(max_body_mb * 2**20), allowed_hosts=hosts if loopback or hosts else None,
                     prompt_cache_bytes=cache_bytes, max_batch=max_batch, strict_greedy=strict_greedy,
                     prefill_chunk=prefill_chunk, prompt_cache_dir=disk_dir, prompt_cache_disk_bytes=disk_bytes,
                     lookup=lookup, kv_bits=kv_bits, kv_group_size=kv_group_size)
    shown = f"[{host}]" if ":" in host else host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else shown  # a wildcard is not an address to visit
    base = f"http://{shown}:{port}/v1"
    lru = app.state.core.prompt_caches
    cache = f"prompt cache {_size(lru.max_bytes)}" if lru is not None else "no prompt cache"
    if lru is not None and lru.disk is not None:
        cache += f" + {_size(lru.disk.max_bytes)} on disk in {lru.disk.root}"
    batch = app.state.core.max_batch
    kv = "" if kv_bits is None else f", {kv_bits}-bit KV"
    click.echo(f"mtplx serving {', '.join(names)} at {base}  (batch {batch}, queue {queue_size}, {cache}{kv}, "
               "Ctrl-C to stop)")
    margin = strict_check(strict_greedy)
    if margin is not None:
        click.echo(_strict_note(model, no_mtp, batch, margin), err=True)
    click.echo(f"try: curl {base}/chat/completions -H 'Content-Type: application/json' "
               f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'")
    # Deadlines for a request to arrive, and a graceful shutdown (server/http.py).
    server = http.Server(http.config(app, host, port, log_level), app.state.drain, shutdown_timeout)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's startup-failure code (as uvicorn.run exits); it printed why


COMMANDS = [serve]
