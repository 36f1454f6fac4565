"""Strict greedy (mtplx/engine/strict.py): a greedy token a verify row decided at a near-tie is
decided again by a one-row pass, and the output still equals greedy AR.

On this CPU a verify row rounds as a decode step, so greedy MTP already equals greedy AR; what
these tests check is that the recompute path itself is exact: with every decided token
recomputed (margin +inf: a rollback of the whole block every step) and with recomputes at
seeded random rows of the block (a selector standing in for the near-ties a GPU would show:
rows 0..D, the bonus row included), the tokens equal greedy AR's, every cache equals an AR
pass over the consumed tokens after every step, a grammar still holds, logprobs are AR's, a
strict row in a batch equals itself alone, and temperature > 0 is left alone.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import mtplx
from cache_compare import compare
from test_batch import Cycle, bf16, tiny  # noqa: F401 - a depth policy; the fixtures
from mtplx.engine import steps, strict
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.constraints import Constraint
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from tiny_grammar import PIECES, grammar, grammar_tokenizer
from tiny_models import tiny_model

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=0)
TEXTS = ["def f(x):\n", "import os\nimport sys\n\n\ndef main(argv):\n    ",
         "class Stack:\n    def __init__(self):\n        self.items = []\n"]


def decode(model, prompt, n, depth, params=GREEDY, margin=None, seed=0, **kw):
    """(tokens, steps, engine) of one row through the one-row engine."""
    engine = Engine(model, depth, params, seed=seed, strict_greedy=margin, **kw)
    steps = list(engine.generate(prompt, n))
    return [t for s in steps for t in s.tokens], steps, engine


@pytest.fixture
def random_near_ties(monkeypatch):
    """Margins drawn at random (0 = a near-tie with probability 0.3, else +inf) instead of
    the logits' own: recomputes land on every row of the block, seeded."""
    gen = np.random.default_rng(5)

    def margins(logits):
        return mx.array(np.where(gen.random(logits.shape[0]) < 0.3, 0.0, np.inf).astype(np.float32))

    monkeypatch.setattr(strict, "margins", margins)


@pytest.fixture(scope="module")
def greedy_ar(bf16):
    model, tok = bf16
    prompts = [tok.encode(t) for t in TEXTS]
    return prompts, [decode(model, p, 20, 0)[0] for p in prompts]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("margin", [strict.NEAR_TIE, math.inf])
def test_strict_greedy_equals_greedy_ar(bf16, greedy_ar, depth, margin):
    model, _ = bf16
    for prompt, want in zip(*greedy_ar):
        got, steps, engine = decode(model, prompt, 20, depth, margin=margin)
        assert got == want
        if margin == math.inf:
            # Every token but the first (the prefill's) is decided by a verify row, so each is
            # recomputed: the first row of every block is a "near-tie", the whole block rolls back.
            assert engine.stats.recomputed == len(got) - 1
            assert all(len(s.tokens) == 1 and s.accepted == 0 for s in steps[1:])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_recomputes_anywhere_in_the_block_equal_ar(bf16, greedy_ar, depth, random_near_ties):
    model, _ = bf16
    rows_hit = set()
    for prompt, want in zip(*greedy_ar):
        got, steps, engine = decode(model, prompt, 20, depth, margin=strict.NEAR_TIE)
        assert got == want
        rows_hit |= {s.accepted for s in steps[1:]}
        assert engine.stats.recomputed > 0
    assert {0, 1} <= rows_hit, "the recompute never landed past the block's first row"


