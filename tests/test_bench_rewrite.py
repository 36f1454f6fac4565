"""`mtplx bench --workload rewrite` (mtplx/bench/rewrite.py), `mtplx bench --lookup` and
`mtplx start --lookup`: the four ways on the demo, exact at greedy, and the flags' parsing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mtplx.bench.rewrite import PROMPTS_FILE, RewritePromptError, copied, load_prompts, ways
from mtplx.errors import MtplxError

ROOT = Path(__file__).resolve().parents[1]
# One short prompt: the four ways' prefill and decode stay within seconds on a CPU.
SHORT = {"prompts": [{"name": "add", "kind": "a Python function", "change": "none",
                      "messages": [{"role": "user", "content": "def add(a, b):\n    return a + b\n"}]}]}


def _cli(args: list[str], tmp_path: Path, **kw):
    from mtplx.cli.commands import cli

    env = {"MTPLX_CONFIG": str(tmp_path / "config.json"), "HF_HUB_OFFLINE": "1"}
    return CliRunner().invoke(cli, args, env=env, **kw)


# -- pieces, no model ------------------------------------------------------------------------

def test_copied_tells_a_copy_of_the_prompt_from_a_repeat_of_the_output():
    prompt = [10, 11, 12, 13, 14, 15, 16]
    # The reply starts as the prompt does: after 3 tokens the 3-gram [10 11 12] predicts 13, 14 ...
    assert copied(prompt, [10, 11, 12, 13, 14, 15], ngrams=(3,)) == (3, 0)
    # A loop of 1 2 3 not in the prompt: once each 3-gram of the loop has been followed once (the
    # third round), the reply's own earlier tokens predict every token.
    assert copied(prompt, [1, 2, 3] * 3, ngrams=(3,)) == (0, 3)
    assert copied(prompt, [1, 2, 3] * 5, ngrams=(3,)) == (0, 9)
    # A 3-gram seen in the prompt but followed there by another token predicts nothing right.
    assert copied(prompt, [11, 12, 13, 99], ngrams=(3,)) == (0, 0)


def test_ways():
    assert [(w.name, w.depth, w.lookup) for w in ways("auto", True)] == [
        ("AR", 0, 0), ("MTP", "auto", 0), ("lookup", 0, 8), ("both", "auto", "auto")]
    assert [(w.name, w.depth, w.lookup) for w in ways(5, True, depth=2)] == [
        ("AR", 0, 0), ("MTP", 2, 0), ("lookup", 0, 5), ("both", 2, 5)]
    assert [w.name for w in ways("auto", False)] == ["AR", "lookup"]  # no head: no MTP ways
    with pytest.raises(MtplxError, match="--lookup 0 leaves nothing to compare"):
        ways(0, True)
    with pytest.raises(MtplxError, match="depth 0 leaves nothing to compare"):
        ways("auto", True, depth=0)


def test_shipped_prompts_hand_back_a_file_and_ship_as_package_data():
    prompts = load_prompts()
    assert 4 <= len(prompts) <= 6
    assert {"python-function", "json-tool-result", "config-file", "short-diff"} <= {p.name for p in prompts}
    assert all(p.change and p.messages[-1]["role"] == "user" for p in prompts)
    assert PROMPTS_FILE.parent == ROOT / "mtplx" / "data"
    assert '"mtplx" = ["demo/**/*", "data/*"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("content, field", [
    ("{", "not a readable JSON file"),
    ('{"prompts": []}', "'prompts' must be a non-empty list"),
    ('{"prompts": [{"name": "x", "messages": [{"role": "user"}]}]}', "prompts[0].messages"),
    ('{"prompts": [{"name": 3, "messages": [{"role": "user", "content": "a"}]}]}', "prompts[0]: name"),
])
def test_bad_prompts_file_names_the_file_and_field(tmp_path, content, field):
    f = tmp_path / "rw.json"
    f.write_text(content)
    with pytest.raises(RewritePromptError, match=re.escape(field)) as e:
        load_prompts(f)
    assert str(f) in str(e.value) and "Fix:" in str(e.value)


# -- the workload on the demo ---------------------------------------------------------------

def test_rewrite_workload_runs_the_four_ways_and_is_exact_at_greedy(demo_bf16_path, tmp_path):
    """Through the CLI, on the demo's bf16 copy (a quarter of the 4-bit demo's CPU time): a pinned
    depth 2 drafts with the head (auto may run depth 0 throughout on a loaded machine); the
    demo's reply starts by repeating the prompt's first line, so the lookup ways copy within 8
    tokens."""
    prompts, out = tmp_path / "rw.json", tmp_path / "out.json"
    prompts.write_text(json.dumps(SHORT))
    r = _cli(["bench", "--model", str(demo_bf16_path), "--workload", "rewrite", "--prompts", str(prompts), "-n", "8",
              "-t", "0", "--depths", "2", "--json", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    assert f"mtplx bench --workload rewrite: {demo_bf16_path}" in r.output and "copyable: the share of output tokens" in r.output
    assert "Greedy: every way emitted the same tokens as AR for every prompt: yes." in r.output
    report = json.loads(out.read_text())["rewrite"]
    w = report["ways"]
    assert list(w) == ["AR", "MTP", "lookup", "both"]
    assert [(x["depth"], x["lookup"]) for x in w.values()] == [(0, 0), (2, 0), (0, 8), (2, "auto")]
    texts = {name: x["texts"] for name, x in w.items()}
    assert texts["AR"][0] and all(t == texts["AR"] for t in texts.values())  # exactness: the same text every way
    for name, x in w.items():
        assert x["generated"] == sum(x["tokens_from"].values()) == 8
        assert x["tokens_per_second"] > 0 and x["steps"] >= 1
        assert set(x["copyable"]) == {"from_prompt", "from_own_output", "share_from_prompt", "share_from_own_output"}
    assert w["AR"]["tokens_from"] == {"lookup": 0, "mtp": 0, "sampled": 8} and w["AR"]["vs_ar"] == 1.0
    assert w["MTP"]["tokens_from"]["lookup"] == 0 and w["MTP"]["tokens_from"]["mtp"] > 0
    assert w["lookup"]["tokens_from"]["mtp"] == 0 and w["lookup"]["tokens_from"]["lookup"] > 0
    assert 0 < w["lookup"]["lookup_acceptance"] <= 1
    # The same output, so the same copyable counts, whichever way decoded it.
    assert len({json.dumps(x["copyable"]) for x in w.values()}) == 1
    assert report["same_tokens_as_ar"] is True and report["copyable_means"]


def test_plain_bench_runs_every_timed_run_with_lookup():
    """run_bench (what `mtplx bench --lookup` calls) on a tiny random model, whose greedy output
    loops at once: at depth 0 a forced lookup copies the loop, lookup 0 copies nothing."""
    from mtplx.bench.runner import run_bench
    from mtplx.engine.sampling import SamplingParams
    from tiny_models import tiny_model

    model = tiny_model(vocab=16)
    prompt = [1, 4, 2, 1, 4, 5, 3, 0, 2, 7, 9, 11]  # token ids pass through encode_prompt: no tokenizer needed
    for lookup in (4, 0):
        data = run_bench(model, None, [prompt], [0, 2], 24, SamplingParams(temperature=0.0), cost_model=False,
                         reference=False, lookup=lookup).as_dict()
        assert data["lookup"] == lookup
        for d in ("0", "2"):
            (run,) = data["depths"][d]["tokens_from"]
            assert sum(run.values()) == 24
        copies = data["depths"]["0"]["tokens_from"][0]["lookup"]
        assert copies > 0 if lookup else copies == 0


# -- bench --shape --lookup-acceptance A --lookup-length K -----------------------------------

def test_shape_projects_copies_measured_and_memory_bound(tmp_path):
    from test_shapes import TINY

    shape, out = tmp_path / "tiny-shape.json", tmp_path / "shape.json"
    shape.write_text(json.dumps({"text_config": TINY}))
    r = _cli(["bench", "--shape", str(shape), "--layers", "4", "--prompt-tokens", "24", "--repeats", "1",
              "--acceptance", "0.8,0.5", "--draft-vocab", "1024", "--lookup-acceptance", "0.9", "--lookup-length", "4",
              "--json", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    p = json.loads(out.read_text())["lookup_projection"]
    assert p["tokens_per_step"] == pytest.approx(1 + 0.9 + 0.9**2 + 0.9**3 + 0.9**4, abs=1e-4)
    # A copy of 4 is a verify of 5 tokens; the shape measured verify up to depth 2 + 1 = 3 tokens.
    assert p["this_machine"] > 0 and p["this_machine_extrapolated"] is True
    assert 1 < p["memory_bound"] < p["tokens_per_step"]
    assert "lookup, every step copying 4 tokens at acceptance 0.9" in r.output


def test_shape_no_measure_projects_copies_from_the_stored_bytes(tmp_path):
    out = tmp_path / "shape.json"
    for a, k in ((0.9, 8), (0.0, 8)):
        r = _cli(["bench", "--shape", "qwen3.5-4b", "--no-measure", "--lookup-acceptance", str(a), "--lookup-length",
                  str(k), "--json", str(out)], tmp_path)
        assert r.exit_code == 0, r.output
        p = json.loads(out.read_text())["lookup_projection"]
        assert p["this_machine"] is None
        if a:  # a 4B trunk's weights dominate a 9-token verify: nearly E[tokens/step] times AR
            assert 0.9 * p["tokens_per_step"] < p["memory_bound"] < p["tokens_per_step"]
        else:  # nothing kept: one token a step, at a 9-token verify's cost
            assert p["tokens_per_step"] == 1 and p["memory_bound"] < 1


# -- the flags' parsing ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--workload", "rewrite", "--lookup", "0"], "--lookup 0 leaves nothing to compare"),
    (["--workload", "rewrite", "--depths", "0"], "depth 0 leaves nothing to compare"),
    (["--workload", "rewrite", "--chat-turns", "2"], "are separate workloads"),
    (["--chat-turns", "2", "--lookup", "4"], "--lookup goes with the plain bench and --workload rewrite"),
    (["--shape", "qwen3.5-4b", "--lookup", "4", "--no-measure"], "--shape measures no runs"),
    (["--workload", "rewrite", "--shape", "qwen3.5-4b"], "pass --model, not --shape"),
    (["--lookup", "often"], "lookup"),
    (["--lookup-acceptance", "0.9", "--lookup-length", "4"], "go together, with --shape"),
    (["--shape", "qwen3.5-4b", "--lookup-acceptance", "0.9"], "go together, with --shape"),
    (["--shape", "qwen3.5-4b", "--lookup-acceptance", "1.5", "--lookup-length", "4"], "--lookup-acceptance"),
    (["--shape", "qwen3.5-4b", "--lookup-acceptance", "0.5", "--lookup-length", "33"], "--lookup-length"),
    (["--workload", "retype"], "Invalid value for '--workload'"),
])
def test_bench_refuses_what_does_not_go_together(tmp_path, args, message):
    r = _cli(["bench", "--model", "demo", *args], tmp_path)
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert "Traceback" not in r.output


def test_start_lookup_reaches_the_chat_and_the_server(tmp_path, monkeypatch):
    import mtplx.cli.chat as chat
    import mtplx.cli.serve_cmd as serve_cmd

    seen = {}
    monkeypatch.setattr(chat, "run_chat", lambda session: seen.update(chat=session.lookup))
    r = _cli(["start", "--model", "demo", "--yes", "--lookup", "6"], tmp_path)
    assert r.exit_code == 0 and seen == {"chat": 6}, r.output
    r = _cli(["start", "--model", "demo", "--yes"], tmp_path)
    assert r.exit_code == 0 and seen == {"chat": "auto"}, r.output  # the default: auto

    @click.command("serve")
    @click.option("--model", "model_ref")
    @click.option("--depth", default=None)
    @click.option("--no-mtp", is_flag=True)
    @click.option("--lookup", default="auto")
    def fake_serve(model_ref, depth, no_mtp, lookup, **rest):  # rest: options other flags pass on
        seen.update(serve=lookup)

    monkeypatch.setattr(serve_cmd, "serve", fake_serve)
    r = _cli(["start", "--model", "demo", "--surface", "serve", "--depth", "2", "--lookup", "auto"], tmp_path)
    assert r.exit_code == 0 and seen["serve"] == "auto", r.output
    r = _cli(["start", "--model", "demo", "--surface", "serve", "--depth", "2", "--lookup", "12"], tmp_path)
    assert r.exit_code == 0 and seen["serve"] == 12, r.output
    r = _cli(["start", "--model", "demo", "--lookup", "33", "--yes"], tmp_path)
    assert r.exit_code in (1, 2) and "lookup must be" in r.output and "Traceback" not in r.output, r.output
