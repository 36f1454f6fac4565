"""Drafts copied from the context (issue 30, mtplx/engine/lookup.py): exact at any temperature.

A copied token x is a draft with a one-hot q: accepted with probability p(x), and a rejection
draws from p without x, renormalised. The law tests below follow tests/test_engine_law.py and
tests/test_batch_law.py: the exact AR law of the first three generated tokens of the random
6-token model, by enumeration, against N generations (chi-square at level 1e-3, cells with an
expected count under 5 pooled). Rows decode together in batches (COPIES rows per batch, own
seeds), which is also each row keeping its own index.

Power: N = 600 and under 50 pooled cells detect an effect size w = 0.35 with probability above
0.9 (test_batch_law.test_stated_power; checked again here for these laws). A biased acceptance
(a copied token kept with probability min(1, 2p)) must be rejected at the same N.

The generations run 6 tokens (so a copy of K = 4 is never cut by the budget) and the first
three are tested: the marginal law of a prefix is AR's as well. Matching uses 1- and 2-grams
here (lookup.NGRAMS is read when a row is made), so copies happen on a 6-token vocabulary.
"""

from __future__ import annotations

import time

import mlx.core as mx
import pytest
from scipy import stats

from cache_compare import compare
from mtplx.core.knobs import KnobError
from mtplx.engine import lookup
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.lookup import ContextIndex, Lookup
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams, acceptance_arrays
from mtplx.engine.speculative import Engine
from test_engine_law import ALPHA, DRAFT, LAYERS, VOCAB, exact_ar_law, gof_pvalue
from tiny_models import tiny_model

PROMPT = [1, 4, 2, 1, 4, 5, 3, 0, 2]  # every token occurs, most with a successor: copies always find a match
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, top_k=5)
N = 600
W = 0.35
COPIES = 100
LENGTH = 3
GEN = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, embed_scale=0.12, layers=LAYERS)


@pytest.fixture(scope="module")
def law3(model):
    law = exact_ar_law(model, PROMPT, LENGTH, PARAMS)
    assert abs(sum(law.values()) - 1) < 1e-6
    return law


@pytest.fixture
def small_ngrams(monkeypatch):
    monkeypatch.setattr(lookup, "NGRAMS", (2, 1))


# -- the index ---------------------------------------------------------------------------------

def test_index_proposes_what_followed_the_longest_latest_match():
    idx = ContextIndex([5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7], ngrams=(3, 2))
    # 3-gram [5 6 7] occurred at 0 (followed by 8 9 1): the longer match wins over [6 7] -> 2 3.
    assert idx.propose(3) == [8, 9, 1]
    idx.extend([4])
    assert idx.propose(4) == []  # [6 7 4], [7 4]: never seen
    idx.extend([6, 7])
    assert idx.propose(2) == [4, 6]  # [4 6 7] unseen; [6 7]'s latest occurrence was followed by 4
    assert idx.propose(0) == []


def test_index_built_incrementally_equals_built_at_once():
    import random

    rnd = random.Random(0)
    tokens = [rnd.randrange(5) for _ in range(400)]
    whole, grown = ContextIndex(tokens), ContextIndex(tokens[:7])
    for i in range(7, len(tokens), 13):
        grown.extend(tokens[i : i + 13])
    assert grown.tokens == whole.tokens and grown._tables == whole._tables
    assert grown.propose(8) == whole.propose(8)


def test_index_cost_is_flat_in_the_context():
    """O(1) per token: appending and proposing at a 32K-token context costs about what it costs
    at 1K (no rescan). Loose bound: timing on a shared machine."""
    import random

    rnd = random.Random(1)

    def per_token(n):
        idx = ContextIndex([rnd.randrange(1000) for _ in range(n)])
        t0 = time.perf_counter()
        for _ in range(2000):
            idx.propose(16)
            idx.extend([rnd.randrange(1000)])
        return (time.perf_counter() - t0) / 2000

    assert per_token(32768) < 4 * per_token(1024) + 20e-6


def test_lookup_knob_is_checked(model):
    with pytest.raises(KnobError, match="lookup must be"):
        BatchDecoder(model).add(RowRequest(PROMPT, 4, PARAMS, depth=0, lookup=33))
    with pytest.raises(KnobError, match="lookup"):
        Engine(model, 0, PARAMS, lookup="often")


# -- the law -----------------------------------------------------------------------------------

