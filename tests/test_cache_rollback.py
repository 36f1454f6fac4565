"""Exactness (d): after every speculative step the committed caches equal those of an AR pass
over the same tokens: attention KV, Gated-DeltaNet conv and recurrent states, and the MTP
head's KV rows. A variant that skips the Gated-DeltaNet restore must be caught.

The Gated-DeltaNet rollback keeps accepted positions pending until a cap (0 with the CPU's ops
recurrence, 16 with a fused GPU kernel); both caps run here, so the deferred path (pending
prefixes carried into the next verify) is exercised on this CPU too.

Float32 random model: the MTP path verifies blocks while the reference runs one token at a
time, so they agree to rounding (cache_compare.ATOL), not bit for bit.
"""

from __future__ import annotations

import pytest

from cache_compare import compare
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from tiny_models import tiny_model

PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


@pytest.mark.parametrize("cap", [0, 16])
@pytest.mark.parametrize("depth,temperature", [(1, 0.8), (2, 0.0), (3, 0.8)])
def test_caches_equal_ar_after_every_step(model, depth, temperature, cap, monkeypatch):
    monkeypatch.setattr("mtplx.model.gated_delta_cache.pending_cap", lambda key_dim: cap)
    engine = Engine(model, depth, SamplingParams(temperature=temperature, top_k=8, top_p=0.95), seed=depth)
    emitted: list[int] = []
    rejected_steps = max_pending = 0
    for i, step in enumerate(engine.generate(PROMPT, 40)):
        emitted += step.tokens
        if i == 0:
            continue
        rejected_steps += step.accepted < step.drafted
        max_pending = max([max_pending] + [c.pending_len for c in engine.cache.trunk if hasattr(c, "pending_len")])
        # The trunk holds every emitted token but the newest (it is fed at the next step).
        assert engine.cache.offset == len(PROMPT) + len(emitted) - 1
        compare(model, engine.cache, PROMPT + emitted[:-1])
    assert rejected_steps > 0, "no rejection happened: the rollback path was not exercised"
    if cap:
        assert max_pending > 1, "no pending prefix was carried: the deferred path was not exercised"


def test_skipping_the_recurrent_restore_is_caught(model, monkeypatch):
    """Trim the KV caches but leave the Gated-DeltaNet states after the whole block."""
    def commit_without_restore(cache, record, accepted, head=True):
        for c in cache.trunk:
            if hasattr(c, "trim"):
                c.trim(record.tokens - 1 - accepted)
        if head:
            for c in cache.head:
                c.trim(max(record.tokens - 2, 0))

    monkeypatch.setattr("mtplx.engine.steps.commit", commit_without_restore)
    engine = Engine(model, 2, SamplingParams(temperature=0.8, top_k=8), seed=0)
    emitted: list[int] = []
    caught = False
    for i, step in enumerate(engine.generate(PROMPT, 40)):
        emitted += step.tokens
        if i and step.accepted < step.drafted:
            with pytest.raises(AssertionError, match="differs"):
                compare(model, engine.cache, PROMPT + emitted[:-1])
            caught = True
            break
    assert caught


class ScriptedDepth:
    """A policy that walks a fixed depth sequence (plain steps included) and counts what it saw."""

    def __init__(self, depths):
        self.depths, self.i, self.seen = list(depths), 0, []
        self.max_depth = max(depths)

    def choose(self, context: int = 0) -> int:
        d = self.depths[self.i % len(self.depths)]
        self.i += 1
        return d

    def observe(self, drafted: int, accepted: int) -> None:
        self.seen.append((drafted, accepted))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_caches_equal_ar_when_the_depth_changes_every_step(model, temperature):
    """Depth-0 steps between drafting steps: a policy choosing per step takes them in the plain
    lane (batch.py), which feeds every token it emits, its hiddens piling up in the head's
    backlog, then flushing; leaving the lane, its token in flight becomes the pending one."""
    policy = ScriptedDepth([0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0])
    engine = Engine(model, policy, SamplingParams(temperature=temperature, top_k=8, top_p=0.95), seed=3)
    emitted: list[int] = []
    for i, step in enumerate(engine.generate(PROMPT, 40)):
        emitted += step.tokens
        if i:
            consumed = engine.cache.offset - len(PROMPT)
            assert consumed in (len(emitted) - 1, len(emitted))  # a drafted step / the plain lane
            compare(model, engine.cache, PROMPT + emitted[:consumed])
    assert {d for d, _ in policy.seen} == {0, 1, 2, 3}
    if temperature == 0.0:
        ar = [t for s in Engine(model, 0, SamplingParams(temperature=0.0)).generate(PROMPT, 40) for t in s.tokens]
        assert emitted == ar
