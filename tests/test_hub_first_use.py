"""First use of a repo id by every command (issue 21 rows 5, 19, 20; issue 22's offer in `mtplx
start`), against the local Hub stand-in of test_hub.py: an original checkpoint is grafted after
consent or refused before any weight byte moves; offline and unreachable Hubs are one line
naming the real cause."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from test_hub import SOURCE, hub, run_cli  # noqa: F401 - the Hub stand-in shared with test_hub.py
from test_hub import env as hub_env  # noqa: F401


@pytest.fixture
def env(hub_env, tmp_path):  # noqa: F811
    """test_hub's environment, with a user config of its own (tune and doctor write there)."""
    return {**hub_env, "MTPLX_CONFIG": str(tmp_path / "config.json")}


def _weights_fetched(hub) -> list[str]:
    return [q for q in hub.requests if q.startswith("GET") and q.endswith(".safetensors")]


def test_load_of_an_original_checkpoint_is_refused_before_its_weights_move(hub, env):  # noqa: F811
    code = f"import mtplx; mtplx.load({SOURCE!r})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "is an original checkpoint, not an mtplx artifact" in out.stderr, out.stderr
    assert "nothing but its config and tokenizer was downloaded" in out.stderr and "mtplx run --model" in out.stderr
    assert any(q.endswith("config.json") for q in hub.requests) and not _weights_fetched(hub)


def test_bench_and_tune_ask_before_grafting_and_a_no_moves_no_weights(hub, env, tmp_path):  # noqa: F811
    for cmd in (["bench", "--model", SOURCE, "-n", "2"], ["tune", "--model", SOURCE, "-n", "2"]):
        r = run_cli(env, *cmd, input="n\n")
        assert r.returncode == 1 and f"{SOURCE} has no artifact yet" in r.stderr, r.stderr
        assert "was not grafted and nothing more was downloaded" in r.stderr and "--yes" in r.stderr
    assert not _weights_fetched(hub) and not (tmp_path / "mtplx" / "artifacts").exists()


def test_start_offers_the_exactness_check_once_after_the_first_graft(hub, env):  # noqa: F811
    args = ("start", "--model", SOURCE, "--depth", "1", "--surface", "chat", "--no-thinking")
    first = run_cli(env, *args, input="y\nn\n")
    assert first.returncode == 0, first.stderr
    assert "Check exactness on this machine?" in first.stderr
    assert "Later: `mtplx doctor --exactness --model " in first.stderr
    again = run_cli(env, *args, input="")  # grafted already: no graft, no offer
    assert again.returncode == 0 and "Check exactness" not in again.stderr, again.stderr
    assert "has no artifact yet" not in again.stderr


def test_offline_with_nothing_cached_says_so_first_and_offers_nothing(env):  # noqa: F811
    r = run_cli(env, "run", "--model", "qwen3.5-4b", "hi", input="y\n", HF_HUB_OFFLINE="1")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1" in lines[0] and "not in the local Hugging Face cache" in lines[0]
    assert "Download and graft" not in r.stderr and "has no artifact yet" not in r.stderr


def test_no_network_is_named_with_the_real_fixes(env):  # noqa: F811
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there: a refused connection, as without a network
    for args in (("run", "--model", "qwen3.5-4b", "hi"), ("inspect", "org-x/model-y"), ("bench", "--model", "org-x/model-y")):
        r = run_cli(env, *args, HF_ENDPOINT=closed)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot be reached" in lines[0] and "no network" in lines[0], r.stderr
        assert "HF_ENDPOINT" in lines[0] and "local path" in lines[0] and "HF_HUB_OFFLINE" not in lines[0]
