"""Start the ranks of a distributed run as real local processes over MLX's ring backend.

Each rank gets what mlx.launch gives it (MLX_RANK and a host file of 127.0.0.1 ports), so a
test can start, stop or kill one rank on its own; ``mlx_launch`` runs mlx.launch itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ring_available() -> None:
    """Skip, saying why, where MLX has no distributed backend to start."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        pytest.skip("mx.distributed is not available in this MLX build, so no distributed run can start")


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports on 127.0.0.1 (mlx.launch numbers ranks' ports so)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free consecutive ports on 127.0.0.1")


def hostfile(tmp: Path, size: int) -> Path:
    fd, name = tempfile.mkstemp(prefix="hosts-", suffix=".json", dir=tmp)
    os.close(fd)
    path = Path(name)
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def start_rank(rank: int, hosts: Path, command: list[str], **extra_env: str) -> subprocess.Popen:
    """``python COMMAND`` as rank ``rank`` of the ring in ``hosts``, as mlx.launch starts it.
    (Not through mlx.launch itself: its output relay polls without sleeping, and a test must
    be able to stop or kill one rank.)"""
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,  # a group: a "host"
                            env=env(MLX_RANK=str(rank), MLX_HOSTFILE=str(hosts), **extra_env))


def start_ranks(tmp: Path, size: int, command: list[str], **extra_env: str) -> list[subprocess.Popen]:
    hosts = hostfile(tmp, size)
    return [start_rank(rank, hosts, command, **extra_env) for rank in range(size)]


def lines(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [line for line in text.splitlines() if line.strip()]
