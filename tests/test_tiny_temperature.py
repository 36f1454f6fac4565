"""Issue 21 row 1: a positive temperature far below float32's range (1e-40, 1e-300) is the
greedy limit of the tempered law, not an overflow.

``logits / T`` overflowed to inf (then NaN after softmax) and the output was empty text, ended
after one token. filtered_probs now shifts each row's maximum to 0 before dividing
(sampling.tempered), so every path that goes through it (AR, the verify pass, the drafts, and
the acceptance ratios they feed; the API, CLI and server all call stream_generate) gets the
one-hot law at the argmax.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mtplx
from mtplx.engine.sampling import SamplingParams, filtered_probs
from mtplx.engine.speculative import Engine
from tiny_models import tiny_model

TINY = [1e-30, 1e-40, 1e-300, 5e-324]


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (20, 0.95, 0.0), (3, 0.5, 0.1)])
def test_filtered_probs_is_one_hot_at_the_argmax(temperature, top_k, top_p, min_p):
    logits = mx.array([[1.0, 30.0, 2.0, 29.999, -5.0], [-80.0, -90.0, -float("inf"), -79.5, -85.0]])
    probs = np.array(filtered_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                           min_p=min_p)))
    assert np.isfinite(probs).all()
    np.testing.assert_array_equal(probs, np.eye(5, dtype=np.float32)[[1, 3]])


def test_an_ordinary_temperature_keeps_its_law():
    """Shifting by the maximum changes nothing but rounding: the law equals softmax(logits / T)
    computed in float64."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50)) * 8
    for t in (0.05, 0.6, 1.0, 3.0):
        z = logits / t
        want = np.exp(z - z.max(axis=1, keepdims=True))
        want /= want.sum(axis=1, keepdims=True)
        got = np.array(filtered_probs(mx.array(logits.astype(np.float32)), SamplingParams(temperature=t, top_k=0,
                                                                                          top_p=1.0)))
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("depth", [0, 2])
def test_engine_at_a_tiny_temperature_is_greedy(depth):
    """Target and draft at T = 1e-300: the tokens greedy decoding emits, and every draft the
    argmax draft accepts is accepted (ratio p/q = 1/1)."""
    model = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    prompt = [3, 1, 4, 1, 5]

    def run(params):
        engine = Engine(model, depth, params, seed=0)
        return [t for s in engine.generate(prompt, 24) for t in s.tokens], engine.stats

    greedy, g = run(SamplingParams(temperature=0.0))
    tiny, t = run(SamplingParams(temperature=1e-300))
    assert tiny == greedy and len(tiny) == 24
    assert t.accepted == g.accepted


def test_a_tiny_draft_temperature_drafts_the_argmax():
    """draft_temperature = 1e-40 under a sampled target: q is one-hot (finite), so drafts are
    accepted at the rate p(argmax) and the run is not cut short."""
    model = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    engine = Engine(model, 2, SamplingParams(temperature=0.6), SamplingParams(temperature=1e-40), seed=0)
    tokens = [t for s in engine.generate([3, 1, 4], 40) for t in s.tokens]
    assert len(tokens) == 40 and sum(engine.stats.accepted) > 0


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
@pytest.mark.parametrize("depth", [0, 2])
def test_api_at_a_tiny_temperature_gives_the_greedy_text(demo_bf16, temperature, depth):
    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    greedy = mtplx.generate(model, tok, "def fib(n):", max_tokens=10, temperature=0, depth=depth)
    chunks = list(mtplx.stream_generate(model, tok, "def fib(n):", max_tokens=10, temperature=temperature,
                                        depth=depth, seed=5))
    assert greedy and "".join(c.text for c in chunks) == greedy
    assert chunks[-1].generation_tokens == 10 and chunks[-1].finish_reason == "length"


def test_cli_at_a_tiny_temperature_gives_the_greedy_text():
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    def run(t):
        r = CliRunner().invoke(cli, ["run", "--model", "demo", "--raw", "-n", "6", "-t", t, "-q", "def fib(n):"])
        assert r.exit_code == 0, r.output
        return r.stdout

    assert run("1e-300") == run("0")
