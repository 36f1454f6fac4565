"""The decode loop: prefill, then AR steps (depth 0) or MTP speculative steps (depth >= 1).

State between MTP steps: the trunk caches hold every committed token but the newest one,
``pending`` (already sampled and emitted, not yet fed to the trunk); the MTP head's cache
holds one row per committed position except the rows in ``head_rows`` (hidden, token pairs
from the last verify), which the next draft feeds in the same call as its first row. One step:

1. draft: head(rows ..., (h_last, pending)) -> q_1, d_1; head((chain hidden, d_1)) -> q_2, d_2 ...
2. verify: one trunk pass over [pending, d_1 .. d_D], recording Gated-DeltaNet states per position
3. accept d_i while u_i < p_i(d_i)/q_i(d_i); then a residual or bonus token (sampling.py);
   its device work (target law, ratios, residual draws) is evaluated with the verify pass,
   so a step synchronizes twice: once for the drafts, once for verify + acceptance
4. commit: trim/restore every cache to the accepted prefix (cache.py)

Rollback uses states recorded during the verify pass rather than a checkpoint + replay: a
replay is one more trunk pass over the accepted tokens on every rejected step, and on MLX's
CPU backend a 4-bit pass over T tokens costs about T decode steps (`mtplx bench` prints that
cost model), so replay would cost up to D extra steps each time a draft is rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import mlx.core as mx

from mtplx.engine.cache import commit
from mtplx.engine.logprobs import LogprobReader, TokenLogprob
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, decide, filtered_probs, sample_logits
from mtplx.engine.stats import DecodeStats
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import BlockStates

PREFILL_CHUNK = 2048


@dataclass
class Emitted:
    """Tokens decided by one step (1 + accepted drafts), and the step's shape. ``logprobs``
    (when the engine was asked for them) is aligned with ``tokens``."""

    tokens: list[int]
    drafted: int
    accepted: int
    logprobs: list[TokenLogprob] | None = None


class Engine:
    """Decodes one sequence at a time with a fixed depth and sampler."""

    def __init__(
        self,
        model: MTPModel,
        depth: int,
        params: SamplingParams,
        draft_params: SamplingParams | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
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
        # logprobs: None = off (no device work), k = the token's log-probability and k alternatives.
        self.logprobs = LogprobReader(logprobs, model.vocab_size)
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

    def generate(self, prompt: list[int], max_tokens: int, eos: Iterable[int] = ()) -> Iterator[Emitted]:
        """Yield tokens step by step until ``max_tokens`` are out or an EOS token is emitted
        (the EOS token is the last one yielded). The total is exactly ``max_tokens`` otherwise."""
        self._check_prompt(prompt)
        self.stats = DecodeStats(depth=self.depth, prompt_tokens=len(prompt))
        eos = set(eos)
        budget = min(max_tokens, self.model.max_context - len(prompt))
        if budget <= 0:
            return
        steps = self._ar(prompt) if self.depth == 0 else self._mtp(prompt)
        emitted = 0
        for step in steps:
            tokens = step.tokens[: budget - emitted]
            for i, t in enumerate(tokens):
                if t in eos:
                    tokens = tokens[: i + 1]
                    break
            emitted += len(tokens)
            self.stats.record_step(step.drafted, min(step.accepted, max(len(tokens) - 1, 0)), len(tokens))
            logprobs = step.logprobs[: len(tokens)] if step.logprobs is not None else None
            yield Emitted(tokens, step.drafted, step.accepted, logprobs)
            if emitted >= budget or (tokens and tokens[-1] in eos):
                return

    # -- AR ---------------------------------------------------------------------------------

    def _ar(self, prompt: list[int]) -> Iterator[Emitted]:
        """Plain autoregressive decoding, pipelined like mlx-lm: the next forward is queued
        before the current token is read back."""
        trunk = self.model.trunk
        cache = trunk.make_cache()
        t0 = time.perf_counter()
        logits = self._prefill_trunk_only(prompt, cache)
        y, _ = sample_logits(logits, self.params, self.rng)
        lp = self.logprobs.rows(logits)
        mx.async_eval(y, *lp.arrays)
        first = True
        while True:
            t1 = time.perf_counter()
            next_logits = trunk.logits(y[None], cache)[:, -1]
            next_y, _ = sample_logits(next_logits, self.params, self.rng)
            next_lp = self.logprobs.rows(next_logits)
            mx.async_eval(next_y, *next_lp.arrays)
            token = y.item()
            now = time.perf_counter()
            if first:
                self.stats.seconds["prefill"] += now - t0
                first = False
            else:
                self.stats.seconds["verify"] += now - t1
            yield Emitted([token], 0, 0, lp.take([token]))
            y, lp = next_y, next_lp

    def _prefill_trunk_only(self, prompt: list[int], cache: list) -> mx.array:
        ids = mx.array(prompt)
        for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, len(prompt) - 1)
            self.model.trunk.logits(ids[None, start:end], cache)
            mx.eval([c.state for c in cache])
        return self.model.trunk.logits(ids[None, -1:], cache)[:, -1]

    # -- MTP --------------------------------------------------------------------------------

    def _prefill(self, prompt: list[int], cache: ModelCache) -> tuple[mx.array, mx.array]:
        """Fill the trunk and the head's cache over the prompt; returns (last logits, last hidden).

        Head row i pairs the trunk hidden at i with prompt token i+1, for every i but the last
        (whose token is the first one sampled)."""
        ids = mx.array(prompt)[None]
        n = len(prompt)
        logits = hidden = None
        for start in range(0, n, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, n)
            logits, hidden = self.model.trunk_forward(ids[:, start:end], cache)
            rows = min(end, n - 1) - start
            if rows > 0:
                self.model.draft(hidden[:, :rows], ids[:, start + 1 : start + 1 + rows], cache)
            mx.eval(logits[:, -1], hidden[:, -1:], [c.state for c in cache.trunk + cache.head])
        return logits[:, -1], hidden[:, -1:]

    def _mtp(self, prompt: list[int]) -> Iterator[Emitted]:
        model, seconds = self.model, self.stats.seconds
        cache = self.cache = model.make_cache()
        t0 = time.perf_counter()
        logits, h_last = self._prefill(prompt, cache)
        y, _ = sample_logits(logits, self.params, self.rng)
        lp = self.logprobs.rows(logits)
        mx.eval(y, *lp.arrays)
        pending = y.item()
        seconds["prefill"] += time.perf_counter() - t0
        yield Emitted([pending], 0, 0, lp.take([pending]))

        head_h, head_t = h_last, mx.array([[pending]])
        while True:
            # 1. draft: the first call also feeds the rows committed by the last verify.
            t1 = time.perf_counter()
            depth = self.depth
            drafts, qs = [], []
            hidden, tokens = head_h, head_t
            for _ in range(depth):
                d_logits, chain = model.draft(hidden, tokens, cache, last_only=True)
                d, q = sample_logits(d_logits[0], self.draft_params, self.rng)
                drafts.append(d)
                qs.append(q)
                hidden, tokens = chain, d[None]
            draft_tokens = mx.concatenate(drafts)
            q = mx.concatenate(qs)
            mx.eval(draft_tokens, q)
            t2 = time.perf_counter()

            # 2. verify, and the acceptance test's device work in the same evaluation
            states = BlockStates()
            block = mx.concatenate([mx.array([pending]), draft_tokens])[None]
            v_logits, v_hidden = model.trunk_forward(block, cache, states)
            p = filtered_probs(v_logits[0], self.params)
            ratio, candidates = self.acceptance_arrays(p, q, draft_tokens, self.rng)
            lp = self.logprobs.rows(v_logits[0])  # row i: the i-th token this step emits
            mx.eval(ratio, candidates, v_hidden, *lp.arrays)
            t3 = time.perf_counter()

            # 3. accept (host side)
            verdict = decide(ratio, candidates, self.rng)
            a = verdict.accepted
            t4 = time.perf_counter()

            # 4. commit
            commit(cache, states, drafted=depth, accepted=a, head_rows_drafted=depth)
            accepted_tokens = draft_tokens[:a].tolist()
            head_h = v_hidden[:, : a + 1]
            head_t = mx.array([accepted_tokens + [verdict.next_token]])
            pending = verdict.next_token
            t5 = time.perf_counter()

            seconds["draft"] += t2 - t1
            seconds["verify"] += t3 - t2
            seconds["sample"] += t4 - t3
            seconds["rollback"] += t5 - t4
            yield Emitted(accepted_tokens + [pending], depth, a, lp.take(accepted_tokens + [pending]))
