"""Issue 31, rows 10, 11, 13 and 14: the CLI and bench side of correctness sweep 3.

Bench noise is not a verdict (13), tune pins a fixed depth only beyond the runs' spread (11),
start's verdict names the depth it will use (11), start's serve surface takes --port (10), the
chat shows a long prefill's progress (10), and long runs say what they will take (14).
"""

from __future__ import annotations

import re

from mtplx.bench.runner import BenchReport, DepthResult, noise_note
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.stats import DecodeStats


def _run(tps: float, depth: int = 0, mix: list[int] | None = None) -> DecodeStats:
    """A finished run's statistics: 100 tokens at ``tps`` (decode time only), ``mix`` the steps
    per depth."""
    s = DecodeStats(depth=depth, generated=100)
    s.seconds["verify"] = 100 / tps
    if mix is not None:
        s.depth_steps = list(mix)
    return s


def _report(runs: dict, mlx_lm: list[float] | None = None, rounds: int = 1) -> BenchReport:
    results = {d: DepthResult(d, [_run(t, **kw) for t in tps]) for d, (tps, kw) in runs.items()}
    return BenchReport(model="m", params=SamplingParams(temperature=0.6), max_tokens=100, prompts=2, rounds=rounds,
                       results=results, cost=None, mlx_lm_tps=None if not mlx_lm else sorted(mlx_lm)[len(mlx_lm) // 2],
                       mlx_lm_runs=mlx_lm or [], device="cpu")


# ---------------------------------------------------------------- row 13: noise is not a verdict

def test_noise_note_says_within_noise_only_where_the_runs_straddle_one():
    assert noise_note([0.7, 1.2], "AR").startswith("within noise: run by run it ranged 0.70-1.20x AR")
    assert noise_note([0.7, 0.8, 0.75], "AR") is None  # every run slower: a verdict
    assert noise_note([1.1, 1.3], "AR") is None
    assert "one run" in noise_note([0.7], "AR")
    assert noise_note([], "AR") is None


def test_auto_against_ar_on_a_loaded_machine_reads_as_noise():
    # The case: auto's median 0.73x AR, but one paired run had auto ahead.
    r = _report({0: ([10.0, 10.0], {}), "auto": ([5.0, 10.5], {"depth": 1, "mix": [9, 0]})})
    line = next(x for x in r.verdicts() if x.startswith("Depth auto chose"))
    assert "0.78x AR" in line and "within noise" in line and "0.50-1.05x AR" in line
    # Both runs slower: the same median is a verdict, said without the noise note.
    r = _report({0: ([10.0, 10.0], {}), "auto": ([7.5, 8.0], {"depth": 1, "mix": [9, 0]})})
    line = next(x for x in r.verdicts() if x.startswith("Depth auto chose"))
    assert "within noise" not in line


def test_ar_against_mlx_lm_pairs_each_prompt_with_its_own_reference():
    # mtplx AR 0.75x mlx_lm by the medians; per prompt one is faster, one slower: noise.
    r = _report({0: ([6.0, 12.0], {})}, mlx_lm=[10.0, 10.0])
    line = next(x for x in r.verdicts() if x.startswith("mtplx AR runs at"))
    assert "within noise" in line and "0.60-1.20x mlx_lm.generate" in line
    r = _report({0: ([7.0, 7.5], {})}, mlx_lm=[10.0, 10.0])
    line = next(x for x in r.verdicts() if x.startswith("mtplx AR runs at"))
    assert "0.725x" in line and "within noise" not in line
    assert r.as_dict()["mlx_lm_generate_tps_per_prompt"] == [10.0, 10.0]


# ---------------------------------------------------------------- row 11: tune pins only beyond the spread

def test_tune_keeps_auto_when_auto_already_ran_the_best_depth():
    from mtplx.cli.bench_cmd import tuned_choice

    # The case: AR 1.05x auto, auto at d0 on every step: two identical loops.
    r = _report({0: ([10.5, 10.5], {}), 1: ([8.0, 8.0], {"depth": 1}),
                 "auto": ([10.0, 10.0], {"depth": 1, "mix": [50, 0]})})
    chosen, gain, why = tuned_choice(r, r.best_fixed(), 1.02)
    assert chosen == "auto" and round(gain, 2) == 1.05 and "already ran at every step" in why


def test_tune_keeps_auto_when_the_gain_is_within_the_runs_spread():
    from mtplx.cli.bench_cmd import tuned_choice

    r = _report({0: ([8.0, 8.0], {}), 2: ([13.0, 9.0], {"depth": 2}),
                 "auto": ([10.0, 10.0], {"depth": 2, "mix": [10, 10, 10]})})
    chosen, _, why = tuned_choice(r, 2, 1.02)
    assert chosen == "auto" and "within the runs' spread (0.90-1.30x" in why
    # Ahead in every paired run and by --min-gain: pinned.
    r = _report({0: ([8.0, 8.0], {}), 2: ([12.0, 11.0], {"depth": 2}),
                 "auto": ([10.0, 10.0], {"depth": 2, "mix": [10, 10, 10]})})
    assert tuned_choice(r, 2, 1.02)[0] == 2
    # Ahead in every run but not by --min-gain: auto.
    assert tuned_choice(r, 2, 1.5)[0] == "auto"


# ---------------------------------------------------------------- row 11: start's verdict names the saved depth

def _tune_demo(config, depth) -> None:
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from mtplx.artifact.loader import read_contract
    from mtplx.cli.launcher import inspect_model
    from mtplx.core.config import model_key

    info = inspect_model("demo")
    key = model_key(SimpleNamespace(contract=read_contract(Path(info.path)), path=info.path))
    config.write_text(json.dumps({"tuned": {key: {"depth": depth}}}))


def test_start_verdict_agrees_with_what_tune_saved(tmp_path):
    config = tmp_path / "config.json"
    r = _start(["--model", "demo", "--yes", "-n", "2"], "/quit\n", config)
    assert "verdict:      ready: MTP, depth auto" in r.output
    _tune_demo(config, 0)
    r = _start(["--model", "demo", "--yes", "-n", "2"], "/quit\n", config)
    assert r.exit_code == 0, r.output
    assert "verdict:      ready: MTP, plain AR (depth 0), saved by `mtplx tune`" in r.output
    assert "Chat: plain AR (depth 0)" in r.output  # and the chat runs what the verdict says
    _tune_demo(config, 2)
    r = _start(["--model", "demo", "--yes", "-n", "2"], "/quit\n", config)
    assert "ready: MTP, depth 2, saved by `mtplx tune`" in r.output and "Chat: MTP depth 2" in r.output


# ---------------------------------------------------------------- row 10: start's serve surface and its port

def _start(args, stdin, config):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    return CliRunner().invoke(cli, ["start", *args], input=stdin,
                              env={"MTPLX_CONFIG": str(config), "HF_HUB_OFFLINE": "1"})


def test_start_port_busy_names_a_flag_start_has(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        # --port implies the server surface; the busy port is refused before any weights load.
        r = _start(["--model", "demo", "--depth", "0", "--port", str(port)], "", tmp_path / "c.json")
    assert r.exit_code == 1, r.output
    assert f"cannot listen on 127.0.0.1:{port}" in r.output and "choose another --port" in r.output
    assert "Loading" not in r.output and "Traceback" not in r.output
    help_text = _start(["--help"], "", tmp_path / "c.json").output
    assert "--port" in help_text  # the flag the fix names exists on start


def test_start_port_with_the_chat_surface_is_refused(tmp_path):
    r = _start(["--model", "demo", "--surface", "chat", "--port", "8001", "--yes"], "", tmp_path / "c.json")
    assert r.exit_code == 2 and "--port is the API server's" in r.output


# ---------------------------------------------------------------- row 10: a long prefill shows its progress

def _chat_session(demo):
    import mtplx
    from mtplx.cli.chat import ChatSession
    from mtplx.generation.conversation import Conversation

    model, tok = demo
    s = ChatSession(model, tok, depth=0, thinking=False, max_tokens=2, seed=0)
    s.conversation, s.prompt_cache = Conversation(tok), mtplx.make_prompt_cache(model)
    return s


def test_prefill_expected_to_be_long_shows_an_estimated_bar_at_once(demo_bf16, capsys):
    import mtplx

    s = _chat_session(demo_bf16)
    s.reply("hello there", mtplx.stream_generate)
    assert s.prefill_rate is None or s.prefill_rate > 0
    s.prefill_rate = 1.0  # 1 token/s: the whole history re-prefilled would take far over a second
    capsys.readouterr()
    s.command("thinking", "on")  # renders the history anew: most of it is prefilled again
    s.reply("and again", mtplx.stream_generate)
    out = capsys.readouterr()
    assert re.search(r"prefill of [\d,]+ tokens \(estimated from earlier turns\)", out.err)
    assert out.out.count("mtplx> ") == 2  # the bar's line erased, the reply's prefix put back once


def test_prefill_that_outlasts_a_second_shows_a_bar_even_without_an_estimate(demo_bf16, capsys):
    import time

    import mtplx

    def slow(*a, **kw):  # the real generation, whose first token comes after 1.4 s
        it = mtplx.stream_generate(*a, **kw)
        time.sleep(1.4)
        yield from it

    s = _chat_session(demo_bf16)
    s.reply("hello there", slow)
    err = capsys.readouterr().err
    assert re.search(r"prefill of [\d,]+ tokens: 00:01", err)
    t0 = time.perf_counter()
    s.reply("quick", mtplx.stream_generate)
    if time.perf_counter() - t0 < 0.9:  # under a second (unless the machine is loaded): nothing drawn
        assert "prefill of" not in capsys.readouterr().err


# ---------------------------------------------------------------- row 14: long runs say what they will take

def test_bench_announces_its_runs_and_an_estimate_before_timing(demo_bf16):
    from mtplx.bench.runner import run_bench

    model, tok = demo_bf16
    lines: list[str] = []
    report = run_bench(model, tok, ["Hello", "def f("], [0, 1], 4, SamplingParams(temperature=0.0), rounds=1,
                       cost_model=False, reference=False, progress=lines.append)
    assert re.fullmatch(r"4 timed runs of 4 tokens: about \d+ s on this machine \(from 8 tokens at depth 0; .*\)",
                        lines[0])
    assert len(lines) == 5 and all(x.startswith("round 1/1 prompt") for x in lines[1:])  # no bar off a terminal
    assert len(report.results[1].runs) == 2
    silent = run_bench(model, tok, ["Hello"], [0], 4, SamplingParams(temperature=0.0), cost_model=False,
                       reference=False)  # no progress: nothing said, nothing drawn
    assert len(silent.results[0].runs) == 1


def test_concurrency_join_is_off_unless_asked(tmp_path):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    help_text = CliRunner().invoke(cli, ["bench", "--help"]).output
    assert re.search(r"--join-tokens INTEGER RANGE\s+.*\(0: skip;.*\[default: 0;", help_text.replace("\n", " "))
