"""`mtplx start`: unit tests of its pieces, and one end-to-end session in a real terminal (tmux)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import click
import pytest
from click.testing import CliRunner

from mtplx.cli.chat import (GOODBYE, INTERRUPT_HINT, NEW_CONVERSATION, ChatSession, Quit, Totals, format_status, no_echo,
                            parse_command, run_chat)
from mtplx.cli.launcher import CUSTOM_REPO, LOCAL_PATH, model_choices, report_and_check
from mtplx.engine.stats import DecodeStats
from mtplx.errors import MtplxError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pieces, no model, no terminal

def test_parse_command():
    assert parse_command("hello") is None
    assert parse_command("  what is /depth?") is None
    assert parse_command("/depth 3") == ("depth", "3")
    assert parse_command("  /TEMP   0.2 ") == ("temp", "0.2")
    assert parse_command("/quit") == ("quit", "")
    assert parse_command("/") == ("", "")


def _stats(depth: int, generated: int, steps: int, drafted: list[int], accepted: list[int], secs: float) -> DecodeStats:
    s = DecodeStats(depth=depth, generated=generated, steps=steps, drafted=drafted, accepted=accepted)
    s.seconds["verify"] = secs
    return s


def _response(stats: DecodeStats, finish: str = "length", text: str = "x") -> SimpleNamespace:
    return SimpleNamespace(text=text, generation_tokens=stats.generated, generation_tps=stats.tokens_per_second,
                           acceptance=stats.acceptance, tokens_per_step=stats.tokens_per_step,
                           finish_reason=finish, stats=stats)


def test_status_line_mtp_and_ar():
    mtp = _response(_stats(2, 24, 10, [10, 8], [8, 4], 2.0))
    assert format_status(mtp) == ("[MTP d2 | 24 tokens | 12.0 tok/s | acceptance 0.80 0.50 | 2.40 tokens/step | length]")
    ar = _response(_stats(0, 16, 16, [], [], 1.0), finish="stop")
    assert format_status(ar) == "[AR | 16 tokens | 16.0 tok/s | acceptance - | 1.00 tokens/step | stop]"


def test_totals_pool_counts_across_depths():
    t = Totals()
    t.add(_stats(2, 24, 10, [10, 8], [8, 4], 2.0))
    t.add(_stats(0, 16, 16, [], [], 2.0))
    t.add(_stats(3, 10, 4, [4, 4, 2], [4, 2, 1], 1.0))
    assert (t.replies, t.tokens) == (3, 50)
    assert t.acceptance.drafted == [14, 12, 2] and t.acceptance.accepted == [12, 6, 1]
    assert t.format() == ("3 replies | 50 tokens | mean 10.0 tok/s (tokens over decode time)"
                          " | acceptance d1 0.86 d2 0.50 d3 0.50")
    assert "no MTP replies" in Totals().format()


def _session(has_mtp: bool = True) -> ChatSession:
    model = SimpleNamespace(has_mtp=has_mtp, contract=None)
    return ChatSession(model, tokenizer=None, depth=2 if has_mtp else 0, thinking=False, max_tokens=24)


def test_slash_commands():
    s = _session()
    s.messages.append({"role": "user", "content": "hi"})
    assert "/depth N|auto" in s.command("help", "")
    assert s.command("reset", "") == "History cleared." and s.messages == []
    assert "plain AR (depth 0)" in s.command("depth", "0") and s.depth == 0
    assert "MTP, adaptive depth (auto)" in s.command("depth", "auto") and s.depth == "auto"
    assert "MTP depth 3" in s.command("depth", "3") and s.depth == 3
    # out-of-range and malformed values: mtplx.core.knobs' sentence, naming the command; nothing changes
    assert s.command("depth", "x") == ("/depth must be an integer or 'auto', got 'x'. Fix: pass an integer in "
                                       "[0, 8] or 'auto' (0 = plain autoregressive decoding, 'auto' = chosen each "
                                       "step by measured cost and acceptance).")
    assert s.command("depth", "99").startswith("/depth must be an integer in [0, 8] or 'auto', got 99.")
    assert s.command("depth", "2.5").startswith("/depth must be an integer or 'auto', got '2.5'.") and s.depth == 3
    assert "temperature 0.2" in s.command("temp", "0.2") and s.temperature == 0.2
    assert "temperature 7" in s.command("temp", "7") and s.temperature == 7.0  # knobs set no upper bound
    assert s.command("temp", "hot").startswith("/temp must be a number, got 'hot'.")
    assert s.command("temp", "-1").startswith("/temp must be a number in [0, inf), got -1.0.")
    assert s.command("temp", "nan").startswith("/temp must be a finite number") and s.temperature == 7.0
    assert s.command("max", "0").startswith("/max must be an integer in [1, inf), got 0.") and s.max_tokens == 24
    assert "thinking on" in s.command("thinking", "on") and s.thinking
    assert s.command("thinking", "maybe").startswith("Usage")
    assert "max 100 tokens" in s.command("max", "100") and s.max_tokens == 100
    assert s.command("frobnicate", "").startswith("Unknown command /frobnicate")
    with pytest.raises(Quit):
        s.command("quit", "")


def test_depth_refused_without_mtp_head():
    s = _session(has_mtp=False)
    assert "no MTP head" in s.command("depth", "2") and s.depth == 0
    assert "no MTP head" in s.command("depth", "auto") and s.depth == 0
    assert "plain AR" in s.command("depth", "0")


def _fake_generate(script: list[str | type[BaseException]]) -> Callable:
    """Yields the scripted chunks, raising an exception class where one appears."""
    def generate(model, tokenizer, messages, **kw):
        stats = _stats(kw["depth"], 0, 0, [0] * kw["depth"], [0] * kw["depth"], 1.0)
        for item in script:
            if isinstance(item, type):
                raise item()
            stats.generated += 1
            stats.steps += 1
            yield _response(stats, finish=None, text=item)
        yield _response(stats, finish="stop", text="")
    return generate


def _reader(lines: list[str | type[BaseException]]) -> Callable[[str], str]:
    it = iter(lines)

    def read(prompt: str) -> str:
        item = next(it)
        if isinstance(item, type):
            raise item()
        return item
    return read


def test_chat_loop_history_interrupts_and_exit(capsys):
    s = _session()
    run_chat(s, read=_reader(["hello", KeyboardInterrupt, "/nope", EOFError]), generate=_fake_generate(["\nab", "c"]))
    out = capsys.readouterr().out
    assert "mtplx> abc\n" in out  # leading newline of the reply is not shown
    assert "[MTP d2 | 2 tokens" in out and "| stop]" in out
    assert INTERRUPT_HINT in out and "Unknown command /nope" in out and out.rstrip().endswith(GOODBYE)
    assert s.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "\nabc"}]
    assert s.totals.replies == 1


def test_ctrl_c_during_reply_drops_the_turn(capsys):
    s = _session()
    s.messages += [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    run_chat(s, read=_reader(["q2", "/quit"]), generate=_fake_generate(["partial", KeyboardInterrupt]))
    out = capsys.readouterr().out
    assert "mtplx> partial\n[interrupted" in out and out.rstrip().endswith(GOODBYE)
    assert s.messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert s.totals.replies == 0  # an interrupted reply is not counted in /stats


def test_a_mistake_in_a_turn_is_one_line_and_the_chat_goes_on(capsys):
    def refusing(model, tokenizer, messages, **kw):
        raise MtplxError("the prompt is empty", fix="pass at least one token")
        yield  # a generator, as stream_generate is

    s = _session()
    s.messages += [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    run_chat(s, read=_reader(["q2", "/depth 1", EOFError]), generate=refusing)
    out = capsys.readouterr().out
    assert "mtplx> \nmtplx: error: the prompt is empty. Fix: pass at least one token.\n" in out
    assert "Now: MTP depth 1" in out and out.rstrip().endswith(GOODBYE)
    assert s.messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]


def test_turn_over_the_context_offers_a_new_conversation(demo, monkeypatch, capsys):
    from mtplx.api import encode_prompt

    model, tok = demo
    second = "y = 1"  # short: a 4-bit prefill on the CPU costs about one decode step per token
    alone = len(encode_prompt(tok, [{"role": "user", "content": second}], enable_thinking=False))
    # The real demo with a context that holds the second question alone and its reply, but not
    # after the first turn.
    monkeypatch.setattr(model.trunk.args, "max_position_embeddings", alone + 2)
    s = ChatSession(model, tok, depth=0, thinking=False, max_tokens=2, temperature=0.0)
    s.messages += [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x = 1"}]
    asked = []

    def read(prompt: str) -> str:
        asked.append(prompt)
        return script.pop(0)

    script = [second, "n", second, "", "/quit"]  # "" takes the offer's default: yes
    run_chat(s, read=read)
    out = capsys.readouterr().out
    assert out.count("This turn does not fit: the conversation would be") == 2
    assert asked.count(NEW_CONVERSATION) == 2
    assert "Kept the conversation; /reset starts a new one." in out and "New conversation." in out
    assert out.count("[AR | 2 tokens") == 1 and out.rstrip().endswith(GOODBYE)  # never left the chat
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[0]["content"] == second

    monkeypatch.setattr(model.trunk.args, "max_position_embeddings", alone)  # now not even alone
    s.messages.clear()
    assert s.reply(second, generate=__import__("mtplx").stream_generate, read=read) is None
    assert f"This message alone is {alone} tokens" in capsys.readouterr().out and s.messages == []


def _echoed(master: int, wait: float) -> bytes:
    """What the terminal echoed back to its keyboard side within ``wait`` seconds."""
    import select

    out = b""
    while select.select([master], [], [], wait)[0]:
        out += os.read(master, 1024)
        wait = 0.05
    return out


@pytest.mark.parametrize("interrupt", [False, True])
def test_keys_typed_while_a_reply_streams_are_not_echoed(monkeypatch, capsys, interrupt):
    import pty
    import select
    import termios

    master, slave = pty.openpty()
    tty = os.fdopen(slave, "r")
    monkeypatch.setattr(sys, "stdin", tty)  # a real terminal on standard input
    seen = {}

    def generate(model, tokenizer, messages, **kw):
        seen["echo_flag"] = bool(termios.tcgetattr(slave)[3] & termios.ECHO)
        os.write(master, b"typed meanwhile\n")  # keys pressed, Enter included, while the reply streams
        seen["echoed"] = _echoed(master, 0.3)
        if interrupt:
            raise KeyboardInterrupt
        stats = _stats(2, 1, 1, [1, 1], [1, 0], 1.0)
        yield _response(stats, finish="stop", text="the reply")

    try:
        os.write(master, b"x\n")  # control: outside a reply the terminal echoes
        assert _echoed(master, 2.0).startswith(b"x")
        assert os.read(slave, 64) == b"x\n"
        _session().reply("q", generate)
        assert seen == {"echo_flag": False, "echoed": b""}
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # restored, after Ctrl-C too
        assert not select.select([slave], [], [], 0.05)[0]  # what was typed blind was dropped, not sent
    finally:
        tty.close()
        os.close(master)
    out = capsys.readouterr().out
    assert "typed meanwhile" not in out and ("[interrupted" in out) == interrupt


def test_no_echo_leaves_a_non_terminal_alone():
    import io

    with no_echo(io.StringIO()):
        pass


def test_model_menu_order_and_dedupe():
    entries = [
        {"ref": "org/cached", "where": "hf-cache", "size_bytes": 2**30, "title": "checkpoint"},
        {"ref": "Qwen/Qwen3.5-4B", "where": "catalog", "size_bytes": None,
         "title": "Qwen3.5 4B (dense) — graft with `...`", "memory_gb": 3.0},
        {"ref": "demo", "where": "bundled", "size_bytes": 6 * 2**20, "title": "tiny"},
        {"ref": "Qwen/Qwen3.5-4B", "where": "hf-cache", "size_bytes": 8 * 2**30, "title": "checkpoint"},
    ]
    choices = model_choices(entries)
    assert [c.value for c in choices] == ["demo", "Qwen/Qwen3.5-4B", "org/cached", LOCAL_PATH, CUSTOM_REPO]
    assert "cached, needs graft" in choices[1].label and "graft with" not in choices[1].label
    assert "1.0 GiB" in choices[2].label


def _inspection(**kw) -> SimpleNamespace:
    base = dict(ref="org/model", path="/x", kind="artifact", architecture={"model_type": "qwen3_5"}, mtp_head=True,
                contract_valid=True, weights_bytes=2**20, memory_bytes=2**34, verdict="ready",
                can_run_mtp=True, can_run_ar=True)
    return SimpleNamespace(**{**base, **kw})


def test_check_refuses_original_checkpoint_with_graft_command(capsys):
    info = _inspection(kind="hf-checkpoint", can_run_mtp=False, can_run_ar=False, contract_valid=None)
    with pytest.raises(MtplxError, match=re.escape("`mtplx graft --source org/model --out ~/mtplx-models/model`")):
        report_and_check(info, ar_only=False, yes=True)
    assert "kind:         hf-checkpoint" in capsys.readouterr().out


def test_check_refuses_unrunnable_and_too_big():
    with pytest.raises(MtplxError, match="cannot run"):
        report_and_check(_inspection(can_run_mtp=False, can_run_ar=False, verdict="unsupported"), ar_only=False, yes=True)
    with pytest.raises(MtplxError, match="needs about"):
        report_and_check(_inspection(weights_bytes=2**34), ar_only=False, yes=True)
    report_and_check(_inspection(), ar_only=False, yes=True)  # fits: no error


def _cli_start(args: list[str], stdin: str, tmp_path: Path):
    from mtplx.cli.commands import cli

    env = {"MTPLX_CONFIG": str(tmp_path / "config.json"), "HF_HUB_OFFLINE": "1"}
    return CliRunner().invoke(cli, ["start", *args], input=stdin, env=env)


def test_start_with_flags_chats_on_the_demo(tmp_path):
    r = _cli_start(["--model", "demo", "--yes", "-n", "6", "--seed", "0"], "def f(\n/stats\n/quit\n", tmp_path)
    assert r.exit_code == 0, r.output
    assert "verdict:      ready" in r.output and "Loaded in" in r.output
    assert "verdict:      ready: MTP, depth auto" in r.output
    assert re.search(r"\[MTP auto \((d\d \d+% ?)+\) \| 6 tokens \| [\d.]+ tok/s \| acceptance [-\d. ]+ \|", r.output)
    assert "1 replies | 6 tokens" in r.output and r.output.rstrip().endswith(GOODBYE)


@pytest.mark.parametrize("tuned, default, marked", [(None, 1, 1), (0, 3, 3), (3, 2, 2), ("auto", 1, 1)])
def test_one_mode_menu_whatever_tune_saved(tmp_path, monkeypatch, tuned, default, marked):
    """Adaptive, a fixed depth, plain AR: always these three; what `mtplx tune` saved only moves
    Enter's default to its entry and says so (never "MTP at depth 0" beside plain AR)."""
    import json

    from mtplx.cli.launcher import ask_depth, inspect_model

    config = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(config))
    info = inspect_model("demo")
    if tuned is not None:
        from types import SimpleNamespace

        from mtplx.artifact.loader import read_contract
        from mtplx.core.config import model_key

        key = model_key(SimpleNamespace(contract=read_contract(Path(info.path)), path=info.path))
        config.write_text(json.dumps({"tuned": {key: {"depth": tuned}}}))
    seen = {}

    @click.command()
    def pick():
        seen["depth"] = ask_depth(info, depth=None, no_mtp=False, yes=False)

    r = CliRunner().invoke(pick, input="\n\n")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.strip()[:2] in ("1)", "2)", "3)")]
    assert [line.split(")")[1].split()[0] for line in lines] == ["MTP,", "MTP", "Plain"]
    assert f"Choose [{default}]" in r.output
    if tuned is not None:
        assert "tune" in lines[marked - 1] and sum("tune" in line for line in lines) == 1
    assert seen["depth"] == {1: "auto", 2: tuned, 3: 0}[default]


