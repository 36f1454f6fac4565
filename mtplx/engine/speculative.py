"""The decode loop: prefill, then AR steps (depth 0) or MTP speculative steps (depth >= 1).

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
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, decide, filtered_probs, sample_logits
from mtplx.engine.stats import DecodeStats
from mtplx.errors import ContextOverflowError, MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel

# Kept for callers that chunk prompts themselves; the engine's own value lives in steps.py.
PREFILL_CHUNK = steps.PREFILL_CHUNK


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
        if prompt_cache is not None:
            prompt_cache.check_model(self.model)
            reused = prompt_cache.prepare(self.model, prompt)
            self.stats.cached_tokens = reused
        else:
            reused = 0
        if self.constraint is not None:  # constraint: every generation starts at the grammar's start
            self.constraint.start()
        self.cache = prompt_cache.cache if prompt_cache is not None else self.model.make_cache()
        # A policy that never drafts (depth 0, or auto where no depth can pay) runs mlx-lm's
        # pipelined AR loop; any policy that may draft runs MTP steps (a depth-0 step there
        # verifies the pending token alone and keeps the head in step).
        plain = self.depth == 0
        run = self._ar if plain else self._mtp
        consumed = list(prompt)
        self._snapshot_at = tuple(snapshot_at)
        try:
            for step, fed in run(prompt, reused, budget, prompt_cache):
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
        later MTP call on the same cache finds the head in step with the trunk."""
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
                cache.backlog = mx.concatenate([cache.backlog, hidden], axis=1)
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
                cache.backlog_tokens.append(token)
            now = time.perf_counter()
            if first:
                self.stats.seconds["prefill"] += now - t0
                first = False
            else:
                self.stats.seconds["verify"] += now - t1
            kept = budget.take([token])
            self._record(0, 0, kept)
            yield Emitted(kept, 0, 0, lp.take(kept)), [token]
            if budget.done:
                return
            y, lp = next_y, next_lp

    # -- MTP --------------------------------------------------------------------------------

    def _mtp(self, prompt: list[int], reused: int, budget: _Budget, prompt_cache: PromptCache | None):
        model, cache, seconds, constraint = self.model, self.cache, self.stats.seconds, self.constraint
        vocab, subset = model.vocab_size, model.draft_vocab
        logits, _, t0 = self._prefill(prompt, reused, prompt_cache, head=True)
        lp = self.logprobs.rows(logits)
        y, _ = sample_logits(self._mask(logits), self.params, self.rng)
        mx.eval(y, *lp.arrays)
        pending = y.item()
        if constraint is not None:
            constraint.advance(pending)
        seconds["prefill"] += time.perf_counter() - t0
        kept = budget.take([pending])
        self._record(0, 0, kept)
        yield Emitted(kept, 0, 0, lp.take(kept)), []
        if budget.done:
            return

        while True:
            # 1. draft: the first call also feeds the rows committed by the last verify.
            t1 = time.perf_counter()
            depth = self.policy.choose()
            drafts, qs = [], []
            hidden, tokens = cache.backlog, mx.array([cache.backlog_tokens + [pending]])
            for _ in range(depth):
                d_logits, chain = steps.draft(model, cache, hidden, tokens)
                if constraint is not None:  # constraint: mask q with the state after pending, d_1..d_{i-1}
                    d_logits = constraint.mask_draft(d_logits, subset)
                d, q = sample_logits(d_logits[0], self.draft_params, self.rng)
                if subset is not None:
                    d, q = subset.token_ids(d), subset.scatter(q, vocab)
                if constraint is not None:
                    # constraint: the next draft's mask needs this draft (a vocabulary id) on the
                    # host: one sync per draft, paid only when a grammar is set.
                    constraint.advance_draft(d.item())
                drafts.append(d)
                qs.append(q)
                hidden, tokens = chain, d[None]
            if depth:
                draft_tokens, q = mx.concatenate(drafts), mx.concatenate(qs)
                mx.eval(draft_tokens, q)
            else:  # a plain step: nothing drafted; the head's rows wait in the backlog
                draft_tokens, q = mx.zeros((0,), dtype=mx.int32), mx.zeros((0, vocab), dtype=mx.float32)
            t2 = time.perf_counter()

            # 2. verify, and the acceptance test's device work in the same evaluation
            block = mx.concatenate([mx.array([pending]), draft_tokens])[None]
            v_logits, v_hidden, record = steps.verify(model, cache, block)
            lp = self.logprobs.rows(v_logits[0])  # row i: the i-th token this step emits (raw logits)
            if constraint is not None:  # constraint: mask p at each position with the draft's state
                v_logits = constraint.mask_verify(v_logits[0])[None]
            p = filtered_probs(v_logits[0], self.params)
            ratio, candidates = self.acceptance_arrays(p, q, draft_tokens, self.rng)
            mx.eval(ratio, candidates, v_hidden, *lp.arrays)
            t3 = time.perf_counter()

            # 3. accept (host side)
            verdict = decide(ratio, candidates, self.rng)
            a = verdict.accepted
            proposed = draft_tokens[:a].tolist() + [verdict.next_token]
            kept = budget.take(proposed)
            if constraint is not None:  # constraint: roll back to the accepted prefix, advance by the next token
                constraint.commit(a, verdict.next_token)
            t4 = time.perf_counter()

            # 4. commit: normally the accepted drafts; on the last step, only as far as the
            # output goes, so the caches hold exactly the tokens emitted.
            keep = min(a, len(kept))
            steps.commit(cache, record, accepted=keep)
            if depth:
                cache.backlog, cache.backlog_tokens = v_hidden[:, : keep + 1], proposed[:keep]
            else:  # nothing drafted, so the head consumed no rows: this position joins the backlog
                _extend_backlog(model, cache, v_hidden[:, :1], pending)
            fed = [pending] + proposed[:keep]
            pending = verdict.next_token
            t5 = time.perf_counter()

            seconds["draft"] += t2 - t1
            seconds["verify"] += t3 - t2
            seconds["sample"] += t4 - t3
            seconds["rollback"] += t5 - t4
            self._record(depth, a, kept)
            self.policy.observe(depth, a)
            yield Emitted(kept, depth, a, lp.take(kept)), fed
            if budget.done:
                return

    def _record(self, drafted: int, accepted: int, kept: list[int]) -> None:
        # A step cut short by the budget or EOS counts only the drafts that reached the output.
        self.stats.record_step(drafted, min(accepted, max(len(kept) - 1, 0)), len(kept))


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
