"""Exactness (c): greedy MTP output equals greedy AR output token for token, on the demo
artifact (4-bit trunk, int4 head): 24 tokens at depths 1, 2, 3 on one prompt, and on another
at depth 2 with the head drafting from a reduced vocabulary (the first 1024 ids). Each run has
both accepted and rejected drafts (checked), so the bonus and the residual paths both run; 24
tokens rather than 40 because each 4-bit demo token costs about 0.1 s on MLX's CPU backend.

The verify pass runs the trunk over D+1 tokens where AR runs one, and MLX may round a
block matmul differently from a single-row one. If that flips an argmax, the two logits must
be a numerical tie; the test then checks the gap and compares the outputs up to the flip.
"""

from __future__ import annotations

import mlx.core as mx

from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class LRUCache:\n    \"\"\"A least-recently-used cache with a fixed capacity.\"\"\"\n\n    def __init__(self, capacity):\n",
]
TOKENS = 24
TIE = 0.05  # logits are bf16 on a 4-bit trunk: a gap below this is within rounding


def greedy(model, ids, depth, tokens=TOKENS):
    if depth == 0:  # the AR reference loop (mlx-lm's own forward), not the decoder under test
        return [t for step in ar_generate(model, ids, tokens, SamplingParams(temperature=0.0)) for t in step.tokens], None
    engine = Engine(model, depth, SamplingParams(temperature=0.0), seed=0)
    return [t for step in engine.generate(ids, tokens) for t in step.tokens], engine.stats


def check_against_ar(model, ids, ar, mtp, depth):
    """Equal, or diverging only where the two top logits are a numerical tie."""
    if mtp == ar:
        return
    flip = next(i for i, (a, b) in enumerate(zip(ar, mtp)) if a != b)
    logits = model.trunk.logits(mx.array([ids + ar[:flip]]), model.trunk.make_cache())[0, -1].astype(mx.float32)
    top2 = mx.sort(logits)[-2:]
    gap = float((top2[1] - top2[0]).item())
    assert {ar[flip], mtp[flip]} <= set(mx.argsort(logits)[-2:].tolist()), f"depth {depth}: not a top-2 swap"
    assert gap < TIE, f"depth {depth} diverges at token {flip} with a logit gap of {gap}: not a tie"


def test_greedy_mtp_equals_greedy_ar(demo):
    model, tok = demo
    ids = tok.encode(PROMPTS[0])
    ar, _ = greedy(model, ids, 0)
    assert len(ar) == TOKENS
    for depth in (1, 2, 3):
        mtp, stats = greedy(model, ids, depth)
        assert stats.steps < TOKENS, "drafts were never accepted: nothing was tested"
        assert sum(stats.accepted) < sum(stats.drafted), f"depth {depth}: no draft was rejected"
        check_against_ar(model, ids, ar, mtp, depth)


def test_greedy_with_a_reduced_draft_vocabulary(demo):
    model, tok = demo
    ids = tok.encode(PROMPTS[1])
    ar, _ = greedy(model, ids, 0, tokens=TOKENS)
    model.set_draft_vocab(mx.arange(1024))
    try:
        mtp, stats = greedy(model, ids, 2)
    finally:
        model.set_draft_vocab(None)
    assert stats.steps < TOKENS and any(t >= 1024 for t in ar), "nothing outside the subset or nothing accepted"
    assert sum(stats.accepted) < sum(stats.drafted), "no draft was rejected"
    check_against_ar(model, ids, ar, mtp, 2)
