"""Depth auto moves a row between the plain lane (the pipelined AR loop) and drafted steps,
at every step (batch.py ``_plan``, policy.py). Each move must leave the row exactly where AR
would be: every cache equal to an AR pass over the tokens the trunk consumed, greedy text equal
to AR's, and a row's text in a batch equal to its text alone. The output law under such moves
is test_auto_depth.py's enumerated law test (its Jumpy policy switches lanes within a sequence).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from cache_compare import compare
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.policy import AutoDepth, StepCosts
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from test_auto_depth import jumpy
from tiny_models import tiny_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


@pytest.fixture(scope="module")
def m():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


class Recording(AutoDepth):
    """Jumpy's hair trigger, remembering every choice."""

    ALPHA = 0.5
    PROBE_MIN = PROBE_MAX = PLAIN_PROBE_SPAN = 1

    def __init__(self):
        super().__init__(StepCosts((10.0, 12.0, 14.0, 16.0), 1.0), 0.5, 3)
        self.chosen: list[int] = []

    def choose(self, context: int = 0) -> int:
        self.chosen.append(super().choose(context))
        return self.chosen[-1]


def ar_tokens(model, prompt, n):
    return [t for e in ar_generate(model, prompt, n, SamplingParams(temperature=0.0)) for t in e.tokens]


def switches(chosen: list[int]) -> int:
    return sum((a > 0) != (b > 0) for a, b in zip(chosen, chosen[1:]))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_caches_equal_ar_after_every_step_across_lane_changes(m, temperature):
    policy = Recording()
    decoder = BatchDecoder(m, max_batch=1)
    row = decoder.add(RowRequest(PROMPT, 40, SamplingParams(temperature=temperature, top_k=8, top_p=0.95),
                                 depth=policy, seed=7))
    checked = 0
    while not row.done:
        decoder.step()
        if row.done or row.prefilling:
            continue
        cache = row.cache
        assert cache.offset == len(row.consumed)
        # the head's rows and its backlog cover every consumed position (the plain lane keeps
        # the head in step, so a drafted step may follow at once)
        assert cache.head[0].offset + cache.backlog.shape[1] == cache.offset
        fork = cache.fork()
        if fork.backlog.shape[1] > 1:
            m.fill_head(fork.backlog[:, :-1], mx.array([fork.backlog_tokens]), fork)
        compare(m, fork, row.consumed)
        checked += 1
    assert checked > 10 and switches(policy.chosen) >= 4, policy.chosen
    if temperature == 0.0:
        assert row.emitted == ar_tokens(m, PROMPT, 40)


def test_a_switching_row_in_a_batch_equals_itself_alone(m):
    requests = [(PROMPT, 0.8, 11), ([7, 7, 8, 7, 7, 8, 7], 0.9, 12), ([2, 7, 1, 8, 2, 8], 0.0, 13)]
    decoder = BatchDecoder(m, max_batch=3)
    rows = [decoder.add(RowRequest(p, 30, SamplingParams(temperature=t, top_k=8), depth=jumpy(), seed=s))
            for p, t, s in requests]
    while len(decoder):
        decoder.step()
    for row, (p, t, s) in zip(rows, requests):
        solo = BatchDecoder(m, max_batch=1)
        alone = solo.add(RowRequest(p, 30, SamplingParams(temperature=t, top_k=8), depth=jumpy(), seed=s))
        while len(solo):
            solo.step()
        assert row.emitted == alone.emitted and len(row.emitted) == 30


def test_auto_that_starts_plain_drafts_once_the_text_pays(m):
    """The prior says no depth pays; the random model's drafts are accepted now and then:
    the row starts in the plain lane (no drafts at first) and still probes."""
    policy = Recording()
    policy.acceptance = [0.0] * 3  # as a low prior would leave it
    decoder = BatchDecoder(m, max_batch=1)
    row = decoder.add(RowRequest(PROMPT, 30, SamplingParams(temperature=0.0), depth=policy, seed=1))
    assert not row.plain and row.switches
    while not row.done:
        decoder.step()
    assert policy.chosen[0] == 0 and any(policy.chosen), policy.chosen
    assert row.emitted == ar_tokens(m, PROMPT, 30)
