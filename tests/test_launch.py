"""`mtplx launch AGENT`: the agent runs with its configuration against a server the launcher
starts (and stops) or finds. The agent here is a stand-in executable named like the real one on a
PATH of the test's own, which sends one request the way that agent is configured to; the server
and the model are real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mtplx.cli.launch_cmd import AGENTS, served_model

pytestmark = pytest.mark.slow

# A stand-in Claude Code: it reads the environment Claude Code reads and asks for a Haiku name,
# as Claude Code does for background work.
FAKE_CLAUDE = textwrap.dedent("""\
    #!{python}
    import json, os, sys, urllib.request
    body = {{"model": os.environ["ANTHROPIC_MODEL"], "max_tokens": int(os.environ["CLAUDE_CODE_MAX_OUTPUT_TOKENS"]),
            "messages": [{{"role": "user", "content": "def add(a, b):"}}], "temperature": 0}}
    req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", json.dumps(body).encode(),
                                 {{"content-type": "application/json", "x-api-key": os.environ["ANTHROPIC_API_KEY"]}})
    answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
    print(json.dumps({{"args": sys.argv[1:], "stop": answer["stop_reason"], "out": answer["usage"]["output_tokens"]}}))
    sys.exit(3)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_starts_a_server_runs_the_agent_and_stops_the_server(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "claude"
    fake.write_text(FAKE_CLAUDE.format(python=sys.executable))
    fake.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ANTHROPIC_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "mtplx", "launch", "claude", "--model", "demo", "--port", str(port),
                        "--max-output-tokens", "3", "--", "-p", "hello"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr  # the agent's own exit code
    said = json.loads(r.stdout.strip().splitlines()[-1])
    assert said == {"args": ["-p", "hello"], "stop": "max_tokens", "out": 3}
    assert "starting `mtplx serve --model demo`" in r.stderr
    assert served_model(f"http://127.0.0.1:{port}") is None  # stopped with the agent


def test_launch_explains_a_missing_agent(tmp_path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "mtplx", "launch", "opencode", "--port", str(_free_port())],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "npm install -g opencode-ai" in r.stderr and "Traceback" not in r.stderr


def test_each_agent_is_configured_without_writing_a_file() -> None:
    url, model = "http://127.0.0.1:9", "m"
    env, args = AGENTS["codex"].configure(url, model, 100)
    assert env == {} and args[args.index("-c") + 1] == 'model="m"'
    assert 'model_providers.mtplx.base_url="http://127.0.0.1:9/v1"' in args
    assert 'model_providers.mtplx.wire_api="responses"' in args
    env, _ = AGENTS["qwen"].configure(url, model, None)
    assert (env["OPENAI_BASE_URL"], env["OPENAI_MODEL"]) == ("http://127.0.0.1:9/v1", "m")
    env, _ = AGENTS["opencode"].configure(url, model, 50)
    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    assert config["model"] == "mtplx/m" and config["provider"]["mtplx"]["models"]["m"]["limit"]["output"] == 50
