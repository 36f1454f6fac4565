"""Logprobs from the engine and the API: the log-softmax of the trunk's raw logits at each
emitted token's position, the same at every depth for the same tokens."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mtplx.api import encode_prompt, stream_generate
from mtplx.engine.logprobs import LogprobReader
from mtplx.engine.sampling import SamplingParams, filtered_probs
from mtplx.errors import MtplxError

PROMPT = "def fib(n):"
TOL = 1e-2  # a verify pass batches 3 tokens where AR runs 1: a block matmul may round differently


def _run(model, tokenizer, **kw):
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=8, **kw))
    tokens = [t for r in responses for t in r.tokens]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token for lp in logprobs] == tokens  # aligned with the tokens, response by response
    return tokens, logprobs


def _reference(model, tokenizer, tokens: list[int]) -> mx.array:
    """log-softmax of one plain trunk pass over prompt + tokens, at each generated token's position."""
    prompt = encode_prompt(tokenizer, PROMPT)
    logits = model.trunk.logits(mx.array(prompt + tokens)[None], model.trunk.make_cache())[0].astype(mx.float32)
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return rows - mx.logsumexp(rows, axis=-1, keepdims=True)


def test_same_at_every_depth_and_equal_to_a_plain_pass(demo_bf16) -> None:
    model, tokenizer = demo_bf16
    ar_tokens, ar = _run(model, tokenizer, temperature=0, depth=0, logprobs=3)
    mtp_tokens, mtp = _run(model, tokenizer, temperature=0, depth=2, logprobs=3)
    assert ar_tokens == mtp_tokens
    ref = _reference(model, tokenizer, ar_tokens)
    for i, (a, b) in enumerate(zip(ar, mtp)):
        assert abs(a.logprob - b.logprob) < TOL, (i, a, b)
        assert abs(a.logprob - ref[i, a.token].item()) < TOL, i
        # Greedy: the emitted token is the likeliest; alternatives come most likely first.
        assert a.top[0][0] == a.token and len(a.top) == 3
        assert [v for _, v in a.top] == sorted((v for _, v in a.top), reverse=True)
        for (ta, va), (tb, vb) in zip(a.top, b.top):
            assert abs(va - ref[i, ta].item()) < TOL and abs(vb - ref[i, tb].item()) < TOL


def test_sampled_values_are_the_raw_law_not_the_filtered_one(demo_bf16) -> None:
    # Sampled through temperature 0.6, top-k 5 and top-p 0.8 at depth 2: the reported value is
    # still the model's own log-probability, which the filtered law (renormalized over a few
    # tokens, sharpened) would overstate.
    model, tokenizer = demo_bf16
    tokens, lps = _run(model, tokenizer, temperature=0.6, top_k=5, top_p=0.8, depth=2, seed=7, logprobs=0)
    ref = _reference(model, tokenizer, tokens)
    assert all(lp.top == () for lp in lps)
    assert max(abs(lp.logprob - ref[i, lp.token].item()) for i, lp in enumerate(lps)) < TOL
    # ... and the check above tells the two apart: the filtered law's values are far from these.
    prompt = encode_prompt(tokenizer, PROMPT)
    logits = model.trunk.logits(mx.array(prompt + tokens)[None], model.trunk.make_cache())[0]
    law = filtered_probs(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)],
                         SamplingParams(temperature=0.6, top_k=5, top_p=0.8))
    assert max(abs(lp.logprob - math.log(law[i, lp.token].item())) for i, lp in enumerate(lps)) > 0.3


def test_off_by_default_and_checked(demo_bf16) -> None:
    model, tokenizer = demo_bf16
    assert all(r.logprobs is None for r in stream_generate(model, tokenizer, PROMPT, max_tokens=2, temperature=0))
    for bad in (-1, 2.5, True, model.vocab_size + 1):
        with pytest.raises(MtplxError, match="logprobs"):
            LogprobReader(bad, model.vocab_size)
