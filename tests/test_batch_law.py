"""Exactness of the batched decoder: the law of every row equals AR's law for that row.

Model and method as tests/test_engine_law.py (random tiny-vocab Qwen3.5 of 2 layers, one Gated-
DeltaNet and one attention; exact AR law of the first three generated tokens by enumeration,
chi-square goodness of fit at level 1e-3, cells with an expected count under 5 pooled). Here two
kinds of rows decode *together*, each with its own prompt length, temperature, top-p / top-k and
depth, so a batch mixes blocks of different sizes and laws. Each batch holds ``COPIES`` rows of
every kind (independent seeds); N = 600 generations per kind (the per-row cost of a step bounds
N on this CPU).

Power: with N = 600 and the laws' pooled cells (under 50), the test at level 1e-3 detects an
effect size w = 0.35 with probability above 0.9 per kind (noncentral chi-square, lambda =
N w^2 = 73; :func:`test_stated_power` computes it from the laws' pooled cells). A leaky
batch (every row accepting with the first row's ratios) must be rejected, which shows the test
sees one row's acceptance leaking into another.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from scipy import stats

from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.sampling import SamplingParams
from test_engine_law import ALPHA, DRAFT, LAYERS, VOCAB, exact_ar_law, gof_pvalue
from tiny_models import tiny_model

N = 600
W = 0.35  # the effect size detected with power > 0.9
N_LEAKY = 300  # the leak is gross: fewer samples show it
COPIES = 50  # rows of each kind per batch: N // COPIES batches
LENGTH = 3
KINDS = [  # (prompt, target sampler, depth)
    ([3, 0, 5, 1, 2, 4, 0], SamplingParams(temperature=1.5, top_p=0.9, top_k=0), 2),
    ([2, 5], SamplingParams(temperature=0.4, top_p=1.0, top_k=2), 3),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB, embed_scale=0.12, layers=LAYERS)


@pytest.fixture(scope="module")
def laws(model):
    out = [exact_ar_law(model, prompt, LENGTH, params) for prompt, params, _ in KINDS]
    assert all(abs(sum(law.values()) - 1) < 1e-6 for law in out)
    return out


def sample_batched(model, seed0: int, n: int = N) -> list[list[tuple[int, ...]]]:
    """n generations of every kind, COPIES of each kind interleaved in every batch."""
    out: list[list[tuple[int, ...]]] = [[] for _ in KINDS]
    for b in range(n // COPIES):
        decoder = BatchDecoder(model, max_batch=len(KINDS) * COPIES)
        rows = []
        for c in range(COPIES):
            for k, (prompt, params, depth) in enumerate(KINDS):
                seed = seed0 + (b * COPIES + c) * len(KINDS) + k
                rows.append((k, decoder.add(RowRequest(prompt, LENGTH, params, depth=depth, draft_params=DRAFT,
                                                       seed=seed))))
        while len(decoder):
            decoder.step()
        for k, row in rows:
            out[k].append(tuple(row.emitted[:LENGTH]))
    return out


def test_stated_power(laws):
    for law in laws:
        cells = sum(1 for p in law.values() if p * N >= 5) + 1  # pooled as gof_pvalue pools them
        assert cells <= 50
        power = stats.ncx2.sf(stats.chi2.isf(ALPHA, cells - 1), cells - 1, N * W**2)
        assert power > 0.9, (cells, power)


def test_every_row_keeps_its_own_law(model, laws):
    samples = sample_batched(model, seed0=0)
    for k, (kind, law) in enumerate(zip(samples, laws)):
        assert gof_pvalue(kind, law) > ALPHA, f"kind {k}"


def test_a_leaky_batch_is_detected(model, laws, monkeypatch):
    """Each row decides its drafts with the ratios of the row before it in the batch (a row of
    the other kind), as far as both drafted: one row's acceptance leaks into its neighbour's."""
    verify = BatchDecoder._verify

    def leaky(self, decoding, prefill, plain):
        verify(self, decoding, prefill, plain)
        own = [w.ratio for w in decoding]
        for prev, w, mine in zip(own[-1:] + own[:-1], decoding, own):
            n = min(prev.shape[0], mine.shape[0])
            w.ratio = mx.concatenate([prev[:n], mine[n:]])

    monkeypatch.setattr(BatchDecoder, "_verify", leaky)
    samples = sample_batched(model, seed0=10**6, n=N_LEAKY)
    # A token outside a row's support (probability 0 under its law) is a leak caught outright.
    assert min(gof_pvalue(kind, law) if set(kind) <= set(law) else 0.0 for kind, law in zip(samples, laws)) < ALPHA
