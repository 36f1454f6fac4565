"""Logits -> filtered distributions, sampling, and the exact speculative acceptance rule.

One sampler order everywhere (vLLM's and transformers'): temperature, then top-k, then top-p
on the renormalized top-k, then min-p, then renormalize. The AR path and the verify pass use
the same :func:`filtered_probs`, so speculation targets exactly the law AR samples from.

Randomness comes from a host-side numpy generator: uniforms travel to the device as a tiny
array, so the AR loop never waits on the device to sample, and every path is reproducible
from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mtplx.core import knobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = knobs.DEFAULTS["temperature"]
    top_p: float = knobs.DEFAULTS["top_p"]
    top_k: int = knobs.DEFAULTS["top_k"]
    min_p: float = knobs.DEFAULTS["min_p"]

    def __post_init__(self) -> None:
        # The limits live in mtplx.core.knobs (KnobError is a ValueError); values come back as plain
        # float/int, so a numpy scalar or a bool cannot slip into the filters.
        for name in ("temperature", "top_p", "top_k", "min_p"):
            object.__setattr__(self, name, knobs.KNOBS[name].check(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Rng:
    """Seeded uniforms. ``sampling`` draws lie in (0, 1] (inverse-CDF sampling never lands on a
    zero-probability token); ``accept`` draws lie in [0, 1) (a ratio of 1 always accepts)."""

    def __init__(self, seed: int | None = None):
        self._gen = np.random.default_rng(seed)

    def sampling(self, n: int) -> mx.array:
        return mx.array((1.0 - self._gen.random(n)).astype(np.float32))

    def accept(self, n: int) -> np.ndarray:
        return self._gen.random(n)


def tempered(logits: mx.array, temperature: float) -> mx.array:
    """``logits / temperature`` shifted so each row's maximum is 0: the same law after softmax,
    and finite for any positive temperature. Dividing first overflows for a tiny one (a logit of
    30 at T = 1e-40 is 3e41 > float32's max: inf, then NaN), and a temperature below float32's
    range (1e-300) is 0 on the device; the shifted maxima are then 0 / 0, set to 0 here, so the
    law is the limit one: uniform over the maximal logits (the greedy token when it is unique)."""
    diff = logits.astype(mx.float32) - logits.astype(mx.float32).max(axis=-1, keepdims=True)
    return mx.where(diff == 0, 0.0, diff / temperature)


def filtered_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Rows of logits ``[..., V]`` -> float32 probabilities of the filtered target law."""
    vocab = logits.shape[-1]
    if params.greedy:
        return (mx.arange(vocab) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    scaled = tempered(logits, params.temperature)
    indices = None
    if 0 < params.top_k < vocab:
        indices = mx.argpartition(-scaled, kth=params.top_k - 1, axis=-1)[..., : params.top_k]
        scaled = mx.take_along_axis(scaled, indices, axis=-1)
    if params.top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_probs = mx.softmax(mx.take_along_axis(scaled, order, axis=-1), axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the smallest set whose
        # mass reaches top_p, never empty.
        keep_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < params.top_p
        keep = mx.put_along_axis(mx.zeros(scaled.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
        scaled = mx.where(keep, scaled, -mx.inf)
    if params.min_p > 0:
        probs = mx.softmax(scaled, axis=-1)
        scaled = mx.where(probs >= params.min_p * probs.max(axis=-1, keepdims=True), scaled, -mx.inf)
    probs = mx.softmax(scaled, axis=-1)
    if indices is None:
        return probs
    dense = mx.zeros((*probs.shape[:-1], vocab), dtype=mx.float32)
    return mx.put_along_axis(dense, indices, probs, axis=-1)


def sample(probs: mx.array, uniforms: mx.array) -> mx.array:
    """Inverse-CDF draw from each row of ``probs [N, V]`` (unnormalized is fine) with
    ``uniforms [N]`` in (0, 1]; returns int32 tokens ``[N]``."""
    cdf = mx.cumsum(probs, axis=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    index = (cdf < target).sum(axis=-1)
    return mx.minimum(index, probs.shape[-1] - 1).astype(mx.int32)


def sample_logits(logits: mx.array, params: SamplingParams, rng: Rng) -> tuple[mx.array, mx.array]:
    """Sample one token per row of ``logits [N, V]``; returns (tokens [N], probs [N, V])."""
    probs = filtered_probs(logits, params)
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32), probs
    return sample(probs, rng.sampling(logits.shape[0])), probs


@dataclass
class Verdict:
    """Outcome of one verify: ``accepted`` drafts kept, then ``next_token`` (residual or bonus)."""

    accepted: int
    next_token: int


def residual(p: mx.array, q: mx.array) -> mx.array:
    """norm(max(0, p - q)) row-wise, unnormalized; where it has no mass (p == q), p itself."""
    r = mx.maximum(p - q, 0.0)
    return mx.where(r.sum(axis=-1, keepdims=True) > 0, r, p)


def acceptance_arrays(p: mx.array, q: mx.array, drafts: mx.array, rng: Rng) -> tuple[mx.array, mx.array]:
    """Device side of one verify's acceptance test (lazy, evaluated with the verify pass).

    ``p [D+1, V]``: target law at the D draft positions and the bonus position.
    ``q [D, V]``: the law each draft was actually sampled from. ``drafts [D]``.
    Returns the ratios p_i(d_i) / q_i(d_i) ``[D]`` and one candidate next token per position
    ``[D+1]``: drawn from the residual norm(max(0, p_i - q_i)) at draft positions, from p_D
    at the bonus position, each with its own uniform.
    """
    depth = q.shape[0]
    rows = mx.arange(depth)
    ratio = p[rows, drafts] / mx.maximum(q[rows, drafts], 1e-30)
    candidates = sample(mx.concatenate([residual(p[:depth], q), p[depth:]], axis=0), rng.sampling(depth + 1))
    return ratio, candidates


def decide(ratio: mx.array, candidates: mx.array, rng: Rng) -> Verdict:
    """Host side: keep draft i while u_i < ratio_i (u_i independent of the candidates' draws);
    the next token is the candidate at the first rejection, or the bonus if all pass."""
    ratio_host = np.array(ratio, dtype=np.float64)
    u = rng.accept(len(ratio_host))
    accepted = len(ratio_host)
    for i, r in enumerate(ratio_host):
        if not u[i] < r:
            accepted = i
            break
    return Verdict(accepted=accepted, next_token=int(candidates[accepted].item()))


def speculative_verdict(p: mx.array, q: mx.array, drafts: mx.array, rng: Rng) -> Verdict:
    """Leviathan/Chen acceptance for one verify pass: :func:`acceptance_arrays`, evaluated,
    then :func:`decide`. The output law is exactly p's (tests/test_sampling.py)."""
    ratio, candidates = acceptance_arrays(p, q, drafts, rng)
    mx.eval(ratio, candidates)
    return decide(ratio, candidates, rng)
