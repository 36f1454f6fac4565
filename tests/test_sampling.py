"""Exactness (a): the sampling math on synthetic p and q.

Analytically, the speculative rule outputs token x with probability
    q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * r(x),   r = norm(max(0, p - q)),
which equals p(x). We check that identity for filtered p (top-k/top-p), q with zeros and
p == q, then check the implementation by sampling: 40,000 draws per case, chi-square
goodness of fit to p at level 1e-3. Each draw is one one-draft verify through
acceptance_arrays and decide (speculative_verdict is exactly these two, and the batch decoder
calls them); the draws' device halves are computed as one stack of 40,000 independent rows
and decide runs once per draw on the host, so a case costs a second, not one MLX evaluation
per draw. With 40,000 draws over <= 12 categories the test has
power > 0.99 against any law at total-variation distance >= 0.02 from p (effect size
w >= 0.04, noncentrality 64); the biased variant below (residual drawn from p instead of
norm(max(0, p - q))) is far beyond that and must be rejected.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from mtplx.engine.sampling import (Rng, SamplingParams, Verdict, acceptance_arrays, decide, filtered_probs, residual,
                                   sample, speculative_verdict)

N = 40_000
ALPHA = 1e-3


def _gof_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Chi-square goodness of fit of counts to p (over p's support)."""
    p = p.astype(np.float64)
    support = p > 0
    expected = counts[support].sum() * p[support] / p[support].sum()
    return stats.chisquare(counts[support], expected).pvalue


