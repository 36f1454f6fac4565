"""`mtplx bench --agent-trace` (replay of a recorded agent session through the prompt cache) and
`mtplx bench --context` (decode speed and acceptance by context length)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mtplx
from mtplx.bench.agent_trace import SAMPLE_FILE, TraceError, load_trace, system_tokens
from mtplx.bench.context_sweep import cap_lengths, context_ids, parse_lengths
from mtplx.cli.commands import cli
from mtplx.errors import MtplxError

DEMO_DIR = Path(mtplx.__file__).parent / "demo" / "tiny-qwen35-mtp"


def _bench(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["bench", *args])
    return r.exit_code, r.output


def test_sample_trace_is_an_agent_session():
    trace = load_trace("sample")
    reqs = trace.requests
    assert len(reqs) >= 10 and trace.path == str(SAMPLE_FILE)
    last = reqs[-1].messages
    calls = [c for m in last if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    results = [m for m in last if m["role"] == "tool"]
    assert len(calls) >= 10 and len(results) == len(calls)
    assert {c["function"]["name"] for c in calls} >= {"read_file", "edit_file", "run_command"}
    assert any("passed" in m["content"] for m in results) and any("def parse_amount" in m["content"] for m in results)
    assert any("reasoning_content" in m for m in last)  # a reasoning block the template drops on later turns
    assert all(r.tools and len(r.tools) >= 5 for r in reqs)
    # Each request is the whole conversation so far: the one before it is its prefix.
    for a, b in zip(reqs, reqs[1:]):
        assert b.messages[: len(a.messages)] == a.messages and len(b.messages) > len(a.messages)
    assert sum(m["role"] == "user" for m in last) == 2


def test_sample_system_turn_is_about_6k_qwen_tokens(demo):
    """The Qwen3.5 count was made once with Qwen3.5's tokenizer (docs/agent-traces.md); the demo's
    own count is checked here, so the trace and its recorded figures cannot drift apart."""
    meta = json.loads(SAMPLE_FILE.read_text())["tokenizer_counts"]
    assert 5500 <= meta["qwen3.5"] <= 6600
    _, tokenizer = demo
    n = system_tokens(tokenizer, load_trace("sample").requests[0])
    assert abs(n - meta["demo"]) <= 8, (n, meta["demo"])


@pytest.mark.parametrize("content, where", [
    ("not json", "is not a readable JSON file"),
    ("[]", "the top level is not a non-empty list"),
    ('{"requests": {}}', "requests is not a non-empty list"),
    ('[{"messages": [{"role": "robot", "content": "x"}]}]', "requests[0].messages[0] has role 'robot'"),
    ('[{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}]', "requests[0].max_tokens is 0"),
    ('[{"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}]', "requests[0].tools"),
    ('[{"messages": [{"role": "user", "content": "x"}], "temperature": 1}]', "unknown field(s) temperature"),
    ('[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{oops"}}]}]}]',
     "requests[0].messages[1].tool_calls[0].function.arguments is not JSON"),
])
def test_a_bad_trace_is_refused_naming_file_and_field(tmp_path, content, where):
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(TraceError) as e:
        load_trace(str(path))
    assert where in str(e.value) and str(path) in str(e.value)
    code, out = _bench("--agent-trace", str(path))
    assert code != 0 and where in out and "Traceback" not in out


def test_a_missing_trace_file_is_one_clear_error(tmp_path):
    code, out = _bench("--agent-trace", str(tmp_path / "nope.json"))
    assert code != 0 and "no trace file at" in out and "'sample'" in out


@pytest.fixture(scope="module")
def long_context(fixture_checkpoint, tmp_path_factory):
    """docs/agent-traces.md's recipe: the fixture with a larger max_position_embeddings, the demo's
    tokenizer and chat template (Qwen3.5's, which renders tools), grafted onto a bf16 trunk."""
    from mtplx.artifact.graft import graft

    root = tmp_path_factory.mktemp("long-context")
    src = root / "src"
    shutil.copytree(fixture_checkpoint, src)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_DIR / name, src / name)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 8192
    (src / "config.json").write_text(json.dumps(config))
    graft(src, root / "tiny-8k", trunk_bits=16)
    return root / "tiny-8k"


@pytest.fixture(scope="module")
def long_context_narrow(tmp_path_factory):
    """A random model of Qwen3.5's layout (tests/test_shapes.py's TINY: hidden 64, 4 layers, one of
    them full attention) with a context of 8,192 and the demo's tokenizer and chat template, saved
    as an artifact: the same caches and engine as the long-context copy, at a small fraction of
    its prefill time on a CPU, for a turn of over 4,096 tokens."""
    from test_shapes import TINY

    from mtplx.bench.shape_models import Shape, random_modules, save_artifact

    out = tmp_path_factory.mktemp("long-context-narrow") / "random-8k"
    save_artifact(random_modules(Shape("tiny-8k", {**TINY, "max_position_embeddings": 8192}), layers=4), out,
                  trunk_bits=16)
    return out