# Three of the six (margin x pending cap x depth) combinations: each value of each axis once,
# the suite's time being worth more than the three crossings left out.
@pytest.mark.parametrize("margin, cap, depth", [(math.inf, 0, 3), ("random", 16, 3), ("random", 0, "cycle")])
def test_every_cache_equals_ar_after_every_step(bf16, greedy_ar, margin, cap, depth, monkeypatch, request):
    """The whole-block rollback (i = 0) and rollbacks inside the block leave every cache (KV,
    Gated-DeltaNet conv and recurrent states, head rows) as an AR pass over the consumed tokens
    (bit for bit on this CPU's bf16), with pending Gated-DeltaNet prefixes applied eagerly
    (cap 0, the CPU's) and deferred (cap 16, a fused kernel's); "cycle" mixes in depth-0 steps,
    which a policy choosing per step takes in the plain lane (batch.py): the row leaves and
    re-enters it, its hiddens joining the head's backlog."""
    monkeypatch.setattr("mtplx.model.gated_delta_cache.pending_cap", lambda key_dim: cap)
    if margin == "random":
        request.getfixturevalue("random_near_ties")
    model, _ = bf16
    where = set()
    prompts, ar = greedy_ar
    for prompt, want in zip(prompts[:1], ar):  # (the AR reference re-runs the whole sequence at every step)
        policy = Cycle([2, 0, 3, 0, 1]) if depth == "cycle" else depth
        engine = Engine(model, policy, GREEDY, strict_greedy=math.inf if margin == math.inf else strict.NEAR_TIE)
        emitted = []
        for i, step in enumerate(engine.generate(prompt, 20)):
            emitted += step.tokens
            if i == 0:
                continue
            where.add(step.accepted)
            # a speculative step leaves the last token pending; the plain lane (the cycle's
            # depth-0 steps) has fed every token it emitted
            consumed = engine.cache.offset - len(prompt)
            assert consumed in (len(emitted) - 1, len(emitted))
            compare(model, engine.cache, prompt + emitted[:consumed], atol=1e-6)
        assert emitted == want and engine.stats.recomputed > 0
    assert where == {0} if margin == math.inf else len(where) > 1


@pytest.mark.parametrize("cap", [0, 16])
def test_a_commit_can_keep_none_of_the_block(tiny, cap, monkeypatch):
    """engine/cache.py commit(accepted=-1): every trunk cache as before the block, including a
    Gated-DeltaNet prefix left pending by the commit before (cap 16)."""
    monkeypatch.setattr("mtplx.model.gated_delta_cache.pending_cap", lambda key_dim: cap)
    prompt = [3, 1, 4, 1, 5]
    cache = tiny.make_cache()
    steps.prefill(tiny, prompt, cache)
    _, _, record = steps.verify(tiny, cache, mx.array([[2, 7, 1]]))
    steps.commit(cache, record, accepted=1)  # keeps 2, 7
    pending = max(getattr(c, "pending_len", 0) for c in cache.trunk)
    assert pending == (2 if cap else 0)
    for block in ([9, 9, 4], [6]):
        _, _, record = steps.verify(tiny, cache, mx.array([block]))
        steps.commit(cache, record, accepted=-1)
        assert cache.offset == len(prompt) + 2
        assert max(getattr(c, "pending_len", 0) for c in cache.trunk) == pending
        compare(tiny, cache, prompt + [2, 7])


def test_the_budget_ending_inside_the_kept_drafts_recomputes_nothing(bf16, greedy_ar, random_near_ties):
    model, _ = bf16
    prompts, ar = greedy_ar
    for n in range(1, 8):
        got, _, _ = decode(model, prompts[1], n, 3, margin=strict.NEAR_TIE)
        assert got == ar[1][:n]


def test_a_strict_row_in_a_batch_equals_itself_alone(bf16, greedy_ar):
    model, _ = bf16
    prompts, ar = greedy_ar
    mine = RowRequest(prompts[1], 20, GREEDY, depth=2, strict_greedy=math.inf)
    decoder = BatchDecoder(model, max_batch=3)
    rows = [decoder.add(RowRequest(prompts[0], 20, SAMPLED, depth=3, seed=1)), decoder.add(mine),
            decoder.add(RowRequest(prompts[2], 20, GREEDY, depth=1))]
    while len(decoder):
        decoder.step()
    assert rows[1].emitted == ar[1]
    assert rows[1].stats.recomputed == len(ar[1]) - 1
    assert rows[2].emitted == ar[2] and rows[0].stats.recomputed == rows[2].stats.recomputed == 0
    solo, _, _ = decode(model, prompts[0], 20, 3, SAMPLED, seed=1)
    assert rows[0].emitted == solo


