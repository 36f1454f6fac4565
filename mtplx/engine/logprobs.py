"""Log-probabilities of the emitted tokens, from logits rows the engine already computes.

The value reported for a token is the log-softmax of the trunk's raw logits at the position
that emitted it (as vLLM and mlx-lm report them): not the filtered, temperature-scaled law the
token was sampled from, so it does not depend on the sampler or on the draft depth. Which row
that is: in AR decoding the step's logits; in a speculative step the verify pass's row i for
the i-th token the step emits (accepted drafts, then the residual or bonus token); for the
first token, the prefill's last row. The verify pass runs the same trunk over the same tokens,
so for the same sequence the values agree with AR's up to the numerics of a batched pass.

Off (``k=None``) costs nothing: no device work is added. On, a step evaluates the log-softmax
of its rows and their top-k with the step's own evaluation, then reads the emitted tokens'
values with one small gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mtplx.errors import MtplxError


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token: its log-probability and the ``k`` most likely tokens at its position
    (``top``: (token, logprob) pairs, most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class LogprobRows:
    """Logits rows of one step, reduced lazily to log-softmax and top-k. ``arrays`` go into the
    step's evaluation; :meth:`take` reads them once it is done."""

    def __init__(self, logits: mx.array | None, k: int | None):
        self.k = k
        self.arrays: list[mx.array] = []
        if logits is None or k is None:
            return
        rows = logits.reshape(-1, logits.shape[-1]).astype(mx.float32)
        self.logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
        self.arrays.append(self.logprobs)
        if k > 0:
            self.top_ids = mx.argpartition(-self.logprobs, kth=k - 1, axis=-1)[:, :k]
            self.top_values = mx.take_along_axis(self.logprobs, self.top_ids, axis=-1)
            self.arrays += [self.top_ids, self.top_values]

    def splice(self, at: int, other: LogprobRows) -> LogprobRows:
        """Rows ``0..at-1`` of these, then ``other``'s (strict greedy: a one-row recompute
        replaces verify row ``at``, and the rows after it emit nothing)."""
        if not self.arrays:
            return self
        out = LogprobRows(None, self.k)
        out.logprobs = mx.concatenate([self.logprobs[:at], other.logprobs])
        out.arrays = [out.logprobs]
        if self.k:
            out.top_ids = mx.concatenate([self.top_ids[:at], other.top_ids])
            out.top_values = mx.concatenate([self.top_values[:at], other.top_values])
            out.arrays += [out.top_ids, out.top_values]
        return out

    def take(self, tokens: list[int]) -> list[TokenLogprob] | None:
        """Row i's values for ``tokens[i]``; None when logprobs are off."""
        if not self.arrays:
            return None
        n = len(tokens)
        chosen = self.logprobs[mx.arange(n), mx.array(tokens)].tolist()
        tops: list[tuple[tuple[int, float], ...]] = [()] * n
        if self.k:
            ids, values = self.top_ids[:n].tolist(), self.top_values[:n].tolist()
            tops = [tuple(sorted(zip(i, v), key=lambda p: -p[1])) for i, v in zip(ids, values)]
        return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


class LogprobReader:
    """The engine's logprobs setting: ``k`` alternatives per token (0: the token's own value
    only), or None for off."""

    def __init__(self, k: int | None, vocab_size: int):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab_size):
            raise MtplxError(f"logprobs must be None or an integer in [0, {vocab_size}], got {k!r}",
                             fix="pass how many alternatives to report per token (0 = only the token's own)")
        self.k = k

    def rows(self, logits: mx.array) -> LogprobRows:
        return LogprobRows(logits, self.k)