def sample_rows(model, seed0, k, depth, acceptance=None, n=N):
    """n generations' first LENGTH tokens; also the pooled stats of the rows."""
    out, totals = [], {"copy": 0, "head": 0}
    for b in range(n // COPIES):
        decoder = BatchDecoder(model, max_batch=COPIES)
        rows = []
        for c in range(COPIES):
            row = decoder.add(RowRequest(PROMPT, GEN, PARAMS, depth=depth, draft_params=DRAFT,
                                         seed=seed0 + b * COPIES + c, lookup=k))
            if acceptance is not None:
                row.acceptance_arrays = acceptance
            rows.append(row)
        while len(decoder):
            decoder.step()
        for row in rows:
            out.append(tuple(row.emitted[:LENGTH]))
            totals["copy"] += row.stats.lookup_steps
            totals["head"] += sum(row.stats.depth_steps[1:])
    return out, totals


def test_stated_power(law3):
    cells = sum(1 for p in law3.values() if p * N >= 5) + 1
    power = stats.ncx2.sf(stats.chi2.isf(ALPHA, cells - 1), cells - 1, N * W**2)
    assert cells <= 50 and power > 0.9, (cells, power)


@pytest.mark.parametrize("k,depth,ngrams", [(1, 0, (2, 1)), (2, 0, (2, 1)), (3, 0, (2, 1)), (4, 0, (2, 1)),
                                            (2, 2, (2,)), (4, 3, (2,)), ("auto", 2, (2,))])
def test_copied_drafts_keep_the_ar_law(model, law3, monkeypatch, k, depth, ngrams):
    """Forced K = 1..4 alone, then mixed with MTP drafts (2-gram misses let the head draft;
    auto chooses between the sources)."""
    monkeypatch.setattr(lookup, "NGRAMS", ngrams)
    samples, totals = sample_rows(model, 10_000 * (depth + 1) + 100 * (k if k != "auto" else 9), k, depth)
    assert totals["copy"] > N // 2, totals  # copies were verified (in most rows)
    if depth:
        assert totals["head"] > N // 10, totals
    assert gof_pvalue(samples, law3) > ALPHA


def test_mixed_steps_draft_from_both_sources(model, monkeypatch):
    """With only 2-gram matches some steps miss and the head drafts: both sources in one row."""
    monkeypatch.setattr(lookup, "NGRAMS", (2,))
    engine = Engine(model, 2, PARAMS, DRAFT, seed=4, lookup=3)
    for _ in engine.generate(PROMPT, 120):
        pass
    s = engine.stats
    assert s.lookup_steps > 5 and sum(s.depth_steps[1:]) > 5, s.as_dict()
    assert s.from_lookup + s.from_mtp + s.from_sampled == s.generated


def biased_copy_acceptance(p, q, drafts, rng):
    """Keeps a copied token with probability min(1, 2 p(x)): the bug a lenient copier makes."""
    ratio, candidates = acceptance_arrays(p, q, drafts, rng)
    return mx.minimum(2 * ratio, 1.0), candidates


def test_biased_copy_acceptance_is_detected(model, law3, small_ngrams):
    samples, totals = sample_rows(model, 555_000, 2, 0, acceptance=biased_copy_acceptance, n=300)
    assert totals["copy"] > N
    assert gof_pvalue(samples, law3) < ALPHA


def test_copies_are_accepted_and_rejected(model, small_ngrams):
    """Both outcomes occur, so the law tests cover the ratio p(x) and the residual p without x."""
    engine = Engine(model, 0, PARAMS, seed=3, lookup=2)
    for _ in engine.generate(PROMPT, 200):
        pass
    s = engine.stats
    assert 0.05 < s.lookup_acceptance < 0.95, s.as_dict()


# -- greedy, caches, batches --------------------------------------------------------------------

def ar_tokens(model, prompt, n, params, seed=None):
    return [t for e in ar_generate(model, prompt, n, params, seed=seed) for t in e.tokens]


@pytest.mark.parametrize("k,depth", [(1, 0), (4, 0), (8, 2), ("auto", 3)])
def test_greedy_equals_ar(k, depth):
    m = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]
    greedy = SamplingParams(temperature=0.0)
    engine = Engine(m, depth, greedy, lookup=k)
    got = [t for e in engine.generate(prompt, 80) for t in e.tokens]
    assert got == ar_tokens(m, prompt, 80, greedy)
    assert engine.stats.lookup_accepted > 0, engine.stats.as_dict()