def test_a_strict_depth_0_row_in_a_batch_is_checked_not_plain(bf16, greedy_ar):
    """A depth-0 row shares the batch's pass, so a strict one stays out of the plain lane (whose
    token is never looked at on the host before it is fed) and its near-ties are recomputed."""
    model, _ = bf16
    prompts, ar = greedy_ar
    decoder = BatchDecoder(model, max_batch=2)
    rows = [decoder.add(RowRequest(prompts[2], 12, GREEDY, depth=0, strict_greedy=math.inf)),
            decoder.add(RowRequest(prompts[0], 12, GREEDY, depth=0))]
    assert [r.plain for r in rows] == [False, True]
    while len(decoder):
        decoder.step()
    assert rows[0].emitted == ar[2][:12] and rows[1].emitted == ar[0][:12]
    assert rows[0].stats.recomputed == 11 and rows[1].stats.recomputed == 0


@pytest.mark.parametrize("margin", [strict.NEAR_TIE, math.inf])
def test_temperature_above_zero_is_unchanged(bf16, greedy_ar, margin):
    model, _ = bf16
    prompt = greedy_ar[0][1]
    plain, _, _ = decode(model, prompt, 24, 2, SAMPLED, seed=11)
    got, _, engine = decode(model, prompt, 24, 2, SAMPLED, margin=margin, seed=11)
    assert got == plain and engine.stats.recomputed == 0


def test_a_grammar_holds_through_recomputes(random_near_ties):
    model = tiny_model(vocab=len(PIECES), seed=0, embed_scale=0.1)

    def run(depth, margin):
        return decode(model, [1, 2, 1], 24, depth, margin=margin,
                      constraint=Constraint(grammar_tokenizer(), grammar()))

    want, _, _ = run(0, None)
    for depth in (1, 3):
        got, _, engine = run(depth, strict.NEAR_TIE)
        assert got == want and engine.stats.recomputed > 0


def test_logprobs_of_recomputed_tokens_are_ars(tiny, random_near_ties):
    _, ar_steps, _ = decode(tiny, [1, 2, 3, 4], 16, 0, logprobs=3)
    tokens, steps, engine = decode(tiny, [1, 2, 3, 4], 16, 2, margin=strict.NEAR_TIE, logprobs=3)
    want = [lp for s in ar_steps for lp in s.logprobs]
    got = [lp for s in steps for lp in s.logprobs]
    assert engine.stats.recomputed > 0 and [g.token for g in got] == [w.token for w in want] == tokens
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


@pytest.mark.parametrize("value, margin", [(False, None), (None, None), (True, strict.NEAR_TIE), (0, 0.0),
                                           (0.2, 0.2), (math.inf, math.inf)])
def test_the_option_reads_as_a_margin(value, margin):
    assert strict.check(value) == margin


@pytest.mark.parametrize("value", [-0.1, math.nan, "yes", [1]])
def test_a_bad_value_is_refused(bf16, value):
    model, tok = bf16
    # A number out of range is told about margins only (issue 31 row 6), anything else about all three forms.
    with pytest.raises(MtplxError, match="strict_greedy must be (true, false or )?a top-2 logit margin"):
        mtplx.generate(model, tok, "hi", max_tokens=2, temperature=0, strict_greedy=value)


def test_the_api_takes_the_option(bf16, greedy_ar):
    model, tok = bf16
    ar = mtplx.generate(model, tok, TEXTS[0], max_tokens=12, temperature=0, depth=0)
    got = list(mtplx.stream_generate(model, tok, TEXTS[0], max_tokens=12, temperature=0, depth=2,
                                     strict_greedy=math.inf))
    assert "".join(r.text for r in got) == ar and got[-1].stats.recomputed == got[-1].generation_tokens - 1
    batch = mtplx.batch_generate(model, tok, TEXTS[:2], max_tokens=12, temperature=0, depth=2,
                                 strict_greedy=[math.inf, False])
    assert batch[0].text == ar and batch[0].stats.recomputed > 0 and batch[1].stats.recomputed == 0
    assert batch[1].text == mtplx.generate(model, tok, TEXTS[1], max_tokens=12, temperature=0, depth=0)


