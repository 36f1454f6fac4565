"""Exactness (b): the law of MTP output equals the law of AR output.

Model: a random Qwen3.5 (2 layers: one Gated-DeltaNet, one attention) with its MTP head and a
6-token vocabulary, float32 (2 layers rather than the caches tests' 4: the law does not depend on
the depth of the trunk, and a sampled row costs about half). The exact AR law of the first three generated tokens is
computed by enumeration (43 trunk passes); MTP at depth 1, 2, 3 is sampled N times with
independent seeds and compared with it by a chi-square goodness-of-fit test (cells with an
expected count under 5 pooled). Depth 3 is also checked on the 4th token's marginal, which
is where its third draft and its bonus token land. Depth 2 is also checked with the attention
KV stored 8-bit (kv_bits=8, on the same kind of model with a head size its groups divide):
the law must then equal AR's law with the same quantized KV.

Power: with N = 1500 and the 38 cells left after pooling (df = 37), a chi-square test at level
1e-3 detects a law at effect size w = 0.19 with probability 0.9 (noncentral chi-square,
lambda = N w^2 = 54: scipy.stats.ncx2.sf(chi2.isf(1e-3, 37), 37, 54) = 0.9). (The 4-layer model
this file used before pooled to 56 cells, where the same power needs w = 0.20.) The biased engine below (residual drawn from p
instead of norm(max(0, p - q))) sits well beyond that and must be rejected, which shows the
test has the power it claims.
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from mtplx.engine.sampling import SamplingParams, acceptance_arrays, filtered_probs, sample
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.speculative import Engine
from tiny_models import tiny_model

VOCAB = 6
PROMPT = [1, 4, 2]
N = 1500
LAYERS = 2  # one Gated-DeltaNet layer, one attention layer
BATCH = 50
ALPHA = 1e-3
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, top_k=5)
DRAFT = SamplingParams(temperature=1.2, top_p=1.0, top_k=0)  # q deliberately unlike p


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, embed_scale=0.12, layers=LAYERS)


def exact_ar_law(model, prefix: list[int], length: int, params: SamplingParams = PARAMS,
                 kv_bits: int | None = None) -> dict[tuple[int, ...], float]:
    """P(first ``length`` generated tokens) under AR, by enumeration (with ``kv_bits``: AR with
    the attention KV quantized, groups of 32)."""
    def next_probs(tokens):
        cache = model.make_cache(kv_bits, 32)
        logits, _ = model.trunk_forward(mx.array([tokens]), cache)
        return np.array(filtered_probs(logits[0, -1:], params))[0].astype(np.float64)

    law = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, prob in law.items():
            p = next_probs(prefix + list(seq))
            for t in np.nonzero(p)[0]:
                grown[seq + (int(t),)] = prob * p[t]
        law = grown
    return law


def sample_engine(model, depth, length: int, acceptance=None, seed0: int = 0,
                  kv_bits: int | None = None) -> list[tuple[int, ...]]:
    """N samples of the first ``length`` tokens, each a row with its own seed; ``depth`` is an
    integer or a callable that makes a fresh depth policy for each sample. The rows are decoded
    BATCH at a time (half the time of one by one): a row's tokens do not depend on the rows
    beside it (tests/test_batch_law.py, and every batch-equals-alone test), so each is a sample
    of the one-row law."""
    out = []
    for start in range(0, N, BATCH):
        decoder = BatchDecoder(model, max_batch=BATCH)
        rows = []
        for i in range(start, min(start + BATCH, N)):
            row = decoder.add(RowRequest(PROMPT, length, PARAMS, depth=depth() if callable(depth) else depth,
                                         draft_params=DRAFT, seed=seed0 + i, kv_bits=kv_bits, kv_group_size=32))
            if acceptance is not None:
                row.acceptance_arrays = acceptance
            rows.append(row)
        while len(decoder):
            decoder.step()
        out += [tuple(row.emitted[:length]) for row in rows]
    return out


def gof_pvalue(samples, law) -> float:
    cells = sorted(law, key=law.get, reverse=True)
    observed = np.array([sum(1 for s in samples if s == c) for c in cells], dtype=float)
    expected = np.array([law[c] * len(samples) for c in cells])
    assert observed.sum() == len(samples), "a sample fell outside the AR law's support"
    big = expected >= 5
    obs = np.r_[observed[big], observed[~big].sum()]
    exp = np.r_[expected[big], expected[~big].sum()]
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.fixture(scope="module")
def law3(model):
    law = exact_ar_law(model, PROMPT, 3)
    assert abs(sum(law.values()) - 1) < 1e-6
    return law


@pytest.fixture(scope="module")
def model32():
    """The same kind of model with attention heads of 32 (kv_bits groups hold 32 at least)."""
    return tiny_model(vocab=VOCAB, embed_scale=0.12, head_dim=32, layers=LAYERS)


@pytest.mark.parametrize("depth,kv_bits", [(1, None), (2, None), (3, None), (2, 8)])
def test_mtp_law_equals_ar_law(model, law3, depth, kv_bits, request):
    if kv_bits is not None:
        model = request.getfixturevalue("model32")
        law3 = exact_ar_law(model, PROMPT, 3, kv_bits=kv_bits)
        assert exact_ar_law(model, PROMPT, 3) != law3, "kv_bits changed nothing: the quantized path was not run"
    samples = sample_engine(model, depth, 3, seed0=1000 * depth, kv_bits=kv_bits)
    assert gof_pvalue(samples, law3) > ALPHA


def test_depth3_fourth_token_marginal(model):
    law4 = exact_ar_law(model, PROMPT, 4)
    marginal = {}
    for seq, p in law4.items():
        marginal[(seq[3],)] = marginal.get((seq[3],), 0) + p
    samples = [(s[3],) for s in sample_engine(model, 3, 4, seed0=77)]
    assert gof_pvalue(samples, marginal) > ALPHA


def test_ar_engine_law(model, law3):
    """The AR path samples the same law (sanity check of the reference itself)."""
    assert gof_pvalue(sample_engine(model, 0, 3, seed0=5), law3) > ALPHA


def biased_acceptance(p, q, drafts, rng):
    """The classic bug: after a rejection, draw the next token from p, not the residual."""
    ratio, _ = acceptance_arrays(p, q, drafts, rng)
    return ratio, sample(p, rng.sampling(p.shape[0]))


def test_biased_engine_is_detected(model, law3):
    samples = sample_engine(model, 2, 3, acceptance=biased_acceptance, seed0=2000)
    assert gof_pvalue(samples, law3) < ALPHA


def test_acceptance_is_exercised(model):
    """Both accepted and rejected drafts occur at every position, so the law tests above
    cover the residual and the bonus paths."""
    engine = Engine(model, 3, PARAMS, DRAFT, seed=3)
    for _ in engine.generate(PROMPT, 200):
        pass
    acc = engine.stats.acceptance
    assert all(0.05 < a < 0.95 for a in acc[:2]), acc


def test_reduced_draft_vocabulary_keeps_the_law(model, law3):
    """A head drafting from a subset of the vocabulary (q zero outside it) stays exact: the
    residual norm(max(0, p - q)) covers every token the subset lacks. The subset holds the two
    first tokens the target likes least, so most of the target's mass lies outside it."""
    first: dict[int, float] = {}
    for seq, p in law3.items():
        first[seq[0]] = first.get(seq[0], 0.0) + p
    subset = sorted(sorted(range(VOCAB), key=lambda t: first.get(t, 0.0))[:2])
    assert sum(first.get(t, 0.0) for t in subset) < 0.5
    model.set_draft_vocab(mx.array(subset))
    try:
        samples = sample_engine(model, 2, 3, seed0=3000)
        engine = Engine(model, 2, PARAMS, DRAFT, seed=1)
        drafted = [t for _ in engine.generate(PROMPT, 60) for t in _.tokens]
    finally:
        model.set_draft_vocab(None)
    assert gof_pvalue(samples, law3) > ALPHA
    assert any(t not in subset for t in drafted), "the output never left the subset: nothing was tested"
    assert sum(engine.stats.accepted) > 0, "no draft from the subset was ever accepted"
