"""The command line: real processes, real files; errors are one paragraph, never a traceback."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

from mtplx._version import __version__
from mtplx.cli.commands import cli


def mtplx(*args, input=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mtplx", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_version_and_help():
    out = mtplx("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    for cmd in ("run", "bench", "tune", "inspect", "models", "graft", "doctor"):
        h = mtplx(cmd, "--help")
        assert h.returncode == 0 and "Usage:" in h.stdout, cmd


def test_run_from_argument_and_stdin():
    out = mtplx("run", "--model", "demo", "-n", "8", "--raw", "-t", "0", "def add(a, b):")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "tokens/s" in out.stderr and "acceptance" in out.stderr
    # the status line names the mode and depth first, as the chat's does
    # no depth given: auto, with the mix of depths it chose
    assert re.fullmatch(r"\[MTP auto \((d\d \d+% ?)+\) \| 8 tokens \| [\d.]+ tok/s \| prefill [\d.]+ tok/s \| "
                        r"acceptance [-\d. ]+ \| [\d.]+ tokens/step \| length\]\n", out.stderr), out.stderr
    # The prompt from standard input, in-process (click's runner feeds stdin): a second process
    # would import and load everything again for the same check.
    piped = invoke("run", "--model", "demo", "-n", "8", "--raw", "-t", "0", "--json", "-", input="def add(a, b):")
    assert piped.exit_code == 0, piped.output
    report = json.loads(piped.stdout)
    assert report["stats"]["generated"] == 8 and report["finish_reason"] == "length"
    assert report["text"].strip() == out.stdout.strip()


def test_run_no_mtp_reports_ar(tmp_path):
    report = tmp_path / "r.json"
    out = invoke("run", "--model", "demo", "-n", "6", "--no-mtp", "--raw", "--json", str(report), "x = ")
    assert out.exit_code == 0, out.output
    assert json.loads(report.read_text())["stats"]["depth"] == 0
    assert re.fullmatch(r"\[AR \| 6 tokens \| [\d.]+ tok/s \| prefill [\d.]+ tok/s \| acceptance - \| 1.00 tokens/step"
                        r" \| length\]\n", out.stderr), out.stderr


@pytest.mark.parametrize("args,needle", [
    (("run", "--model", "/no/such/dir", "hi"), "neither an existing directory"),
    (("inspect", "/etc/hostname"), "must be a directory"),
    (("graft", "--source", "/tmp", "--out", "/tmp/mtplx-never"), "config.json"),
    (("bench", "--model", "demo", "--depths", "0,x"), "depths"),
])
def test_errors_are_one_paragraph(args, needle):
    out = mtplx(*args)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_inspect_demo_json():
    out = mtplx("inspect", "demo", "--json", "-")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["kind"] == "artifact" and info["mtp_head"] and info["contract_valid"]
    assert info["architecture"]["model_type"] == "qwen3_5" and info["verdict"].startswith("ready")


def test_inspect_original_checkpoint(fixture_checkpoint):
    out = mtplx("inspect", str(fixture_checkpoint))
    assert out.returncode == 0, out.stderr
    assert "hf-checkpoint" in out.stdout and "mtplx graft --source" in out.stdout


def test_models_and_doctor():
    models = mtplx("models", "--json", "-")
    assert models.returncode == 0
    refs = [m["ref"] for m in json.loads(models.stdout)]
    assert refs[0] == "demo" and "Qwen/Qwen3.5-4B" in refs
    doctor = mtplx("doctor", "--json", "-")
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["device_compute"] is True and report["mlx"]


def test_tune_saves_step_costs_draft_law_and_pins_only_what_beats_auto(tmp_path, grafted_bf16):
    # The bf16 graft: the same tune as the demo's at a fraction of the 4-bit CPU time.
    config = tmp_path / "config.json"
    out = mtplx("tune", "--model", str(grafted_bf16[0]), "--max-depth", "1", "-n", "12", "--json", "-",
                env={"MTPLX_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout[out.stdout.index("{"):])
    saved = json.loads(config.read_text())["tuned"]
    (entry,) = saved.values()
    assert entry["depth"] == report["tuned"]["depth"]
    bench = report["bench"]["depths"]
    best = entry["best_fixed_depth"]
    paired = [b / a for b, a in zip(bench[str(best)]["tps"], bench["auto"]["tps"])]
    auto_ran_best = bench["auto"]["depth_mix"].get(str(best)) == 1.0
    if bench[str(best)]["median_tps"] < 1.02 * bench["auto"]["median_tps"] or min(paired) <= 1 or auto_ran_best:
        assert entry["depth"] == "auto", "a fixed depth that does not beat auto beyond the runs' spread was pinned"
    else:
        assert entry["depth"] == best
    costs = entry["step_costs"]
    assert costs["source"] == "tune" and len(costs["verify_ms"]) == 2 and costs["draft_ms"] > 0
    assert set(entry["draft_temperature"]) == {"0.6", "1"}
    assert all(dt in (0, t / 2, t) for t, dt in ((float(k), v) for k, v in entry["draft_temperature"].items()))


# ---------------------------------------------------------------- bad input: one line, non-zero exit, never "bug"

def invoke(*args, input=None):
    """The CLI in-process (click's runner): fast, for everything that fails before a model loads."""
    return CliRunner().invoke(cli, list(args), input=input)


def assert_one_line_error(r, needle: str, code: int = 1) -> None:
    assert r.exit_code == code, r.output
    assert r.stderr.startswith(f"mtplx: error: {needle}") and r.stderr.count("\n") == 1, r.stderr
    assert "bug" not in r.stderr and "Traceback" not in r.output and r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (("-n", "0"), "--max-tokens must be an integer in [1, inf), got 0"),
    (("-n", "-1"), "--max-tokens must be an integer in [1, inf), got -1"),
    (("-t", "nan"), "--temperature must be a finite number, got nan"),
    (("-t", "inf"), "--temperature must be a finite number, got inf"),
    (("-d", "99"), "--depth must be an integer in [0, 8] or 'auto', got 99"),
    (("-d", "deep"), "--depth must be an integer or 'auto', got 'deep'"),
    (("-t", "-1"), "--temperature must be a number in [0, inf), got -1.0"),
    (("--top-p", "0"), "--top-p must be a number in (0, 1], got 0.0"),
    (("--top-k", "-5"), "--top-k must be an integer in [0, inf), got -5"),
    (("--min-p", "2"), "--min-p must be a number in [0, 1], got 2.0"),
    (("--seed", "-5"), "--seed must be an integer in [0, 2**64-1], got -5"),
    (("--draft-temperature", "nan"), "--draft-temperature must be a finite number"),
])
def test_run_refuses_bad_knobs(args, needle):
    assert_one_line_error(invoke("run", "--model", "demo", *args, "x"), needle)