# -- plumbing: server (OpenAI and Anthropic dialects), CLI run and bench ---------------------------

def test_the_server_takes_the_option_per_request_and_as_default(bf16):
    from server_helpers import running

    from mtplx.server.app import create_app

    model, tok = bf16
    want = mtplx.generate(model, tok, TEXTS[0], max_tokens=8, temperature=0, depth=0)
    for max_batch, default in ((1, False), (4, math.inf)):
        app = create_app(model, tok, served_model_names=["m"], prompt_cache_bytes=0, max_batch=max_batch,
                         strict_greedy=default)
        with running(app, model, tok) as s:
            body = {"prompt": TEXTS[0], "max_tokens": 8, "temperature": 0, "depth": 2}
            asked = s.http.post("/v1/completions", json=body | {"strict_greedy": 1e9}).json()
            assert asked["choices"][0]["text"] == want
            assert asked["mtplx"]["strict_greedy"] and asked["mtplx"]["recomputed"] > 0
            plain = s.http.post("/v1/completions", json=body | {"strict_greedy": False}).json()
            assert not plain["mtplx"]["strict_greedy"] and plain["mtplx"]["recomputed"] == 0
            server_default = s.http.post("/v1/completions", json=body).json()["mtplx"]
            assert server_default["strict_greedy"] == (default is not False)
            msg = {"model": "m", "max_tokens": 8, "temperature": 0, "depth": 2, "strict_greedy": 1e9,
                   "messages": [{"role": "user", "content": "hi"}]}
            r = s.http.post("/v1/messages", json=msg)
            assert r.status_code == 200 and r.json()["mtplx"]["recomputed"] > 0, r.text
            for bad in (-1, "yes"):
                r = s.http.post("/v1/completions", json=body | {"strict_greedy": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "strict_greedy", r.text
                r = s.http.post("/v1/messages", json=msg | {"strict_greedy": bad})
                assert r.status_code == 400 and "strict_greedy" in r.text, r.text


def test_the_cli_takes_the_option(grafted_bf16, tmp_path):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    path = str(grafted_bf16[0])
    runner = CliRunner()
    common = ["run", "-m", path, "-t", "0", "-n", "8", "--raw", "--json", "-", TEXTS[0]]
    ar = runner.invoke(cli, common + ["-d", "0"])
    strict_run = runner.invoke(cli, common + ["-d", "2", "--strict-margin", "inf"])
    assert ar.exit_code == strict_run.exit_code == 0, strict_run.output
    got, want = json.loads(strict_run.stdout), json.loads(ar.stdout)
    assert got["text"] == want["text"] and got["stats"]["recomputed"] == 7
    bad = runner.invoke(cli, common + ["--strict-margin", "-1"])
    assert bad.exit_code != 0 and "--strict-margin must be" in bad.stderr and "Traceback" not in bad.output
    assert "Strict greedy (temperature 0 only)" in runner.invoke(cli, ["serve", "--help"]).output
    hot = runner.invoke(cli, ["bench", "-m", path, "--strict-greedy"])
    assert hot.exit_code == 2 and "--temperature 0" in hot.output
    out = tmp_path / "bench.json"
    r = runner.invoke(cli, ["bench", "-m", path, "--depths", "0,2", "-t", "0", "-n", "8", "--strict-greedy",
                            "--no-reference", "--prompts", str(_prompts(tmp_path)), "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())["strict_greedy"]
    assert data["margin"] == strict.NEAR_TIE and set(data["depths"]) == {"2"}
    assert data["depths"]["2"]["same_tokens"] is True and data["depths"]["2"]["vs_plain"] > 0
    assert "strict greedy (margin 0.05)" in r.stdout


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("def f(x):\n")
    return p
