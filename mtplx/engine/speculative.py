"""The decode loop: prefill, then AR steps (depth 0) or MTP speculative steps (depth >= 1; the
step itself lives in batch.py, which runs it over one row or many).

State between MTP steps: the trunk caches hold every committed token but the newest one,
``pending`` (already sampled and emitted, not yet fed to the trunk); the head's cache holds one
row per committed position except the rows in ``cache.backlog`` (trunk hiddens of the last
verify), which the next draft feeds in the same call as its first row. One step
(mtplx/engine/steps.py holds the primitives):

1. draft: head(backlog rows ..., (h_last, pending)) -> q_1, d_1; head((chain hidden, d_1)) -> q_2 ...
   each q over the draft vocabulary (all V tokens, or a reduced subset scattered back to V)
2. verify: one trunk pass over [pending, d_1 .. d_D]
3. accept d_i while u_i < p_i(d_i)/q_i(d_i); then a residual or bonus token (sampling.py);
   its device work (target law, ratios, residual draws) is evaluated with the verify pass,
   so a step synchronizes twice: once for the drafts, once for verify + acceptance
4. commit: trim/restore every cache to the accepted prefix (cache.py)

With a prompt cache the prefill covers only the prompt's new suffix, and the caches are left
holding exactly the tokens the trunk consumed, so the next call can extend them.

A grammar constraint (constraints.py) masks p and q at the points marked ``# constraint:``;
with none set those points cost nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import mlx.core as mx

from mtplx.engine import steps
from mtplx.engine.constraints import Constraint
from mtplx.engine.logprobs import LogprobReader, TokenLogprob
from mtplx.engine.policy import DepthPolicy, FixedDepth, as_policy
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, sample_logits
from mtplx.engine.stats import DecodeStats
from mtplx.errors import ContextOverflowError, MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel


@dataclass
class Emitted:
    """Tokens decided by one step (1 + accepted drafts), and the step's shape. ``logprobs``
    (when the engine was asked for them) is aligned with ``tokens``."""

    tokens: list[int]
    drafted: int
    accepted: int
    logprobs: list[TokenLogprob] | None = None


class _Budget:
    """How many of a step's tokens may be emitted: at most ``remaining``, and none after EOS."""

    def __init__(self, remaining: int, eos: set[int]):
        self.remaining = remaining
        self.eos = eos
        self.done = remaining <= 0

    def take(self, tokens: list[int]) -> list[int]:
        kept = tokens[: self.remaining]
        for i, t in enumerate(kept):
            if t in self.eos:
                kept = kept[: i + 1]
                self.done = True
                break
        self.remaining -= len(kept)
        self.done = self.done or self.remaining <= 0
        return kept


