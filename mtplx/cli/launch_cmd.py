"""`mtplx launch AGENT`: run a coding agent against a local `mtplx serve`, configured.

Why a launcher: each agent is configured differently (Claude Code and Qwen Code by environment
variables, Codex by a provider table in its config file, OpenCode by a provider in JSON), and a
first-time user gets one of them wrong. The launcher reuses a server already answering on the
port, or starts one for the session and stops it when the agent exits, and hands the agent its
configuration through the environment and command-line overrides only: it never writes a
user's config file. docs/agents.md shows the same configuration for running things by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from mtplx.errors import MtplxError

# The longest an agent should wait on one request: a cold first turn prefills its whole system
# prompt, minutes on a slow machine (docs/agents.md, "Slow prefills").
REQUEST_TIMEOUT_MS = 3_600_000
SERVER_START_S = 600


@dataclass(frozen=True)
class Agent:
    binary: str
    package: str  # npm
    configure: Callable[[str, str, int | None], tuple[dict[str, str], list[str]]]  # (url, model, cap) -> env, args


def _claude(url: str, model: str, cap: int | None) -> tuple[dict[str, str], list[str]]:
    # Claude Code asks for its own model names; the server answers claude-* (serve's default), and
    # ANTHROPIC_MODEL makes it ask for the served name even on a server started with other names.
    env = {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model,
           "API_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS)}
    if not os.environ.get("ANTHROPIC_API_KEY") and not os.environ.get("ANTHROPIC_AUTH_TOKEN"):
        env["ANTHROPIC_API_KEY"] = "mtplx-local"
    if cap:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(cap)
    return env, []


def _codex(url: str, model: str, cap: int | None) -> tuple[dict[str, str], list[str]]:
    table = "model_providers.mtplx"
    overrides = {"model": json.dumps(model), "model_provider": '"mtplx"', f"{table}.name": '"mtplx"',
                 f"{table}.base_url": json.dumps(f"{url}/v1"), f"{table}.wire_api": '"responses"',
                 f"{table}.stream_idle_timeout_ms": str(REQUEST_TIMEOUT_MS)}
    # Codex sends no output limit (and reads no setting for one): the server's --max-tokens-default
    # is the cap, which the launcher sets when it starts the server.
    return {}, [a for k, v in overrides.items() for a in ("-c", f"{k}={v}")]


def _qwen(url: str, model: str, cap: int | None) -> tuple[dict[str, str], list[str]]:
    env = {"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_MODEL": model}
    if not os.environ.get("OPENAI_API_KEY"):
        env["OPENAI_API_KEY"] = "mtplx-local"
    return env, []


def _opencode(url: str, model: str, cap: int | None) -> tuple[dict[str, str], list[str]]:
    limit = {"context": 262144, **({"output": cap} if cap else {})}
    config = {"provider": {"mtplx": {"npm": "@ai-sdk/openai-compatible", "name": "mtplx",
                                     "options": {"baseURL": f"{url}/v1", "timeout": REQUEST_TIMEOUT_MS},
                                     "models": {model: {"name": model, "limit": limit}}}},
              "model": f"mtplx/{model}"}
    return {"OPENCODE_CONFIG_CONTENT": json.dumps(config)}, []


AGENTS = {
    "claude": Agent("claude", "@anthropic-ai/claude-code", _claude),
    "codex": Agent("codex", "@openai/codex", _codex),
    "qwen": Agent("qwen", "@qwen-code/qwen-code", _qwen),
    "opencode": Agent("opencode", "opencode-ai", _opencode),
}


def _get(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a loopback URL we built
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def served_model(url: str) -> str | None:
    """The model a healthy server at ``url`` reports, or None when nothing healthy answers."""
    health = _get(f"{url}/health")
    return health.get("model") if health and health.get("status") == "ok" else None


def _start_server(model_ref: str, host: str, port: int, url: str, serve_args: list[str]) -> subprocess.Popen:
    log_path = Path(tempfile.gettempdir()) / f"mtplx-launch-{port}.log"
    cmd = [sys.executable, "-m", "mtplx", "serve", "--model", model_ref, "--host", host, "--port", str(port),
           *serve_args]
    click.echo(f"mtplx: starting `mtplx serve --model {model_ref}` on {url} (log: {log_path})", err=True)
    with log_path.open("w") as log:  # the server holds its own copy of the file
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + SERVER_START_S
    while served_model(url) is None:
        if proc.poll() is not None:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-8:])
            raise MtplxError(f"the server exited before it answered (exit {proc.returncode}); its log "
                             f"{log_path} ends:\n{tail}", fix="fix what the log says, then run the launch again")
        if time.monotonic() > deadline:
            proc.terminate()
            raise MtplxError(f"the server did not answer on {url} within {SERVER_START_S} s (log: {log_path})",
                             fix="run `mtplx serve` by hand to see why")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@click.command("launch", context_settings={"ignore_unknown_options": True})
@click.argument("agent", type=click.Choice(sorted(AGENTS)))
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED)
@click.option("-m", "--model", "model_ref", default="demo", show_default=True,
              help="The model to serve when no server answers on the port: an artifact directory, a repo id "
                   "or a catalog id. A server already running there is used as it is.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-output-tokens", type=click.IntRange(1), default=None,
              help="Cap each answer: passed to the agent where it has a setting (Claude Code, OpenCode) and, when "
                   "the launcher starts the server, as its --max-tokens-default (Codex sends no limit).")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG",
              help="Passed to `mtplx serve` when the launcher starts it (repeatable), e.g. --serve-arg=--depth=2.")
def launch(agent: str, agent_args: tuple[str, ...], model_ref: str, host: str, port: int,
           max_output_tokens: int | None, serve_args: tuple[str, ...]) -> None:
    """Run a coding agent (claude, codex, qwen, opencode) against a local mtplx server.

    Uses the server answering on --host/--port, or starts `mtplx serve --model MODEL` there and
    stops it when the agent exits. The agent gets its configuration through environment variables
    and command-line overrides; no config file is written. Arguments after the agent's name (or
    after --) go to the agent: `mtplx launch claude -- -p "explain main.py"`.
    """
    spec = AGENTS[agent]
    binary = shutil.which(spec.binary)
    if binary is None:
        raise MtplxError(f"`{spec.binary}` is not on PATH", fix=f"install it: npm install -g {spec.package}")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    proc = None
    model = served_model(url)
    if model is None:
        cap = ["--max-tokens-default", str(max_output_tokens)] if max_output_tokens else []
        proc = _start_server(model_ref, host, port, url, [*cap, *serve_args])
        model = served_model(url)
    else:
        click.echo(f"mtplx: using the server on {url} (model {model})", err=True)
    env, args = spec.configure(url, model, max_output_tokens)
    try:
        code = subprocess.call([binary, *args, *agent_args], env={**os.environ, **env})
    finally:
        if proc is not None:
            _stop(proc)
    sys.exit(code)


COMMANDS = [launch]