def _small_trace(path: Path) -> None:
    """The sample's first three requests cut small (system prompt, tools and tool results
    shortened: a test's prefill must take seconds), then its real first request, over the long-
    context copy's 8,192 tokens, then one more (past --turns)."""
    sample = json.loads(SAMPLE_FILE.read_text())["requests"]

    def cut(req):
        msgs = []
        for m in req["messages"]:
            m = dict(m)
            if m["role"] in ("system", "tool"):
                m["content"] = m["content"][:300]
            msgs.append(m)
        return {"messages": msgs, "tools": req["tools"][:1], "max_tokens": 64}

    path.write_text(json.dumps([cut(r) for r in sample[:3]] + [sample[0], cut(sample[3])]))


def test_replay_reports_each_turn_and_a_restart_pass(long_context_narrow, tmp_path):
    trace = tmp_path / "small.json"
    _small_trace(trace)
    out = tmp_path / "r.json"
    code, text = _bench("--model", str(long_context_narrow), "--agent-trace", str(trace), "--turns", "4", "-n", "4",
                        "--depths", "0,2", "--temperature", "0", "--json", str(out))
    assert code == 0, text
    assert "turn" in text and "TTFT s" in text and "after a restart" in text and "skipped" in text
    r = json.loads(out.read_text())["agent_trace"]
    assert r["requests_in_trace"] == 5 and r["depth"] == 2 and r["max_context"] == 8192
    first, restart = r["passes"]
    turns = first["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    t1, t2, t3, t4 = turns
    assert t1["cached_tokens"] == 0 and t1["prefilled_tokens"] == t1["prompt_tokens"] < t2["prompt_tokens"]
    # Turn 2 extends turn 1 by the recorded reply and a tool result: the cache serves turn 1's
    # prompt up to its end-of-prompt snapshot (the recorded reply differs from the model's).
    assert t2["cached_tokens"] >= t1["prompt_tokens"] - 2 and t3["cached_tokens"] >= t2["prompt_tokens"] - 2
    for t in (t1, t2, t3):
        assert t["prefill_s"] > 0 and t["ttft_s"] >= t["prefill_s"] and t["decode_tps"] > 0
        assert t["prefilled_tokens"] == t["prompt_tokens"] - t["cached_tokens"] and 1 <= t["generated"] <= 4
    assert t4["prompt_tokens"] > 8192 and "do not fit the model's context of 8192" in t4["skipped"]
    assert first["totals"]["turns"] == 3 and first["totals"]["skipped"] == 1
    # The restarted server (memory dropped, the disk tier's folder kept) serves turn 1 from disk,
    # as far as the first run's end-of-prompt snapshot, and says so.
    assert "disk tier kept" in restart["note"] and first["disk"]["writes"] >= 1 and restart["disk"]["loads"] >= 1
    assert restart["turns"][0]["cached_tokens"] >= t1["prompt_tokens"] - 2
    # Turn 2 is served further than on the first run: the folder holds the whole first run's
    # conversation, with a snapshot at the end of each of its prompts.
    assert restart["turns"][1]["cached_tokens"] >= max(t2["cached_tokens"], t2["prompt_tokens"] - 2)
    assert any(v.startswith("turn 1 after the restart") for v in r["verdicts"]) and "after the restart" in text


def test_a_sample_over_the_context_is_skipped_not_a_crash():
    code, text = _bench("--model", "demo", "--agent-trace", "sample", "--turns", "2", "--no-restart")
    assert code == 0, text
    assert text.count("skipped: the prompt's") == 2 and "after a restart" not in text
    code, text = _bench("--model", "demo", "--agent-trace", "sample", "--turns", "1", "--prompt-cache-dir", "none")
    assert code == 0, text
    assert "memory only" in text and "no disk tier (--prompt-cache-dir none)" in text


@pytest.mark.parametrize("args, message", [
    (["--turns", "3"], "--turns goes with --agent-trace"),
    (["--prompt-cache-dir", "none"], "--prompt-cache-dir goes with --agent-trace"),
    (["--agent-trace", "sample", "--context", "1k"], "separate workloads"),
    (["--agent-trace", "sample", "--shape", "qwen3.5-4b"], "pass --model, not --shape"),
    (["--context", "1k,zz"], "'zz' is not a context length"),
    (["--context", "1k", "--shape", "qwen3.5-4b", "--no-measure"], "drop --no-measure"),
])
def test_bench_refuses_mixed_workloads(args, message):
    code, out = _bench(*args)
    assert code != 0 and message in out, out


@pytest.mark.slow
def test_a_turn_past_4096_tokens_replays_through_the_prompt_cache(long_context_narrow, tmp_path):
    """A request over the demo's context runs on a model whose context is 8,192: its prompt is
    cached from the turn before (only the new part is prefilled); past that context it is skipped."""
    sample = json.loads(SAMPLE_FILE.read_text())["requests"]
    short = dict(sample[0], messages=[dict(sample[0]["messages"][0], content=sample[0]["messages"][0]["content"][:400]),
                                      sample[0]["messages"][1]], tools=sample[0]["tools"][:2])
    grown = dict(sample[2], messages=short["messages"] + sample[2]["messages"][2:], tools=short["tools"])
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"name": "long", "requests": [short, grown, sample[-1]]}))
    out = tmp_path / "r.json"
    code, text = _bench("--model", str(long_context_narrow), "--agent-trace", str(trace), "-n", "2", "--depths", "2",
                        "--temperature", "0", "--no-restart", "--json", str(out))
    assert code == 0, text
    r = json.loads(out.read_text())["agent_trace"]
    assert r["max_context"] == 8192
    a, b, c = r["passes"][0]["turns"]
    assert 4096 < b["prompt_tokens"] < 8192 and b["cached_tokens"] >= a["prompt_tokens"] - 2 and b["generated"] >= 1
    assert "do not fit the model's context of 8192" in c["skipped"]


