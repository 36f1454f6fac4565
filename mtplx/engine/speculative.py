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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import mlx.core as mx

from mtplx.engine import steps
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, decide, filtered_probs, sample_logits
from mtplx.engine.stats import DecodeStats
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel

# Kept for callers that chunk prompts themselves; the engine's own value lives in steps.py.
PREFILL_CHUNK = steps.PREFILL_CHUNK


@dataclass
class Emitted:
    """Tokens decided by one step (1 + accepted drafts), and the step's shape."""

    tokens: list[int]
    drafted: int
    accepted: int


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
    """Decodes one sequence at a time with a fixed depth and sampler."""

    def __init__(
        self,
        model: MTPModel,
        depth: int,
        params: SamplingParams,
        draft_params: SamplingParams | None = None,
        seed: int | None = None,
    ):
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
        self.stats = DecodeStats(depth=depth)
        # The acceptance rule's device side, swappable so tests can prove they detect a biased one.
        self.acceptance_arrays = acceptance_arrays
        # The live caches of the current generation (inspected by the cache-equality tests).
        self.cache: ModelCache | None = None

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise MtplxError("the prompt is empty", fix="pass at least one token")
        limit = self.model.max_context
        if len(prompt) >= limit:
            raise MtplxError(f"the prompt has {len(prompt)} tokens, at or over the model's context of {limit}",
                             fix="shorten the prompt or the chat history")

    def generate(self, prompt: list[int], max_tokens: int, eos: Iterable[int] = (),
                 prompt_cache: PromptCache | None = None, snapshot_at: Iterable[int] = ()) -> Iterator[Emitted]:
        """Yield tokens step by step until ``max_tokens`` are out or an EOS token is emitted
        (the EOS token is the last one yielded). The total is exactly ``max_tokens`` otherwise.

        With ``prompt_cache``, only the part of ``prompt`` it does not already hold is prefilled,
        and afterwards it holds the prompt and the reply (as far as the trunk consumed it);
        ``snapshot_at`` adds prompt positions where it keeps a snapshot (see prompt_cache.py)."""
        self._check_prompt(prompt)
        self.stats = DecodeStats(depth=self.depth, prompt_tokens=len(prompt))
        budget = _Budget(min(max_tokens, self.model.max_context - len(prompt)), set(eos))
        if budget.done:
            return
        if prompt_cache is not None:
            prompt_cache.check_model(self.model)
            reused = prompt_cache.prepare(self.model, prompt)
            self.stats.cached_tokens = reused
        else:
            reused = 0
        self.cache = prompt_cache.cache if prompt_cache is not None else self.model.make_cache()
        run = self._ar if self.depth == 0 else self._mtp
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

    # -- AR ---------------------------------------------------------------------------------

    def _ar(self, prompt: list[int], reused: int, budget: _Budget, prompt_cache: PromptCache | None):
        """Plain autoregressive decoding, pipelined like mlx-lm: the next forward is queued
        before the current token is read back. Each yield is (step, tokens the trunk consumed).

        With a prompt cache and a head, the trunk's hiddens are kept for the head's rows, so a
        later MTP call on the same cache finds the head in step with the trunk."""
        model, cache = self.model, self.cache
        keep_head = prompt_cache is not None and model.has_mtp
        logits, _, t0 = self._prefill(prompt, reused, prompt_cache, head=keep_head)
        y, _ = sample_logits(logits, self.params, self.rng)
        mx.async_eval(y)
        first = True
        while True:
            t1 = time.perf_counter()
            if keep_head:
                hidden, post = model.trunk_hidden(y[None], cache)
                cache.backlog = mx.concatenate([cache.backlog, hidden], axis=1)
                next_logits = model.trunk.lm_head(post)[:, -1]
            else:
                next_logits = steps.ar_step(model, cache, y)
            next_y, _ = sample_logits(next_logits, self.params, self.rng)
            mx.async_eval(next_y)
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
            yield Emitted(kept, 0, 0), [token]
            if budget.done:
                return
            y = next_y

    # -- MTP --------------------------------------------------------------------------------

    def _mtp(self, prompt: list[int], reused: int, budget: _Budget, prompt_cache: PromptCache | None):
        model, cache, seconds = self.model, self.cache, self.stats.seconds
        vocab, subset = model.vocab_size, model.draft_vocab
        logits, _, t0 = self._prefill(prompt, reused, prompt_cache, head=True)
        y, _ = sample_logits(logits, self.params, self.rng)
        pending = y.item()
        seconds["prefill"] += time.perf_counter() - t0
        kept = budget.take([pending])
        self._record(0, 0, kept)
        yield Emitted(kept, 0, 0), []
        if budget.done:
            return

        while True:
            # 1. draft: the first call also feeds the rows committed by the last verify.
            t1 = time.perf_counter()
            depth = self.depth
            drafts, qs = [], []
            hidden, tokens = cache.backlog, mx.array([cache.backlog_tokens + [pending]])
            for _ in range(depth):
                d_logits, chain = steps.draft(model, cache, hidden, tokens)
                d, q = sample_logits(d_logits[0], self.draft_params, self.rng)
                if subset is not None:
                    d, q = subset.token_ids(d), subset.scatter(q, vocab)
                drafts.append(d)
                qs.append(q)
                hidden, tokens = chain, d[None]
            draft_tokens = mx.concatenate(drafts)
            q = mx.concatenate(qs)
            mx.eval(draft_tokens, q)
            t2 = time.perf_counter()

            # 2. verify, and the acceptance test's device work in the same evaluation
            block = mx.concatenate([mx.array([pending]), draft_tokens])[None]
            v_logits, v_hidden, record = steps.verify(model, cache, block)
            p = filtered_probs(v_logits[0], self.params)
            ratio, candidates = self.acceptance_arrays(p, q, draft_tokens, self.rng)
            mx.eval(ratio, candidates, v_hidden)
            t3 = time.perf_counter()

            # 3. accept (host side)
            verdict = decide(ratio, candidates, self.rng)
            a = verdict.accepted
            proposed = draft_tokens[:a].tolist() + [verdict.next_token]
            kept = budget.take(proposed)
            t4 = time.perf_counter()

            # 4. commit: normally the accepted drafts; on the last step, only as far as the
            # output goes, so the caches hold exactly the tokens emitted.
            keep = min(a, len(kept))
            steps.commit(cache, record, accepted=keep)
            cache.backlog, cache.backlog_tokens = v_hidden[:, : keep + 1], proposed[:keep]
            fed = [pending] + proposed[:keep]
            pending = verdict.next_token
            t5 = time.perf_counter()

            seconds["draft"] += t2 - t1
            seconds["verify"] += t3 - t2
            seconds["sample"] += t4 - t3
            seconds["rollback"] += t5 - t4
            self._record(depth, a, kept)
            yield Emitted(kept, depth, a), fed
            if budget.done:
                return

    def _record(self, drafted: int, accepted: int, kept: list[int]) -> None:
        # A step cut short by the budget or EOS counts only the drafts that reached the output.
        self.stats.record_step(drafted, min(accepted, max(len(kept) - 1, 0)), len(kept))