@pytest.mark.parametrize("args,needle", [
    (("bench", "--depths", "0,99"), "--depths must be an integer in [0, 8] or 'auto', got 99"),
    (("bench", "--draft-temperature", "hot"), "--draft-temperature must be a number, got 'hot'"),
    (("bench", "-t", "nan"), "--temperature must be a finite number"),
    (("bench", "--top-k", "-2"), "--top-k must be"),  # -1 is vLLM's "no top-k", accepted everywhere (knobs)
    (("bench", "--seed", "-1"), "--seed must be"),
    (("bench", "-n", "0"), "--max-tokens must be"),
    (("tune", "--max-depth", "9"), "--max-depth must be an integer in [0, 8], got 9"),
    (("tune", "--max-depth", "0"), "--max-depth must be at least 1, got 0"),
    (("tune", "-n", "0"), "--max-tokens must be"),
    (("start", "--depth", "99"), "--depth must be an integer in [0, 8] or 'auto', got 99"),
    # serve's --depth is checked by mtplx.core.knobs like every other surface's (it was click.IntRange)
    (("serve", "--depth", "99"), "--depth must be an integer in [0, 8] or 'auto', got 99"),
    (("serve", "-d", "x"), "--depth must be an integer or 'auto', got 'x'"),
    (("start", "-n", "0"), "--max-tokens must be"),
    (("start", "--top-p", "2"), "--top-p must be"),
    (("start", "-t", "inf"), "--temperature must be a finite number"),
    (("start", "--seed", "-5"), "--seed must be"),
])
def test_other_commands_refuse_bad_knobs(args, needle):
    assert_one_line_error(invoke(*args, "--model", "demo"), needle)


