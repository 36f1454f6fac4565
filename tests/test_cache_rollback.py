"""Exactness (d): after every speculative step the committed caches equal those of an AR pass
over the same tokens: attention KV, Gated-DeltaNet conv and recurrent states, and the MTP
head's KV rows. A variant that skips the Gated-DeltaNet restore must be caught.

Float32 random model: the MTP path verifies blocks while the reference runs one token at a
time, so they agree to rounding (atol 2e-5), not bit for bit.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mtplx.engine.cache import snapshot
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from tiny_models import tiny_model

ATOL = 2e-5
PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def ar_reference(model, tokens: list[int]):
    """Caches after feeding ``tokens`` one at a time; head rows from the per-token hiddens."""
    ref = model.make_cache()
    hiddens = []
    for t in tokens:
        _, h = model.trunk_forward(mx.array([[t]]), ref)
        hiddens.append(h)
    hidden = mx.concatenate(hiddens, axis=1)
    ids = mx.array([tokens])
    model.draft(hidden[:, :-1], ids[:, 1:], ref)
    return ref


def compare(model, engine, committed):
    got = snapshot(engine.cache)
    want = snapshot(ar_reference(model, committed))
    # Head rows for positions after the last verify are fed at the next draft: compare what
    # the head has committed so far.
    assert set(got) == set(want) or all(k.startswith("head") for k in set(want) ^ set(got))
    worst = 0.0
    for name, value in got.items():
        ref = want[name]
        if name.startswith("head"):
            ref = ref[..., : value.shape[-2], :]
        assert value.shape == ref.shape, name
        diff = float(mx.max(mx.abs(value.astype(mx.float32) - ref.astype(mx.float32))).item())
        worst = max(worst, diff)
        assert diff < ATOL, f"{name} differs by {diff}"
    return worst


@pytest.mark.parametrize("depth,temperature", [(1, 0.8), (2, 0.0), (3, 0.8)])
def test_caches_equal_ar_after_every_step(model, depth, temperature):
    engine = Engine(model, depth, SamplingParams(temperature=temperature, top_k=8, top_p=0.95), seed=depth)
    emitted: list[int] = []
    rejected_steps = 0
    for i, step in enumerate(engine.generate(PROMPT, 40)):
        emitted += step.tokens
        if i == 0:
            continue
        rejected_steps += step.accepted < step.drafted
        # The trunk holds every emitted token but the newest (it is fed at the next step).
        assert engine.cache.offset == len(PROMPT) + len(emitted) - 1
        compare(model, engine, PROMPT + emitted[:-1])
    assert rejected_steps > 0, "no rejection happened: the rollback path was not exercised"


def test_skipping_the_recurrent_restore_is_caught(model, monkeypatch):
    """Trim the KV caches but leave the Gated-DeltaNet states after the whole block."""
    def commit_without_restore(cache, states, drafted, accepted, head_rows_drafted):
        for c in cache.trunk:
            if hasattr(c, "trim"):
                c.trim(drafted - accepted)
        for c in cache.head:
            c.trim(max(head_rows_drafted - 1, 0))

    monkeypatch.setattr("mtplx.engine.speculative.commit", commit_without_restore)
    engine = Engine(model, 2, SamplingParams(temperature=0.8, top_k=8), seed=0)
    emitted: list[int] = []
    caught = False
    for i, step in enumerate(engine.generate(PROMPT, 40)):
        emitted += step.tokens
        if i and step.accepted < step.drafted:
            with pytest.raises(AssertionError, match="differs"):
                compare(model, engine, PROMPT + emitted[:-1])
            caught = True
            break
    assert caught