class Engine:
    """Decodes one sequence at a time. ``depth`` is a pinned integer (0 = plain AR) or a
    :class:`~mtplx.engine.policy.DepthPolicy` asked before every step."""

    def __init__(
        self,
        model: MTPModel,
        depth: int | DepthPolicy,
        params: SamplingParams,
        draft_params: SamplingParams | None = None,
        seed: int | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        strict_greedy: float | None = None,
    ):
        self.policy = as_policy(depth)
        depth = self.policy.max_depth
        if depth < 0:
            raise MtplxError(f"depth must be >= 0, got {depth}", fix="use 0 for plain AR or 1..8 for MTP")
        if depth > 0 and not model.has_mtp:
            raise MtplxError("this model has no MTP head, so it cannot draft", path=model.path,
                             fix="use depth 0 (--no-mtp) or load an mtplx artifact built with `mtplx graft`")
        self.model = model
        self.depth = depth
        self.params = params
        # Greedy targets draft greedily: any q is exact, the argmax maximizes acceptance.
        self.draft_params = SamplingParams(temperature=0.0) if params.greedy else (draft_params or params)
        self.rng = Rng(seed)
        # logprobs: None = off (no device work), k = the token's log-probability and k alternatives.
        self.logprobs = LogprobReader(logprobs, model.vocab_size)
        # A policy other than a pinned depth chooses per step: stats report its mix of depths.
        self.adaptive = not isinstance(self.policy, FixedDepth)
        self.stats = DecodeStats(depth=depth, adaptive=self.adaptive)
        # The acceptance rule's device side, swappable so tests can prove they detect a biased one.
        self.acceptance_arrays = acceptance_arrays
        # The live caches of the current generation (inspected by the cache-equality tests).
        self.cache: ModelCache | None = None
        # A grammar that masks p and q (response_format); None decodes unconstrained.
        self.constraint = constraint
        # Strict greedy's margin (engine/strict.py; None: off). The plain AR path decodes one row
        # at a time already, so only speculative steps use it.
        self.strict_greedy = strict_greedy

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise MtplxError("the prompt is empty", fix="pass at least one token")
        if len(prompt) >= self.model.max_context:
            raise ContextOverflowError(len(prompt), self.model.max_context)

    def generate(self, prompt: list[int], max_tokens: int, eos: Iterable[int] = (),
                 prompt_cache: PromptCache | None = None, snapshot_at: Iterable[int] = ()) -> Iterator[Emitted]:
        """Yield tokens step by step until ``max_tokens`` are out or an EOS token is emitted
        (the EOS token is the last one yielded). The total is exactly ``max_tokens`` otherwise.

        With ``prompt_cache``, only the part of ``prompt`` it does not already hold is prefilled,
        and afterwards it holds the prompt and the reply (as far as the trunk consumed it);
        ``snapshot_at`` adds prompt positions where it keeps a snapshot (see prompt_cache.py)."""
        self._check_prompt(prompt)
        self.stats = DecodeStats(depth=self.depth, adaptive=self.adaptive, prompt_tokens=len(prompt))
        budget = _Budget(min(max_tokens, self.model.max_context - len(prompt)), set(eos))
        if budget.done:
            return
        # A policy that never drafts (depth 0, or auto where no depth can pay) runs mlx-lm's
        # pipelined AR loop; any policy that may draft runs the batched decoder's step on this
        # one row (a depth-0 step there verifies the pending token alone and keeps the head in step).
        if self.depth != 0:
            yield from self._mtp(prompt, max_tokens, eos, prompt_cache, snapshot_at)
            return
        if prompt_cache is not None:
            prompt_cache.check_model(self.model)
            reused = prompt_cache.prepare(self.model, prompt)
            self.stats.cached_tokens = reused
        else:
            reused = 0
        if self.constraint is not None:  # constraint: every generation starts at the grammar's start
            self.constraint.start()
        self.cache = prompt_cache.cache if prompt_cache is not None else self.model.make_cache()
        consumed = list(prompt)
        self._snapshot_at = tuple(snapshot_at)
        try:
            for step, fed in self._ar(prompt, reused, budget, prompt_cache):
                consumed += fed
                yield step
        finally:
            if prompt_cache is not None:
                prompt_cache.tokens = consumed

    def _prefill(self, prompt: list[int], reused: int, prompt_cache: PromptCache | None, head: bool):
        stops, at_stop = (), None
        if prompt_cache is not None:
            stops, at_stop = prompt_cache.snapshot_stops(len(prompt), reused, self._snapshot_at)
        t0 = time.perf_counter()
        logits, hidden = steps.prefill(self.model, prompt[reused:], self.cache, head=head, stops=stops,
                                       at_stop=at_stop)
        return logits, hidden, t0

    def _mask(self, logits: mx.array) -> mx.array:
        """The target logits with the grammar's mask applied, if a constraint is set."""
        return logits if self.constraint is None else self.constraint.mask(logits)  # constraint: mask p

    # -- AR ---------------------------------------------------------------------------------

    def _ar(self, prompt: list[int], reused: int, budget: _Budget, prompt_cache: PromptCache | None):
        """Plain autoregressive decoding, pipelined like mlx-lm: the next forward is queued
        before the current token is read back. Each yield is (step, tokens the trunk consumed).

        With a prompt cache and a head, the trunk's hiddens are kept for the head's rows, so a
        later MTP call on the same cache finds the head in step with the trunk. They join the
        backlog, which is written to the head's cache every BACKLOG_FLUSH rows: growing one
        backlog by concatenation would copy it whole at every token (O(n^2) for the reply)."""
        model, cache, constraint = self.model, self.cache, self.constraint
        keep_head = prompt_cache is not None and model.has_mtp
        logits, _, t0 = self._prefill(prompt, reused, prompt_cache, head=keep_head)
        lp = self.logprobs.rows(logits)  # raw logits: logprobs are the model's, not the grammar's
        y, _ = sample_logits(self._mask(logits), self.params, self.rng)
        mx.async_eval(y, *lp.arrays)
        first = True
        while True:
            t1 = time.perf_counter()
            if keep_head:
                hidden, post = model.trunk_hidden(y[None], cache)
                next_logits = model.trunk.lm_head(post)[:, -1]
            else:
                next_logits = steps.ar_step(model, cache, y)
            next_lp = self.logprobs.rows(next_logits)
            if constraint is not None:
                # constraint: the next mask needs this token on the host, so sampling waits for
                # it; the forward is queued first and runs while the matcher advances.
                mx.async_eval(next_logits)
                constraint.advance(y.item())
            next_y, _ = sample_logits(self._mask(next_logits), self.params, self.rng)
            mx.async_eval(next_y, *next_lp.arrays)
            token = y.item()
            if keep_head:
                _extend_backlog(model, cache, hidden, token)
                if not cache.backlog_tokens:  # just flushed: write the head's rows while decoding goes on
                    mx.async_eval([a for layer in cache.head for a in (layer.keys, layer.values)], cache.backlog)
            now = time.perf_counter()
            if first:
                self.stats.seconds["prefill"] += now - t0
                first = False
            else:
                self.stats.seconds["verify"] += now - t1
            kept = budget.take([token])
            self._count_step(0, 0, kept)
            yield Emitted(kept, 0, 0, lp.take(kept)), [token]
            if budget.done:
                return
            y, lp = next_y, next_lp

    # -- MTP --------------------------------------------------------------------------------

    def _mtp(self, prompt: list[int], max_tokens: int, eos: Iterable[int], prompt_cache: PromptCache | None,
             snapshot_at: Iterable[int]) -> Iterator[Emitted]:
        """Speculative decoding: the batched decoder (batch.py) with this one row, so one step
        function serves one row and many. The row uses this engine's random stream, policy and
        acceptance rule, so a later call continues them."""
        from mtplx.engine.batch import BatchDecoder, RowRequest  # batch.py builds on this module

        decoder = BatchDecoder(self.model, max_batch=1, prefill_chunk=steps.PREFILL_CHUNK)
        row = decoder.add(RowRequest(
            prompt=prompt, max_tokens=max_tokens, params=self.params, depth=self.policy,
            draft_params=self.draft_params, eos=frozenset(eos), constraint=self.constraint,
            logprobs=self.logprobs.k, prompt_cache=prompt_cache, snapshot_at=tuple(snapshot_at),
            strict_greedy=self.strict_greedy))
        row.rng, row.acceptance_arrays = self.rng, self.acceptance_arrays
        self.stats, self.cache = row.stats, row.cache
        try:
            while not row.done:
                for _, emitted in decoder.step():
                    yield emitted
        finally:
            decoder.remove(row)  # leaves the prompt cache holding what the trunk consumed

    def _count_step(self, drafted: int, accepted: int, kept: list[int]) -> None:
        # A step cut short by the budget or EOS counts only the drafts that reached the output:
        # ``kept`` is the accepted drafts, then the step's own token; a cut inside the drafts
        # leaves only drafts, all accepted.
        self.stats.record_step(drafted, min(accepted, len(kept)), len(kept))


# Rows a run of plain steps leaves in the backlog before they are written to the head's cache:
# feeding them with the next draft is cheaper, but the backlog must not grow without bound.
BACKLOG_FLUSH = 8


def _extend_backlog(model: MTPModel, cache: ModelCache, hidden: mx.array, token: int) -> None:
    """Append one committed position (its head-input hidden; ``token`` is the one it followed)."""
    cache.backlog = mx.concatenate([cache.backlog, hidden], axis=1)
    cache.backlog_tokens = cache.backlog_tokens + [token]
    if cache.backlog.shape[1] > BACKLOG_FLUSH:
        model.fill_head(cache.backlog[:, :-1], mx.array([cache.backlog_tokens]), cache)
        cache.backlog, cache.backlog_tokens = cache.backlog[:, -1:], []
