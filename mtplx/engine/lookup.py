"""Drafts copied from the context (prompt lookup): the second draft source beside the MTP head.

A row keeps a :class:`ContextIndex` over its prompt and its output so far. Before a step, the
row's :class:`Lookup` may propose the tokens that followed the latest earlier occurrence of the
row's most recent tokens; the decoder (batch.py) then verifies them instead of running the head.

Why a copy is exact: a copied token x is a draft whose law q is one-hot at x, decided before the
step draws anything (it depends only on committed tokens). The acceptance rule of sampling.py
with that q accepts x with probability p(x)/q(x) = p(x), and on rejection draws from
norm(max(0, p - q)) = p with x removed, renormalised: exactly speculative sampling, so the
output law is the target's at any temperature (greedy: x is kept iff it is the argmax). The q
handed to the verify is one-hot over the full vocabulary V, whatever draft vocabulary the head
uses.

The index: for each n in :data:`NGRAMS`, a hash table from the n tokens ending at a position to
the latest position that followed them. Appending a token costs one table write per n
(amortised O(1)); a proposal costs one probe per n, longest n first, so the match found is the
longest of those sizes, and the most recent occurrence of it. A miss proposes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mtplx.engine.policy import expected_tokens

__all__ = ["AUTO", "MAX_COPY", "NGRAMS", "ContextIndex", "Lookup", "one_hot"]

AUTO = "auto"
# Match sizes, longest first tried: 12 finds the place a rewrite is really copying from (in a
# file with repeated lines the latest short match is often the wrong row); 2 picks the copy up
# again right after the edit. Chosen by replaying faithful rewrites of the shipped prompts
# (`mtplx bench --workload rewrite --replay`, bench/lookup_replay.py; docs/performance.md, "Drafts
# copied from the context"): memory-bound, auto at K = 16, 6.34x AR against 5.80x for the first
# choice (8, 3), better on each of the five prompts; single sizes and a fallback of 3 or 4 lose.
NGRAMS = (12, 2)
# The most tokens one step copies (the ceiling); "auto" picks k <= this by the cost model,
# a forced lookup=N copies N. The same replay, memory-bound, (12, 2): with auto pricing a position
# not reached yet as the deepest reached one (Lookup.estimates), auto runs a faithful rewrite at
# 8.27x AR with K = 32 against 7.64x with 16 (copying every match: 9.50x), and text that shares
# nothing with the prompt at 1.16x with either; before that pricing, auto never tried a position
# past about 13 and K = 12..32 lay within 0.2% (6.34x).
MAX_COPY = 32


class ContextIndex:
    """The tokens of one row (prompt, then output) and where each recent n-gram last occurred."""

    def __init__(self, tokens: Iterable[int] = (), ngrams: Sequence[int] = NGRAMS):
        self.ngrams = tuple(sorted(set(ngrams), reverse=True))
        if not self.ngrams or min(self.ngrams) < 1:
            raise ValueError(f"n-gram sizes must be >= 1, got {ngrams!r}")
        self.tokens: list[int] = []
        self._tables: list[dict[tuple[int, ...], int]] = [{} for _ in self.ngrams]
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens``: each new position becomes the successor of the n-grams ending just
        before it (later occurrences overwrite earlier ones: the latest match is proposed)."""
        toks = self.tokens
        pairs = list(zip(self.ngrams, self._tables))
        for t in tokens:
            i = len(toks)
            for n, table in pairs:
                if i >= n:
                    table[tuple(toks[i - n : i])] = i
            toks.append(int(t))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest indexed match of the last tokens; [] on a
        miss (or k <= 0)."""
        toks = self.tokens
        if k <= 0:
            return []
        for n, table in zip(self.ngrams, self._tables):
            if len(toks) < n:
                continue
            at = table.get(tuple(toks[-n:]))
            if at is not None:
                return toks[at : at + k]
        return []


def one_hot(tokens: Sequence[int], vocab: int) -> Any:
    """The draft law of copied ``tokens``: ``[len, V]`` float32 rows, one-hot at each token."""
    import mlx.core as mx

    return (mx.arange(vocab)[None, :] == mx.array(list(tokens), dtype=mx.int32)[:, None]).astype(mx.float32)


class Lookup:
    """A row's use of the copy source. ``mode`` 0: never; N: copy up to N tokens whenever the
    index has a match; "auto": copy where the expected tokens per unit of time beat the head's
    choice (:meth:`choose`).

    Auto keeps a running acceptance per copied position (conditional on the ones before it being
    accepted), as depth auto does for the head (policy.AutoDepth, same weight ALPHA): the first
    position starts at ``PRIOR``, and a position never reached yet is taken to accept as the
    deepest one reached does, and starts from that when first reached. A copy that ran true
    for ten tokens is likely to run on (a file being rewritten), so auto reaches deeper copies
    as fast as the shallow ones earn it, where a flat prior would price each new position at
    ``PRIOR`` and stop short of where a faithful rewrite's copies run. With the head's step
    costs (an AutoDepth policy), a copy of k tokens costs a
    verify of k + 1 tokens and the step's overhead, no draft pass; it is taken when its rate
    E(k) / cost(k) beats the head's best depth's. Without costs (a pinned depth), a copy is taken
    while the running acceptance of its first token is at least ``MIN_FIRST``, and probed every
    ``PROBE`` matches otherwise, so a source that stopped paying can come back.

    Every input (the committed tokens, past acceptance) is decided before the step's draws, so
    the choice never biases the output law.
    """

    ALPHA = 0.125
    PRIOR = 0.6
    MIN_FIRST = 0.4
    PROBE = 16

    def __init__(self, mode: int | str, ngrams: Sequence[int] | None = None):
        self.mode = mode
        self.max_copy = MAX_COPY if mode == AUTO else int(mode)
        self.ngrams = NGRAMS if ngrams is None else ngrams  # read at creation: tests set small sizes
        self.index: ContextIndex | None = None
        self.acceptance = [self.PRIOR] * self.max_copy
        self.reached = 0  # positions observed at least once; the rest are priced as the deepest of them
        self._misses = 0

    @property
    def active(self) -> bool:
        return self.max_copy > 0

    def start(self, tokens: Iterable[int]) -> None:
        """Index the prompt and the first token (once the row's prompt is in)."""
        self.index = ContextIndex(tokens, self.ngrams)

    def extend(self, tokens: Iterable[int]) -> None:
        if self.index is not None:
            self.index.extend(tokens)

    def choose(self, room: int, head: Any, head_depth: int) -> list[int]:
        """The tokens to copy this step ([]: let the head, or a plain step, go). ``room``: the
        most drafts the budget leaves; ``head``: the row's depth policy, which chose
        ``head_depth``."""
        if self.index is None or room <= 0:
            return []
        copy = self.index.propose(min(self.max_copy, room))
        if not copy or self.mode != AUTO:
            return copy
        costs = getattr(head, "costs", None)
        if costs is not None:
            best_k, best = 0, head.rate(head_depth) if head_depth <= head.max_depth else 0.0
            best = max(best, 1.0 / costs.ar)
            acceptance = self.estimates()
            for k in range(1, len(copy) + 1):
                rate = expected_tokens(acceptance, k) / self.copy_cost(costs, k)
                if rate > best:
                    best_k, best = k, rate
            if best_k:
                return copy[:best_k]
        elif self.acceptance[0] >= self.MIN_FIRST:
            return copy
        self._misses += 1
        if self._misses >= self.PROBE:  # a probe: the running acceptance cannot recover otherwise
            self._misses = 0
            return copy[:1]
        return []

    @staticmethod
    def copy_cost(costs: Any, k: int) -> float:
        """A step verifying k copied tokens: verify(k + 1) (extrapolated linearly past the depths
        measured) and the loop's overhead; no draft pass."""
        v = costs.verify_ms
        if k < len(v):
            verify = v[k]
        else:
            slope = (v[-1] - v[0]) / (len(v) - 1) if len(v) > 1 else v[0]
            verify = v[-1] + (k + 1 - len(v)) * max(slope, 0.0)
        return verify + costs.overhead_ms

    def estimates(self) -> list[float]:
        """The acceptance auto prices copies with: each position's running figure up to the
        deepest one reached, that one's beyond it."""
        known = self.acceptance[: self.reached]
        return known + [known[-1] if known else self.PRIOR] * (self.max_copy - self.reached)

    def observe(self, copied: int, accepted: int) -> None:
        for k in range(copied):
            if k == self.reached:  # first reached: it starts from the estimate it was priced at
                self.acceptance[k] = self.acceptance[k - 1] if k else self.PRIOR
                self.reached = k + 1
            hit = 1.0 if k < accepted else 0.0
            self.acceptance[k] += self.ALPHA * (hit - self.acceptance[k])
            if not hit:
                break