def test_usage_mistakes_keep_clicks_form():
    r = invoke("run", "--model", "demo", "-n", "many", "x")
    assert r.exit_code == 2 and "'many' is not a valid integer" in r.stderr and "Traceback" not in r.output
    r = invoke("run", "--model", "demo", "--no-mtp", "-d", "2", "x")
    assert r.exit_code == 2 and "--no-mtp decodes at depth 0" in r.stderr
    r = invoke("tune", "--model", "demo", "--min-gain", "nan")
    assert r.exit_code == 2 and "--min-gain" in r.stderr


def test_invalid_utf8_is_refused_with_its_offset():
    r = invoke("run", "--model", "demo", input=b"def f(\xff\xfe):")
    assert_one_line_error(r, "standard input is not valid UTF-8 text (byte 0xff at offset 6)")
    assert "iconv" in r.stderr
    # What Python makes of argv bytes that are not UTF-8: lone surrogates.
    assert_one_line_error(invoke("run", "--model", "demo", "ab\udcff"), "the PROMPT argument is not valid UTF-8")


def test_mistakes_found_once_the_model_is_loaded_are_one_line_too():
    # already refused well before this work; kept so it does not regress
    r = invoke("run", "--model", "demo", "--raw", "x " * 5000)
    assert_one_line_error(r, "the prompt has ")  # one line: no warning of transformers' own either
    assert "at or over the model's context of 4096" in r.stderr
    assert_one_line_error(invoke("run", "--model", "demo", "--raw", ""), "the prompt is empty")


def test_stdin_is_read_as_utf8_whatever_the_locale(monkeypatch):
    from mtplx.cli.run_cmd import read_stdin

    raw = "\ufeffdef café():".encode("utf-8")  # with a byte-order mark, which is dropped
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="latin-1"))
    assert read_stdin() == "def café():"


# ---------------------------------------------------------------- Ctrl-C: exit 130 and one line, at any moment

CONSOLE_SCRIPT = "import sys; from mtplx.cli.main import main; sys.exit(main())"  # what pip's `mtplx` runs