def _law_of_rule(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    accept = np.minimum(p, q)
    r = np.maximum(p - q, 0)
    r = r / r.sum() if r.sum() > 0 else p
    return accept + (1 - accept.sum()) * r


def _cases():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=12) * 2
    p_filtered = np.array(filtered_probs(mx.array(logits)[None], SamplingParams(temperature=0.7, top_k=6, top_p=0.9)))[0]
    q_dense = rng.dirichlet(np.ones(12))
    q_zeros = rng.dirichlet(np.ones(12)) * (rng.random(12) > 0.4)
    q_zeros /= q_zeros.sum()
    p_dense = rng.dirichlet(np.ones(12) * 0.5)
    return {
        "filtered p, dense q": (p_filtered, q_dense),
        "dense p, q with zeros": (p_dense, q_zeros),
        "p == q": (p_dense, p_dense.copy()),
        "disjoint supports": (np.r_[0.5, 0.5, np.zeros(10)], np.r_[0, 0, 0.25, 0.25, 0.5, np.zeros(7)]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_rule_law_equals_p_analytically(name):
    p, q = _cases()[name]
    np.testing.assert_allclose(_law_of_rule(p, q), p, atol=1e-6)


def test_filtered_probs_order_and_mass():
    logits = mx.array([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    p = np.array(filtered_probs(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.9)))[0]
    # top-k keeps 4; among their renormalized probs the smallest prefix reaching 0.9 is 3 tokens.
    k4 = np.exp([4.0, 3.0, 2.0, 1.0]) / np.exp([4.0, 3.0, 2.0, 1.0]).sum()
    assert np.cumsum(k4)[1] < 0.9 <= np.cumsum(k4)[2]
    expected = np.r_[k4[:3] / k4[:3].sum(), 0, 0, 0]
    np.testing.assert_allclose(p, expected, rtol=1e-5)
    greedy = np.array(filtered_probs(logits, SamplingParams(temperature=0)))[0]
    np.testing.assert_array_equal(greedy, [1, 0, 0, 0, 0, 0])
    min_p = np.array(filtered_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)))[0]
    assert (min_p > 0).sum() == 2


def test_inverse_cdf_sampling_law():
    p = np.array([0.1, 0.0, 0.6, 0.3], dtype=np.float32)
    rng = Rng(3)
    draws = np.array(sample(mx.broadcast_to(mx.array(p), (N, 4)), rng.sampling(N)))
    counts = np.bincount(draws, minlength=4)
    assert counts[1] == 0, "a zero-probability token was sampled"
    assert _gof_pvalue(counts, p) > ALPHA


def _empirical_law(p, q, seed: int, biased: bool = False) -> np.ndarray:
    """N one-draft verifies of the rule, each with its own draft (drawn from q) and uniforms.

    The device side is one acceptance_arrays call over the N verifies stacked as N draft rows
    (p against q: each row its own ratio and its own residual draw, computed row by row) and
    one bonus row, plus one more bonus draw from p per verify (``sample``, as acceptance_arrays
    draws its bonus). decide, the host side, then runs once per verify on that verify's ratio
    and its two candidates. ``biased``: the classic bug, on a rejection the next token is drawn
    from p instead of the residual (a fresh uniform per verify)."""
    rng = Rng(seed)
    gen = np.random.default_rng(seed + 1)
    drafts = gen.choice(len(q), size=N, p=q / q.sum())
    pm = mx.array(np.tile(p.astype(np.float32), (N + 1, 1)))
    qm = mx.array(np.tile(q.astype(np.float32), (N, 1)))
    ratio, candidates = acceptance_arrays(pm, qm, mx.array(drafts.astype(np.int32)), rng)
    bonus = sample(pm[:N], rng.sampling(N))
    from_p = sample(pm[:N], rng.sampling(N))
    mx.eval(ratio, candidates, bonus, from_p)
    ratio, candidates, bonus, from_p = (np.array(a) for a in (ratio, candidates, bonus, from_p))
    counts = np.zeros(len(p), dtype=np.int64)
    for i, d in enumerate(drafts):
        v: Verdict = decide(ratio[i : i + 1], np.array([candidates[i], bonus[i]]), rng)
        counts[int(d) if v.accepted == 1 else (int(from_p[i]) if biased else v.next_token)] += 1
    return counts


def test_one_verify_is_acceptance_arrays_then_decide():
    """speculative_verdict, which the draws above take apart, is acceptance_arrays then decide,
    draw for draw."""
    p, q = _cases()["filtered p, dense q"]
    pm, qm = mx.array(np.stack([p, p]).astype(np.float32)), mx.array(q[None].astype(np.float32))
    outcomes = set()
    for seed in range(30):
        for d in range(len(q)):
            rng = Rng(seed)
            ratio, candidates = acceptance_arrays(pm, qm, mx.array([d]), rng)
            want = decide(np.array(ratio), np.array(candidates), rng)
            assert speculative_verdict(pm, qm, mx.array([d]), Rng(seed)) == want
            outcomes.add(want.accepted)
    assert outcomes == {0, 1}


@pytest.mark.parametrize("name", ["filtered p, dense q", "dense p, q with zeros"])
def test_rule_law_by_sampling(name):
    p, q = _cases()[name]
    counts = _empirical_law(p, q, seed=11)
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside p's support came out"
    assert _gof_pvalue(counts, p) > ALPHA


def test_biased_rule_is_detected():
    p, q = _cases()["filtered p, dense q"]
    counts = _empirical_law(p, q, seed=11, biased=True)
    # Its law is min(p, q) + (1 - sum min(p, q)) p: too little mass where p > q.
    biased_law = np.minimum(p, q) + (1 - np.minimum(p, q).sum()) * p
    assert 0.5 * np.abs(biased_law - p).sum() > 0.05
    assert _gof_pvalue(counts, p) < ALPHA


def test_residual_with_no_mass_falls_back_to_p():
    p = mx.array([[0.2, 0.8]])
    np.testing.assert_allclose(np.array(residual(p, p)), [[0.2, 0.8]])


def test_greedy_verdict_accepts_argmax_only():
    p = mx.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    q = mx.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    v = speculative_verdict(p, q, mx.array([1, 2]), Rng(0))
    assert (v.accepted, v.next_token) == (1, 0)
    v = speculative_verdict(p, mx.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), mx.array([1, 0]), Rng(0))
    assert (v.accepted, v.next_token) == (2, 2), "all accepted: the bonus comes from the last row"
