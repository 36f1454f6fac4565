"""The AR reference: plain autoregressive decoding of one sequence on mlx-lm's own forward pass,
pipelined as mlx-lm's ``generate_step`` (the next forward is queued before the current token is
read back). Nothing else decodes with it.

It is what the exactness tests hold the decoder (batch.py, and speculative.Engine on top of it)
against: greedy MTP must equal it token for token, and the decoder's plain lane must equal it
for any seed. It shares the decoder's checks and sampler (one definition each), not its
passes: the decoder runs ragged passes (mtplx/model/rows.py) and this loop mlx-lm's
``Model.__call__`` (steps.ar_step), so a difference between the two shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import mlx.core as mx

from mtplx.core import knobs
from mtplx.engine import steps
from mtplx.engine.constraints import Constraint
from mtplx.engine.logprobs import LogprobReader
from mtplx.engine.row import Budget, Emitted, check_prompt
from mtplx.engine.sampling import Rng, SamplingParams, sample_logits
from mtplx.model.mtp_model import MTPModel

__all__ = ["ar_generate"]


def ar_generate(model: MTPModel, prompt: list[int], max_tokens: int, params: SamplingParams, *,
                seed: int | None = None, eos: Iterable[int] = (), constraint: Constraint | None = None,
                logprobs: int | None = None, prefill_chunk: int = knobs.PREFILL_CHUNK,
                kv_bits: int | None = None, kv_group_size: int = 64) -> Iterator[Emitted]:
    """Yield one token per step until ``max_tokens`` are out or an EOS token is emitted, as
    ``Engine(model, 0, params, seed=seed, ...).generate(prompt, max_tokens, eos)`` does: the same
    random stream (the first token from the prompt's last logits, then one draw per token), the
    same grammar mask and logprob rows; ``kv_bits`` stores the attention KV as the decoder's
    rows do (mlx-lm's own QuantizedKVCache and quantized attention)."""
    prompt = check_prompt(model, prompt)
    prefill_chunk = knobs.check("prefill_chunk", prefill_chunk)
    budget = Budget(min(max_tokens, model.max_context - len(prompt)), set(eos))
    if budget.done:
        return
    rng, reader = Rng(seed), LogprobReader(logprobs, model.vocab_size)

    def masked(logits: mx.array) -> mx.array:
        return logits if constraint is None else constraint.mask(logits)  # constraint: mask p

    if constraint is not None:  # constraint: every generation starts at the grammar's start
        constraint.start()
    cache = model.make_cache(*model.trunk.check_kv(kv_bits, kv_group_size))
    logits, _ = steps.prefill(model, prompt, cache, head=False, chunk=prefill_chunk)
    lp = reader.rows(logits)  # raw logits: logprobs are the model's, not the grammar's
    y, _ = sample_logits(masked(logits), params, rng)
    mx.async_eval(y, *lp.arrays)
    while True:
        next_logits = steps.ar_step(model, cache, y)
        next_lp = reader.rows(next_logits)
        if constraint is not None:
            # constraint: the next mask needs this token on the host, so sampling waits for it;
            # the forward is queued first and runs while the matcher advances.
            mx.async_eval(next_logits)
            constraint.advance(y.item())
        next_y, _ = sample_logits(masked(next_logits), params, rng)
        mx.async_eval(next_y, *next_lp.arrays)
        kept = budget.take([y.item()])
        yield Emitted(kept, 0, 0, lp.take(kept))
        if budget.done:
            return
        y, lp = next_y, next_lp
