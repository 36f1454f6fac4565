"""A distributed run that cannot go on ends on every rank, each with one clear line, within a
bounded time: a rank that never joins, a rank that dies mid-run, a host that freezes (its
processes stopped, sockets open: a ring recv would wait for it forever), and ranks that loaded
different artifacts. Every scenario is the real CLI (`mtplx run --distributed pipeline`) as mlx.launch
starts it; the four run side by side to keep the module short.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time

import pytest
from distributed_ranks import hostfile, lines, ring_available, start_rank

from mtplx.artifact.loader import demo_path

TIMEOUT = 3  # --distributed-timeout of the frozen scenario: the longest a rank waits for another
RUN = ["-m", "mtplx", "run", "--distributed", "pipeline", "--raw", "-t", "0"]


def started_streaming(proc: subprocess.Popen, within: float) -> bool:
    """Wait until rank 0 has printed part of its completion (it runs unbuffered)."""
    ready, _, _ = select.select([proc.stdout], [], [], within)
    return bool(ready) and bool(proc.stdout.read1(64))


def finish(proc: subprocess.Popen, within: float) -> tuple[int | None, float, list[str]]:
    """(exit code or None if still running after ``within`` s, seconds taken, stderr lines)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, within, lines(err)
    return proc.returncode, time.monotonic() - t0, lines(err)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    ring_available()
    tmp = tmp_path_factory.mktemp("failures")
    other = tmp / "another-demo"
    shutil.copytree(demo_path(), other)
    config = json.loads((other / "config.json").read_text())
    config["note"] = "a copy whose config differs"  # loads fine on its own; not the demo's artifact
    (other / "config.json").write_text(json.dumps(config))

    long_run = [*RUN, "--model", "demo", "-n", "4000", "def fibonacci(n):"]
    lonely = start_rank(0, hostfile(tmp, 2), [*RUN, "--distributed-timeout", "1", "--model", "demo", "x"])
    hosts = hostfile(tmp, 2)
    mismatch = [start_rank(0, hosts, [*RUN, "--model", "demo", "x"]),
                start_rank(1, hosts, [*RUN, "--model", str(other), "x"])]
    hosts = hostfile(tmp, 2)
    dies = [start_rank(0, hosts, [*long_run, "--distributed-timeout", "60"], PYTHONUNBUFFERED="1"),
            start_rank(1, hosts, [*long_run, "--distributed-timeout", "60"])]
    hosts = hostfile(tmp, 2)
    freezes = [start_rank(0, hosts, [*long_run, "--distributed-timeout", str(TIMEOUT)], PYTHONUNBUFFERED="1"),
               start_rank(1, hosts, [*long_run, "--distributed-timeout", str(TIMEOUT)])]

    results = {}
    assert started_streaming(dies[0], 120), "rank 0 never started decoding"
    dies[0].kill()
    results["dies"] = finish(dies[1], 30)
    assert started_streaming(freezes[0], 120), "rank 0 never started decoding"
    # A frozen host: rank 1 and its watchdog stop (each rank is a process group of its own).
    os.killpg(freezes[1].pid, signal.SIGSTOP)
    results["freezes.leader"] = finish(freezes[0], TIMEOUT + 30)
    os.killpg(freezes[1].pid, signal.SIGCONT)  # it comes back to a run that is over
    results["freezes.frozen"] = finish(freezes[1], 30)
    results["lonely"] = finish(lonely, 60)
    results["mismatch"] = [finish(p, 60) for p in mismatch]
    return results


def one_error_line(stderr: list[str], *phrases: str) -> str:
    assert len(stderr) == 1, stderr
    line = stderr[0]
    assert line.startswith("mtplx: error: "), line
    for phrase in phrases:
        assert phrase in line, line
    return line


def test_a_rank_that_never_joins_ends_the_run(scenarios):
    code, _, stderr = scenarios["lonely"]
    assert code not in (None, 0)
    one_error_line(stderr, "rank 0", "did not all join within 1 s", "mlx.launch")


def test_a_rank_that_dies_ends_the_run_on_the_others(scenarios):
    code, seconds, stderr = scenarios["dies"]
    assert code == 1 and seconds < 15
    one_error_line(stderr, "rank 1 lost its connection to rank 0")


def test_a_rank_that_freezes_ends_the_run_after_the_timeout(scenarios):
    code, seconds, stderr = scenarios["freezes.leader"]
    assert code not in (None, 0) and seconds < TIMEOUT + 15
    one_error_line(stderr, "rank 0", f"no progress for {TIMEOUT} s", "(rank 1)", "--distributed-timeout")
    code, _, _ = scenarios["freezes.frozen"]
    assert code not in (None, 0), "the frozen rank, once resumed, did not end"


def test_ranks_with_different_artifacts_are_refused(scenarios):
    for rank, (code, _, stderr) in enumerate(scenarios["mismatch"]):
        assert code == 1, (rank, stderr)
        one_error_line(stderr, "rank 1 loaded another artifact than rank 0", "put the same artifact")