def test_start_refuses_depth_without_head_and_conflicting_flags(tmp_path):
    r = _cli_start(["--model", "demo", "--no-mtp", "--depth", "2", "--yes"], "", tmp_path)
    assert r.exit_code == 2 and "--no-mtp decodes at depth 0" in r.output


def test_surface_serve_calls_the_serve_command(tmp_path, monkeypatch):
    import mtplx.cli.serve_cmd as serve_cmd

    seen = {}

    @click.command("serve")
    @click.option("--model", "model_ref")
    @click.option("--depth", type=int, default=None)
    @click.option("--no-mtp", is_flag=True)
    def fake_serve(model_ref, depth, no_mtp):
        seen.update(model_ref=model_ref, depth=depth, no_mtp=no_mtp)

    monkeypatch.setattr(serve_cmd, "serve", fake_serve)
    r = _cli_start(["--model", "demo", "--surface", "serve", "--depth", "0"], "", tmp_path)
    assert r.exit_code == 0, r.output
    assert seen == {"model_ref": "demo", "depth": None, "no_mtp": True}


def test_surface_serve_missing_module_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mtplx.cli.serve_cmd", None)  # makes the import fail
    r = _cli_start(["--model", "demo", "--surface", "serve", "--yes"], "", tmp_path)
    assert r.exit_code == 1 and "the API server is not available" in r.output


