"""Exactness under a grammar: the law of constrained MTP output equals the constrained AR law.

Model: a random Qwen3.5 (tests/tiny_models.py) with an 8-token vocabulary, float32, and the
tiny tokenizer and grammar of tests/tiny_grammar.py ("no b before the first c": 3 of 7 pieces
allowed until a c, all 7 after). The exact constrained AR law of the first three generated
tokens is computed by enumeration, masking with the grammar written in plain Python (not
llguidance), then filtering (temperature, top-k, top-p) as the engine does. MTP at depth 1
and 2, sampled N times at fixed seeds with a draft law unlike p, is compared with it by a
chi-square goodness-of-fit test (cells with an expected count under 5 pooled). Three tokens
cover one whole depth-1 step (draft and bonus) and both drafts of a depth-2 step.

Power: the law has 45 sequences, 27 of them with an expected count of 5 or more at N = 600
(28 cells after pooling, df = 27). At level 1e-3 the test detects a law at effect size
w = 0.28 with probability 0.9 (noncentral chi-square, lambda = N w^2 = 48:
scipy.stats.ncx2.sf(chi2.isf(1e-3, 27), 27, 48) = 0.9). A sample outside the constrained
support (probability 0 under the exact law) fails the test outright. The biased engine below
(the matcher not rolled back after a rejection, so a rejected c relaxes the grammar for the
tokens that follow) does that in about 5% of depth-1 samples at these settings (10 of 200
with other seeds), so 200 samples miss it with probability about 0.95^200 < 1e-4.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.constraints import Constraint
from mtplx.engine.sampling import SamplingParams, filtered_probs
from mtplx.engine.speculative import Engine
from tiny_grammar import PIECES, grammar, grammar_tokenizer, reference_allowed, text
from test_engine_law import ALPHA, DRAFT, PARAMS  # the same sampler settings and level as the unconstrained law
from tiny_models import tiny_model

PROMPT = [1, 2, 1]
LENGTH = 3
N = 600
BATCH = 50


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=len(PIECES), seed=0, embed_scale=0.1)


@pytest.fixture(scope="module")
def law(model):
    """P(first LENGTH constrained tokens) under AR, by enumeration with the reference mask."""
    law = {(): 1.0}
    for _ in range(LENGTH):
        grown = {}
        for seq, prob in law.items():
            logits, _ = model.trunk_forward(mx.array([PROMPT + list(seq)]), model.make_cache())
            masked = mx.where(mx.array(reference_allowed(seq)), logits[0, -1:], -mx.inf)
            p = np.array(filtered_probs(masked, PARAMS))[0].astype(np.float64)
            for t in np.nonzero(p)[0]:
                grown[seq + (int(t),)] = prob * p[t]
        law = grown
    assert abs(sum(law.values()) - 1) < 1e-6
    return law


class NoRollback(Constraint):
    """The bug the test must catch: the matcher keeps the rejected drafts."""

    def commit(self, accepted: int, next_token: int) -> None:
        super().commit(len(self._step_moves), next_token)


def sample(model, depth: int, make_constraint: Callable[[], Constraint], seed0: int, n: int = N,
           steps: list[int] | None = None, lookup: int = 0, copies: list[int] | None = None) -> list[tuple[int, ...]]:
    """n constrained generations, each a row with its own seed and matcher, decoded BATCH at a
    time (a row's tokens do not depend on the rows beside it: tests/test_batch_law.py);
    ``steps`` collects each speculative step's accepted count, ``copies`` each generation's
    copied-draft steps (``lookup``: drafts copied from the context)."""
    out = []
    for start in range(0, n, BATCH):
        decoder = BatchDecoder(model, max_batch=BATCH)
        # One token past the law's LENGTH: a step drafts at most the budget's tokens but one, so
        # depth 2 needs 3 tokens left after the first; the law is read on the first LENGTH.
        rows = [decoder.add(RowRequest(PROMPT, LENGTH + 1, PARAMS, depth=depth, draft_params=DRAFT, seed=seed0 + i,
                                       constraint=make_constraint(), lookup=lookup))
                for i in range(start, min(start + BATCH, n))]
        while len(decoder):
            for _, emitted in decoder.step():
                if steps is not None and emitted.drafted:
                    steps.append(emitted.accepted)
        out += [tuple(row.emitted[:LENGTH]) for row in rows]
        if copies is not None:
            copies += [row.stats.lookup_steps for row in rows]
    return out


def pvalue(samples, law) -> float:
    """Chi-square goodness of fit; 0 if a sample lies outside the law's support (probability 0)."""
    if any(s not in law for s in samples):
        return 0.0
    cells = sorted(law, key=law.get, reverse=True)
    observed = np.array([sum(1 for s in samples if s == c) for c in cells], dtype=float)
    expected = np.array([law[c] * len(samples) for c in cells])
    big = expected >= 5
    obs = np.r_[observed[big], observed[~big].sum()]
    exp = np.r_[expected[big], expected[~big].sum()]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_law_is_constrained_and_varied(law):
    """The grammar binds (b is forbidden before a c) and the law spreads over both states."""
    assert all("b" not in text(s).split("c", 1)[0] for s in law)
    with_c = sum(p for s, p in law.items() if "c" in text(s))
    assert 0.3 < with_c < 0.7 and len(law) > 30


@pytest.mark.parametrize("depth", [1, 2])
def test_constrained_mtp_law_equals_constrained_ar_law(model, law, depth):
    accepted = []
    samples = sample(model, depth, lambda: Constraint(grammar_tokenizer(), grammar()), seed0=1000 * depth,
                     steps=accepted)
    # Every outcome of a step occurs: rejection at each draft position (residual) and full
    # acceptance (bonus), so the rollback and every mask position are exercised.
    assert set(range(depth + 1)) <= set(accepted), sorted(set(accepted))
    assert pvalue(samples, law) > ALPHA


def test_copied_drafts_under_a_grammar_keep_the_constrained_law(model, law, monkeypatch):
    """Drafts copied from the context (lookup, forced to 2) mixed with the head's, under the
    grammar: each copy is masked and walked like a head draft, cut before a forbidden token.
    Same power as above (N = 600, level 1e-3)."""
    from mtplx.engine import lookup

    monkeypatch.setattr(lookup, "NGRAMS", (2, 1))  # a 3-token prompt has matches from the start
    copies: list[int] = []
    samples = sample(model, 2, lambda: Constraint(grammar_tokenizer(), grammar()), seed0=7000, lookup=2,
                     copies=copies)
    assert sum(1 for c in copies if c) > N // 2, "copies were too rare to test"
    assert pvalue(samples, law) > ALPHA


@pytest.mark.parametrize("prompt", [[1, 2, 1], [2, 4]])
def test_greedy_ar_and_mtp_follow_the_reference_grammar(model, prompt):
    """Greedy = argmax over the allowed tokens, on the AR path and at depth 1 and 2. On these
    prompts the unconstrained argmax is forbidden at several positions (5 of 8 on the first),
    and the second passes through a c into the relaxed state."""
    expected = []
    for _ in range(8):
        logits, _ = model.trunk_forward(mx.array([prompt + expected]), model.make_cache())
        expected.append(int(np.argmax(np.where(reference_allowed(expected), np.array(logits[0, -1]), -np.inf))))
    greedy = SamplingParams(temperature=0.0)
    constraint = Constraint(grammar_tokenizer(), grammar())
    for depth, lookup in ((0, 0), (1, 0), (2, 0), (2, 3)):
        engine = Engine(model, depth, greedy, seed=0, constraint=constraint, lookup=lookup)
        assert [t for step in engine.generate(prompt, 8) for t in step.tokens] == expected, (depth, lookup)


def test_matcher_without_rollback_is_detected(model, law):
    samples = sample(model, 1, lambda: NoRollback(grammar_tokenizer(), grammar()), seed0=5000, n=200)
    assert pvalue(samples, law) < ALPHA