def interrupt_when(args: list[str], on_import: str | None, timeout: float = 120) -> tuple[int, list[str]]:
    """Run the CLI as its console script does and send SIGINT when the module ``on_import`` has
    been imported (``-X importtime`` prints a line as each import ends), or, when None, once the
    first byte of the completion is out. Returns the exit code and the stderr lines that are not
    import times."""
    env = {**os.environ, "MTPLX_CONFIG": os.devnull, "HF_HUB_OFFLINE": "1"}
    env.pop("MTPLX_DEBUG", None)
    # Import times only when an import is awaited: unread, their lines would fill the stderr pipe
    # while the test waits on stdout, and both processes would block.
    importtime = ["-X", "importtime"] if on_import is not None else []
    # SIGINT's default disposition in the child, as a terminal gives it: a suite started as a
    # background job of a non-interactive shell inherits SIGINT ignored, Python then keeps it
    # ignored (rightly), and the child would run all its tokens (issue 21 row 18).
    proc = subprocess.Popen([sys.executable, *importtime, "-c", CONSOLE_SCRIPT, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # The reads below block until the child writes or exits: the watchdog bounds them all.
    fired = threading.Event()
    watchdog = threading.Timer(timeout, lambda: (fired.set(), proc.kill()))
    watchdog.start()
    sent, lines = False, []
    try:
        if on_import is None:
            assert proc.stdout.read(1), "no completion came out"
            proc.send_signal(signal.SIGINT)
            sent = True
        for line in proc.stderr:
            if line.startswith("import time:"):
                if not sent and line.rstrip().endswith(f" {on_import}"):
                    proc.send_signal(signal.SIGINT)
                    sent = True
            else:
                lines.append(line)
        rc = proc.wait(timeout)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.communicate()
    assert not fired.is_set(), f"still running after {timeout} s (SIGINT sent: {sent})"
    assert sent, f"{on_import} was never imported"
    return rc, lines


@pytest.mark.parametrize("moment", [
    "mtplx.cli.main",  # the entry point has just been imported, main() is about to run
    "click.core",  # click and the commands are importing
    "mlx.core",  # inside `run`, while the API and MLX import
    "mtplx.api",  # while the model loads
    None,  # while the completion streams
])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(moment):
    # --depth 2: with MTPLX_CONFIG=/dev/null depth auto would time this machine's step costs (seconds
    # on the 4-bit demo) before the completion streams, in every run.
    rc, lines = interrupt_when(["run", "--model", "demo", "--raw", "-n", "2000", "-t", "0", "--depth", "2", "def f("],
                               moment)
    assert rc == 130 and lines == ["mtplx: interrupted\n"], (rc, "".join(lines))


class _CtrlCOnRead(io.RawIOBase):
    """Standard input whose next read is a Ctrl-C, as a keypress at a prompt delivers it."""

    def readable(self) -> bool:
        return True

    def readinto(self, b):
        if len(b) == 0:  # click probes the stream with read(0)
            return 0
        raise KeyboardInterrupt


def test_ctrl_c_at_a_menu_exits_130(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPLX_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    handler = signal.getsignal(signal.SIGINT)
    try:
        r = CliRunner().invoke(cli, ["start"], input=_CtrlCOnRead())  # the first question: which model?
    finally:
        signal.signal(signal.SIGINT, handler)  # the exit path ignores a second Ctrl-C; not in pytest's process
    assert r.exit_code == 130 and r.stderr == "mtplx: interrupted\n", r.output
    assert "Which model?" in r.stdout


def test_run_prompt_cache_file(tmp_path):
    """A second run of the same prompt reuses the saved cache (all but the last prompt token)
    and answers the same; a file that cannot serve the model is one line and a cold start."""
    import json

    path = tmp_path / "chat.safetensors"
    args = ["run", "--model", "demo", "--raw", "-t", "0", "-n", "4", "--prompt-cache", str(path), "--json", "-",
            "def add(a, b):"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["text"] == b["text"] and a["stats"]["cached_tokens"] == 0
    assert b["stats"]["cached_tokens"] == b["stats"]["prompt_tokens"] - 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    path.write_bytes(bytes(data))  # 64 bytes flipped mid-file (issue 21 row 3): never a wrong answer
    damaged = invoke(*args)
    assert damaged.exit_code == 0 and json.loads(damaged.stdout)["text"] == a["text"]
    assert json.loads(damaged.stdout)["stats"]["cached_tokens"] == 0
    assert damaged.stderr.count("\n") == 1 and "damaged" in damaged.stderr and "Starting without it" in damaged.stderr
    path.write_bytes(path.read_bytes()[:100])  # truncated
    third = invoke(*args)
    assert third.exit_code == 0 and json.loads(third.stdout)["text"] == a["text"]
    assert third.stderr.count("\n") == 1 and "cannot be read" in third.stderr and "Starting without it" in third.stderr


def test_run_prompt_cache_file_any_name_and_unwritable(tmp_path):
    """Issue 21 rows 4 and 11: `cache.bin` is read back by the next run; an unwritable path is
    one line before anything is generated (it was found only after the reply)."""
    import json

    args = ["run", "--model", "demo", "--raw", "-t", "0", "-n", "2", "--json", "-", "def add(a, b):"]
    first = invoke(*args[:-1], "--prompt-cache", str(tmp_path / "cache.bin"), args[-1])
    second = invoke(*args[:-1], "--prompt-cache", str(tmp_path / "cache.bin"), args[-1])
    assert first.exit_code == second.exit_code == 0 and second.stderr == "", second.output
    assert json.loads(second.stdout)["stats"]["cached_tokens"] > 0
    assert_one_line_error(invoke(*args[:-1], "--prompt-cache", "/proc/nope/x", args[-1]),
                          "/proc/nope/x: the prompt cache cannot be written there")
    # the class: --json PATH was also written only after the work (an hour's bench, say)
    assert_one_line_error(invoke("run", "--model", "demo", "--json", "/proc/nope/r.json", "x"),
                          "/proc/nope/r.json: the --json report cannot be written there")
    assert_one_line_error(invoke("bench", "--model", "demo", "--json", "/proc/nope/r.json"),
                          "/proc/nope/r.json: the --json report cannot be written there")


def test_run_refuses_an_empty_prompt_like_the_api():
    """Issue 21 row 14: `mtplx run ""` and empty stdin generated an answer to a question nobody
    asked (the chat template wraps even "" into tokens); the API refuses an empty prompt."""
    assert_one_line_error(invoke("run", "--model", "demo", ""), "the prompt is empty")
    assert_one_line_error(invoke("run", "--model", "demo", input=b""), "standard input is empty")
    assert_one_line_error(invoke("run", "--model", "demo", "--raw", "-", input=b""), "standard input is empty")