# ---------------------------------------------------------------- a real terminal, under tmux

class Tmux:
    """One detached tmux session on a private server socket, so no user tmux server or its
    environment is touched, with bounded polling of the screen."""

    def __init__(self, name: str):
        self.socket = f"mtplx-test-{os.getpid()}-{name}"
        self.target = name

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str, cwd: Path) -> None:
        self.tmux("new-session", "-d", "-s", self.target, "-x", "120", "-y", "40", "-c", str(cwd), command)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.target)

    def history(self) -> str:
        """Everything printed so far, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.target)

    def send(self, text: str, enter: bool = True) -> None:
        if text:
            self.tmux("send-keys", "-t", self.target, "-l", text)
        if enter:
            self.tmux("send-keys", "-t", self.target, "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", self.target, key)

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.history()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; screen:\n{self.screen()}")
            time.sleep(0.1)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 60.0) -> str:
        return self.wait(lambda t: t.count(needle) >= count, f"{count} x {needle!r}", timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _at_prompt(text: str) -> bool:
    return text.rstrip().endswith("you>")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux / brew install tmux)")
def test_start_in_a_real_terminal(tmp_path):
    env = f"MTPLX_CONFIG={shlex.quote(str(tmp_path / 'config.json'))} HF_HUB_OFFLINE=1 MTPLX_DEBUG="
    command = (f"env {env} {shlex.quote(sys.executable)} -m mtplx start --max-tokens 12 --seed 0; "
               f"echo \"[exit $?]\"; sleep 300")
    t = Tmux("start")
    t.start(command, ROOT)
    try:
        t.wait_for("Which model?")
        t.wait_for("Choose [1]:")
        t.send("1")  # the bundled demo
        t.wait_for("Decoding mode?")
        assert "1) MTP, adaptive (depth auto" in t.history()  # the temp config holds nothing tuned
        t.send("2")  # MTP at a fixed depth
        t.wait_for("Draft depth [2]:")  # the contract's
        t.send("")
        t.wait_for("Where?")
        t.send("1")  # chat in this terminal
        t.wait_for("Thinking mode?")
        t.send("1")  # off
        t.wait(lambda s: "Chat: MTP depth 2" in s and _at_prompt(s), "the first prompt")

        t.send("hello")
        text = t.wait(lambda s: s.count("[MTP d2 | ") == 1 and _at_prompt(s), "the first reply")
        assert re.search(r"\[MTP d2 \| \d+ tokens \| [\d.]+ tok/s \| acceptance [\d.]+ [\d.]+ \| [\d.]+ tokens/step"
                         r" \| (length|stop)\]", text)
        print("\n--- screen after one chat turn ---\n" + t.screen())

        t.send("def fib(n):")
        t.wait(lambda s: s.count("[MTP d2 | ") == 2 and _at_prompt(s), "the second reply")

        # A long reply, stopped with Ctrl-C once text is streaming. If the model happens to end
        # this reply before the key lands, ask again (bounded).
        t.send("/max 4000")
        t.wait_for("max 4000 tokens")
        for attempt in range(3):
            before = t.history()
            done_before, interrupted_before = before.count("[MTP d2 | "), before.count("[interrupted")
            replies_before = before.count("mtplx> ")
            t.send(f"write a long program {attempt}")
            t.wait(lambda s: s.count("mtplx> ") > replies_before and len(s.rsplit("mtplx> ", 1)[-1].strip()) > 20,
                   "the long reply to stream")
            t.send("zzqq", enter=False)  # typed while the reply streams: must not show up in it
            t.key("C-c")
            text = t.wait(lambda s: (s.count("[interrupted") > interrupted_before or s.count("[MTP d2 | ") > done_before)
                          and _at_prompt(s), "the interrupted reply")
            if text.count("[interrupted") > interrupted_before:
                assert "zzqq" not in text.rsplit("mtplx> ", 1)[-1], "keystrokes were echoed into the reply"
                break
        else:
            pytest.fail("three long replies all ended before Ctrl-C arrived")
        assert "Bye." not in text  # still in the chat

        t.send("/max 12")
        t.wait_for("max 12 tokens")
        t.send("/depth 0")
        t.wait_for("Now: plain AR (depth 0)")
        t.send("one more")
        text = t.wait(lambda s: "[AR | " in s and _at_prompt(s), "an AR reply")
        assert re.search(r"\[AR \| \d+ tokens \| [\d.]+ tok/s( \| \d+ of \d+ prompt tokens cached)? \| acceptance - \| "
                             r"1.00 tokens/step \| (length|stop)\]", text)

        t.send("/stats")
        text = t.wait_for("replies |")
        assert re.search(r"3 replies \| \d+ tokens \| mean [\d.]+ tok/s .* acceptance d1 [\d.]+ d2 [\d.]+", text)

        t.send("/bogus")
        t.wait_for("Unknown command /bogus")
        t.key("C-c")  # at the prompt: a hint, and the chat goes on
        t.wait_for(INTERRUPT_HINT)
        t.send("/quit")
        text = t.wait_for("[exit 0]")
        assert GOODBYE in text and "Traceback" not in text
        print("\n--- the whole session ---\n" + text)
    finally:
        t.close()
