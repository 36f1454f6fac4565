"""`mtplx bench --workload rewrite --replay` (mtplx/bench/lookup_replay.py): the shipped
references are faithful rewrites, the replay's counts are exact where the answer is known, and
the flag writes the grid."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import mtplx
from mtplx.bench.lookup_replay import (GRID_K, GRID_NGRAMS, MEMORY_BOUND, MEMORY_BOUND_SLOPE, cases,
                                       memory_bound_costs, replay, run_grid)
from mtplx.bench.rewrite import PROMPTS_FILE, RewritePromptError
from mtplx.engine.policy import StepCosts

DEMO = Path(mtplx.__file__).parent / "demo" / "tiny-qwen35-mtp"
PROMPTS = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))["prompts"]
# A CPU-like profile: a verify over t tokens costs t AR steps (no copy can beat AR), and costs grow
# with the context (the replay prices each step at its own).
COMPUTE_BOUND = StepCosts((1.0, 2.0, 3.0, 4.0), 0.1, 0.0, 1.0, 0, (0.5, 1.0, 1.5, 2.0), 0.05)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


def _fenced(text: str) -> str:
    return text[text.index("```"):]


# What each prompt asks, applied to its fenced file by hand: the reference must be exactly that.
EDITS = {
    "python-function": lambda f: f.replace("total", "acc"),
    "json-tool-result": lambda f: f.replace('"Retry failed uploads twice", "status": "open"',
                                            '"Retry failed uploads twice", "status": "closed"'),
    "config-file": lambda f: f.replace("port = 8080", "port = 9090"),
    "short-diff": lambda f: "\n".join(line.replace("recieve", "receive") if line.startswith("+") else line
                                      for line in f.split("\n")),
    "python-class": lambda f: f.replace("def __init__(self, capacity):", "def __init__(self, capacity) -> None:"),
}
CHANGED_LINES = {"python-function": 4, "json-tool-result": 1, "config-file": 1, "short-diff": 3, "python-class": 1}


@pytest.mark.parametrize("p", PROMPTS, ids=[p["name"] for p in PROMPTS])
def test_each_reference_is_its_file_with_only_the_change_asked(p):
    fenced, ref = _fenced(p["messages"][-1]["content"]), p["reference"]
    assert ref == EDITS[p["name"]](fenced) != fenced
    # In the prompt's reply format (the fence and its language as given), and few lines changed.
    assert ref.split("\n")[0] == fenced.split("\n")[0] and ref.endswith("\n```")
    diff = [d for d in difflib.ndiff(fenced.split("\n"), ref.split("\n")) if d[:1] in "+-"]
    assert len(diff) == 2 * CHANGED_LINES[p["name"]]


def test_a_verbatim_copy_emits_k_plus_one_tokens_a_step():
    prompt = list(range(100, 300))  # no token repeats: a 1-gram finds the one place it came from
    k, steps = 8, 7
    reference = prompt[50 : 50 + 1 + (k + 1) * steps]  # the first token comes from the prefill
    mb = memory_bound_costs()
    r = replay(prompt, reference, (1,), k, mb)
    assert (r.tokens, r.steps, r.copy_steps, r.proposed, r.accepted) == ((k + 1) * steps, steps, steps, k * steps,
                                                                         k * steps)
    assert r.tokens_per_step == k + 1 and r.precision == 1.0
    assert r.speedup == pytest.approx((k + 1) / (1 + MEMORY_BOUND_SLOPE * k))
    # Auto on the same copy: it copies (k > 1 pays memory-bound), less than K at first (prior 0.6);
    # its last copy runs past the reference's end.
    a = replay(prompt, reference, (1,), k, mb, "auto")
    assert a.copy_steps == a.steps and a.accepted == a.tokens - a.steps + 1  # the last bonus is past the end
    assert 3 < a.speedup < r.speedup
    # Where a verify of t tokens costs t AR steps no copy pays: auto only probes one token now and
    # then, each kept (2 tokens for 2 AR steps), so it costs exactly AR.
    c = replay(prompt, reference, (1,), k, COMPUTE_BOUND, "auto")
    assert c.copy_steps > 0 and c.proposed == c.accepted == c.copy_steps
    assert c.speedup == pytest.approx(1.0)


@pytest.mark.parametrize("costs", [memory_bound_costs(), COMPUTE_BOUND], ids=["memory-bound", "compute-bound"])
@pytest.mark.parametrize("mode", ["fixed", "auto"])
def test_a_reference_sharing_nothing_with_the_prompt_is_plain_ar(costs, mode):
    r = replay(list(range(100, 400)), list(range(500, 800)), (1,), 32, costs, mode)
    assert (r.tokens, r.steps, r.proposed, r.accepted, r.precision) == (299, 299, 0, 0, None)
    assert r.speedup == 1.0


def test_the_shipped_references_on_the_demo_tokenizer(tokenizer):
    found = cases(tokenizer)
    assert [c.name for c in found] == [p["name"] for p in PROMPTS]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for c, p in zip(found, PROMPTS):
        assert c.reference[-1] == end and tokenizer.decode(c.reference[:-1]) == p["reference"]
        assert tokenizer.decode(c.prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    report = run_grid(found, ngrams_grid=[(12, 2), (3,)], k_grid=[4, 16])
    assert len(report.results) == 1 * 2 * 2 * 2  # one profile, two modes, two n-gram sets, two K
    best = report.ranked(MEMORY_BOUND, "fixed")[0]
    assert best[:2] == ((12, 2), 16) and best[2] > 5  # a faithful rewrite copies most of its file
    assert 1 < report.total((MEMORY_BOUND, "auto", (12, 2), 16)).speedup <= best[2]


def test_a_prompts_file_without_references_is_refused(tokenizer, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"prompts": [{k: v for k, v in PROMPTS[0].items() if k != "reference"}]}))
    with pytest.raises(RewritePromptError, match="no \"reference\""):
        cases(tokenizer, path)


def test_bench_replay_flag_writes_the_grid(tmp_path, monkeypatch):
    from mtplx.cli.commands import cli
    from mtplx.generation.speculation import save_step_costs

    # This machine's costs saved beforehand (as `mtplx tune` does): timing them takes half a minute.
    config = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(config))
    model, _ = mtplx.load("demo")
    save_step_costs(model, COMPUTE_BOUND, "tune")
    out = tmp_path / "replay.json"
    env = {"MTPLX_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(cli, ["bench", "--workload", "rewrite", "--replay", "--json", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "best for lookup auto" in result.output
    data = json.loads(out.read_text())["replay"]
    assert set(data["profiles"]) == {"memory-bound", "this machine"}
    assert "1 + 0.02 (t - 1)" in data["profiles"]["memory-bound"]["assumption"]
    assert len(data["grid"]) == 2 * 2 * len(GRID_NGRAMS) * len(GRID_K)
    row = data["grid"][0]
    assert set(row["per_prompt"]) == {p["name"] for p in PROMPTS} and row["total"]["tokens"] > 0
    assert set(data["best_memory_bound"]) == {"fixed", "auto"}

    bad = CliRunner().invoke(cli, ["bench", "--replay"], env=env)
    assert bad.exit_code != 0 and "--replay goes with --workload rewrite" in bad.output