def head_complete(cache):
    """The head's rows plus its backlog, flushed into a fork: every committed position's row."""
    return cache.head[0].offset + cache.backlog.shape[1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_caches_equal_ar_after_every_step(small_ngrams, temperature):
    """Trunk KV, Gated-DeltaNet states and the head's rows, after copy steps, head steps and
    steps that reject a copy; the head's backlog, flushed, holds exactly the committed positions'
    rows, so the next draft leaves the head as a head-drafted history would."""
    m = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    engine = Engine(m, 2, SamplingParams(temperature=temperature, top_k=8, top_p=0.95), seed=7, lookup=3)
    emitted: list[int] = []
    copy_rejected = 0
    for i, step in enumerate(engine.generate(prompt, 40)):
        emitted += step.tokens
        if i == 0:
            continue
        cache = engine.cache
        assert cache.offset == len(prompt) + len(emitted) - 1
        assert head_complete(cache) == cache.offset
        fork = cache.fork()
        if fork.backlog.shape[1] > 1:  # the backlog's rows, as the next draft feeds them
            m.fill_head(fork.backlog[:, :-1], mx.array([fork.backlog_tokens]), fork)
        assert fork.head[0].offset == cache.offset - 1
        compare(m, fork, prompt + emitted[:-1])
        copy_rejected += step.drafted > step.accepted
    assert engine.stats.lookup_steps > 3 and copy_rejected > 0, engine.stats.as_dict()
    if temperature == 0.0:
        assert emitted == ar_tokens(m, prompt, 40, SamplingParams(temperature=0.0))


def test_each_row_keeps_its_own_index_in_a_batch(small_ngrams):
    """Rows of different prompts, seeds and lookup settings decode together; each row's tokens
    equal its solo run's, token for token."""
    m = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    requests = [
        ([3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(temperature=0.0), 2, 4, None),
        ([7, 7, 8, 7, 7, 8, 7], SamplingParams(temperature=0.9, top_k=8), 0, 3, 11),
        ([2, 7, 1, 8, 2, 8, 1, 8, 2, 8], SamplingParams(temperature=0.7), 3, "auto", 12),
        ([5, 4, 3], SamplingParams(temperature=0.8), 2, 0, 13),
    ]
    decoder = BatchDecoder(m, max_batch=4)
    rows = [decoder.add(RowRequest(p, 40, s, depth=d, lookup=k, seed=seed)) for p, s, d, k, seed in requests]
    while len(decoder):
        decoder.step()
    for row, (p, s, d, k, seed) in zip(rows, requests):
        solo = BatchDecoder(m, max_batch=1)
        alone = solo.add(RowRequest(p, 40, s, depth=d, lookup=k, seed=seed))
        while len(solo):
            solo.step()
        assert row.emitted == alone.emitted
    assert sum(r.stats.lookup_steps for r in rows) > 5


def test_lookup_auto_leaves_a_plain_row_plain(model):
    """'auto' copies only where the row speculates anyway: a depth-0 row stays on the plain lane."""
    decoder = BatchDecoder(model, max_batch=1)
    assert decoder.add(RowRequest(PROMPT, 4, PARAMS, depth=0, lookup="auto")).plain
    assert not decoder.add(RowRequest(PROMPT, 4, PARAMS, depth=0, lookup=2)).plain


def test_lookup_choice_follows_the_running_acceptance():
    """Auto without step costs stops copying once copies keep failing, and probes again."""
    class Pinned:
        max_depth = 2

    lk = Lookup("auto", ngrams=(1,))
    lk.start([1, 2, 1])
    assert lk.choose(5, Pinned(), 2) == [2, 1]
    for _ in range(20):
        lk.observe(2, 0)
    picks = [lk.choose(5, Pinned(), 2) for _ in range(lookup.Lookup.PROBE)]
    assert picks[:-1] == [[]] * (lookup.Lookup.PROBE - 1) and picks[-1] == [2]


def test_auto_prices_a_position_not_reached_yet_as_the_deepest_reached():
    """A copy that ran true for its first tokens is priced to run on: a new position starts at
    the deepest reached one's acceptance, not at the flat prior."""
    lk = Lookup("auto")
    assert lk.estimates() == [Lookup.PRIOR] * lk.max_copy
    for _ in range(6):
        lk.observe(3, 3)  # three copied, three kept
    deepest = lk.acceptance[2]
    assert lk.reached == 3 and deepest > 0.8
    assert lk.estimates()[3:] == [deepest] * (lk.max_copy - 3)
    lk.observe(5, 5)  # positions 3 and 4 reached: they start from that estimate, then move
    assert lk.reached == 5 and lk.acceptance[4] == pytest.approx(lk.acceptance[3] + Lookup.ALPHA * (1 - lk.acceptance[3]))
    lk.observe(5, 0)  # a miss at the first position is the only one observed
    assert lk.acceptance[0] < deepest and lk.acceptance[1:5] == lk.estimates()[1:5]


# -- surfaces ----------------------------------------------------------------------------------

LOOP = [{"role": "user", "content": "Repeat: the quick brown fox jumps over the lazy dog. the quick brown fox."}]


def test_api_lookup_keeps_greedy_text_and_counts_copies(demo_bf16):
    """On the demo's bf16 trunk (a quarter of the 4-bit demo's time on MLX's CPU backend)."""
    import mtplx

    model, tok = demo_bf16
    outs = {}
    for k in (0, 4):
        last, text = None, []
        for r in mtplx.stream_generate(model, tok, LOOP, max_tokens=40, temperature=0, depth=2, lookup=k):
            text.append(r.text)
            last = r
        outs[k] = ("".join(text), last.stats)
    assert outs[4][0] == outs[0][0]
    assert outs[0][1].from_lookup == 0 and outs[4][1].from_lookup > 0
    s = outs[4][1]
    assert s.from_lookup + s.from_mtp + s.from_sampled == s.generated
    both = mtplx.batch_generate(model, tok, [LOOP, LOOP], max_tokens=40, temperature=0, depth=2, lookup=[0, 4])
    assert [b.text for b in both] == [outs[0][0]] * 2 and both[1].stats.from_lookup > 0
    with pytest.raises(KnobError, match="lookup"):
        mtplx.generate(model, tok, LOOP, max_tokens=4, lookup=-1)


def test_run_refuses_a_bad_lookup_before_loading():
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    r = CliRunner().invoke(cli, ["run", "hi", "--model", "demo", "--lookup", "40"])
    assert r.exit_code != 0 and "--lookup must be" in r.output, r.output
