"""The engine's bookkeeping (issue 21 review findings): acceptance counts when a step is cut
inside its accepted drafts, the AR loop's head backlog with a prompt cache, and the draft
vocabulary's ids checked where they enter."""

from __future__ import annotations

import mlx.core as mx
import pytest

import mtplx
from cache_compare import compare
from mtplx.engine.sampling import SamplingParams, acceptance_arrays
from mtplx.engine.row import BACKLOG_FLUSH
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from tiny_models import tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def accept_everything(engine):
    """Every draft accepted (ratio 1): which drafts reach the output is then known exactly."""
    def arrays(p, q, drafts, rng):
        _, candidates = acceptance_arrays(p, q, drafts, rng)
        return mx.ones(drafts.shape), candidates
    engine.acceptance_arrays = arrays
    return engine


@pytest.mark.parametrize("max_tokens,accepted", [(2, [0, 0, 0]), (3, [1, 0, 0]), (4, [1, 1, 0]), (5, [1, 1, 1])])
def test_the_last_step_drafts_no_more_than_the_budget_takes(model, max_tokens, accepted):
    """Depth 3, all accepted: after the prefill's token, the budget leaves max_tokens - 1 tokens,
    and a step emits its drafts + 1: it drafts at most max_tokens - 2 (issue 31 row 20; a budget
    of 2 used to draft 3 tokens to emit none of them). Every draft made reaches the output."""
    engine = accept_everything(Engine(model, 3, GREEDY, seed=0))
    tokens = [t for s in engine.generate([3, 1, 4], max_tokens) for t in s.tokens]
    assert len(tokens) == max_tokens
    assert engine.stats.accepted == accepted and engine.stats.drafted == accepted
    assert engine.stats.generated == max_tokens


def test_an_eos_inside_the_accepted_drafts_counts_them(model):
    engine = accept_everything(Engine(model, 3, GREEDY, seed=0))
    free = [t for s in engine.generate([3, 1, 4], 5) for t in s.tokens]
    if free[2] in free[:2]:
        pytest.skip("the drafted token also comes earlier")
    engine = accept_everything(Engine(model, 3, GREEDY, seed=0))
    tokens = [t for s in engine.generate([3, 1, 4], 50, eos={free[2]}) for t in s.tokens]
    assert tokens == free[:3]  # the EOS is d2: two accepted drafts emitted
    assert engine.stats.accepted == [1, 1, 0]


def test_ar_with_a_prompt_cache_keeps_the_head_backlog_bounded(model):
    """AR with a head and a prompt cache: the head's rows go to its cache every BACKLOG_FLUSH
    positions (the backlog was concatenated whole at every token: O(n^2)); after the turn the
    caches equal an AR pass's, and an MTP turn on them answers as a cold one."""
    cache = mtplx.make_prompt_cache(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine = Engine(model, 0, GREEDY, seed=0)
    out = []
    for step in engine.generate(prompt, 40, prompt_cache=cache):
        out += step.tokens
        c = cache.cache
        assert c.backlog.shape[1] <= BACKLOG_FLUSH + 1 and c.backlog.shape[1] == len(c.backlog_tokens) + 1
    assert len(out) == 40 and cache.consistent()
    compare(model, cache.cache, cache.tokens)
    follow = prompt + out + [7, 7]
    hot = [t for s in Engine(model, 2, GREEDY, seed=0).generate(follow, 12, prompt_cache=cache) for t in s.tokens]
    cold = [t for s in Engine(model, 2, GREEDY, seed=0).generate(follow, 12) for t in s.tokens]
    assert hot == cold


@pytest.mark.parametrize("ids,needle", [
    ([1, 3, 3, 7], "sorted and unique"),
    ([7, 3, 1], "sorted and unique"),
    ([1, 2, 32], r"lie in \[0, 32\), got 32"),
    ([-1, 2], "got -1"),
    ([], "non-empty 1-D array of integers"),
    ([[1, 2]], "non-empty 1-D array of integers"),
    ([0.5, 1.5], "non-empty 1-D array of integers"),
])
def test_draft_vocabulary_ids_are_checked_where_they_enter(model, ids, needle):
    with pytest.raises(MtplxError, match=needle):
        model.set_draft_vocab(mx.array(ids))
    assert model.draft_vocab is None
    model.set_draft_vocab(mx.array([1, 3, 7]))
    assert model.draft_vocab.ids.tolist() == [1, 3, 7]
    model.set_draft_vocab(None)