# -- --context ---------------------------------------------------------------------------------

def test_context_lengths_parse_and_cap():
    assert parse_lengths("32k, 1k,8k,1024") == [1024, 8192, 32768]
    with pytest.raises(MtplxError, match="'0' is not a context length"):
        parse_lengths("1k,0")
    kept, notes = cap_lengths([1024, 8192, 32768], 4096, 260)
    assert kept == [1024, 3836] and "8192, 32768 dropped" in notes[0] and "measured at 3836" in notes[0]
    assert cap_lengths([1024], 4096, 260) == ([1024], [])


def test_context_ids_have_the_length_and_a_shared_tail(demo):
    _, tokenizer = demo
    a, b = context_ids(tokenizer, 300), context_ids(tokenizer, 900)
    assert len(a) == 300 and len(b) == 900 and a[-20:] == b[-20:] and a[:100] == b[:100]


def test_context_sweep_reports_each_depth_and_acceptance_by_position(long_context, tmp_path):
    out = tmp_path / "c.json"
    code, text = _bench("--model", str(long_context), "--context", "128,384", "--depths", "0,2,auto", "-n", "12",
                        "--temperature", "0", "--json", str(out))
    assert code == 0, text
    r = json.loads(out.read_text())["context"]
    assert [p["context"] for p in r["points"]] == [128, 384] and r["notes"] == []  # capping: see above
    assert "acceptance by position" in text
    for p in r["points"]:
        assert list(p["depths"]) == ["AR", "2", "auto"] and p["prefill_s"] > 0
        ar, d2, auto = p["depths"].values()
        assert ar["speedup"] == 1.0 and ar["acceptance"] == [] and ar["tokens_per_step"] == pytest.approx(1.0)
        assert len(d2["acceptance"]) == 2 and 0 <= d2["acceptance"][1] <= d2["acceptance"][0] <= 1
        assert d2["tokens_per_step"] >= 1 and "mix" in auto
        assert all(1 <= x["generated"] <= 12 and len(x["round_tps"]) == 1 for x in (ar, d2, auto))
        assert len(p["auto_vs_best_fixed_by_round"]) == 1


def test_shape_context_prefills_each_length_and_caps_at_the_config(tmp_path):
    from test_shapes import TINY

    shape = tmp_path / "tiny-shape.json"
    shape.write_text(json.dumps({"text_config": {**TINY, "max_position_embeddings": 64}}))
    out = tmp_path / "s.json"
    code, text = _bench("--shape", str(shape), "--layers", "2", "--context", "24,48,100", "--repeats", "1",
                        "--acceptance", "0.8,0.5", "--trunk-bits", "16", "--json", str(out))
    assert code == 0, text
    r = json.loads(out.read_text())["context"]
    assert r["measured"] == "projected" and [p["context"] for p in r["points"]] == [24, 48, 63]
    assert "100 dropped" in r["notes"][0] and "not measured" in r["notes"][1]
    for p in r["points"]:
        assert list(p["depths"]) == ["AR", "1", "2", "auto"]
        ar = p["depths"]["AR"]
        assert ar["tps"] == pytest.approx(1000 / ar["ar_step_ms"], rel=1e-3)
        assert p["depths"]["2"]["acceptance"] == [0.8, 0.5] and p["depths"]["2"]["tokens_per_step"] == 2.3
        assert p["depths"]["2"]["tps"] == pytest.approx(ar["tps"] * p["depths"]["2"]["speedup"], rel=1e-3)
