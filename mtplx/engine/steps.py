"""Step primitives. The decoder (batch.py) uses :func:`chunks` and :func:`commit`. The others are
the one-row reference primitives: :func:`prefill`, :func:`verify`, :func:`draft` and
:func:`ar_step` (mlx-lm's own forward) run one sequence alone. The AR reference loop
(reference.py), the exactness checks (mtplx/bench/exactness.py) and the bench's component timings
(bench/components.py, engine/cost_model.py) are built from them; the decoder runs the same
layers as ragged passes over its rows (mtplx/model/rows.py), of which a one-row pass is the
one-segment case, so a component timing is a one-row step's piece, not the decoder's own code.
Everything here is lazy except :func:`prefill`: callers evaluate what they need.
"""

from __future__ import annotations

from typing import Callable, Iterable

import mlx.core as mx

from mtplx.core import knobs
from mtplx.engine.cache import commit
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import VerifyRecord

__all__ = ["ar_step", "chunks", "commit", "draft", "prefill", "verify"]


def chunks(n: int, stops: Iterable[int], size: int = knobs.PREFILL_CHUNK) -> list[tuple[int, int]]:
    """[start, end) pieces of range(n) no longer than ``size``, also cut at ``stops`` (prompt-cache
    snapshot positions): a prompt's prefill passes, the decoder's and the reference's."""
    cuts = sorted({s for s in stops if 0 < s < n} | set(range(size, n, size)) | {n})
    return list(zip([0] + cuts[:-1], cuts))


def prefill(
    model: MTPModel,
    tokens: list[int],
    cache: ModelCache,
    *,
    head: bool = True,
    stops: Iterable[int] = (),
    at_stop: Callable[[int], None] | None = None,
    chunk: int = knobs.PREFILL_CHUNK,
) -> tuple[mx.array, mx.array]:
    """Feed ``tokens`` to the trunk (and, with ``head``, the head's KV cache) after whatever the
    cache already holds; returns (logits at the last token [1, V], head-input hidden of the
    last token [1, 1, H]).

    Only the last position is projected onto the vocabulary, and the head only fills its KV
    cache over the rows (no MLP, no lm_head): nothing else of a prompt is ever read. Head rows
    pair the hidden at position i with token i+1, so each chunk's last hidden waits in
    ``cache.backlog`` for the token after it (the next chunk's first, or the sampled one).
    ``at_stop(k)`` runs, with the caches evaluated, after the first ``k`` tokens for every k in
    ``stops`` (prompt-cache snapshots). ``chunk``: prompt tokens per pass."""
    if not tokens:
        raise ValueError("prefill needs at least one token")
    stops = set(stops)
    ids = mx.array(tokens)[None]
    post = None
    base = cache.offset if head else 0
    for start, end in chunks(len(tokens), stops, chunk):
        hidden, post = model.trunk_hidden(ids[:, start:end], cache)
        # A chunk before the head's window makes no head row, so nothing reads its outputs and
        # the trunk's last layer never runs there.
        fill = cache.take_prompt_rows(hidden, tokens[start:end], base + start, base + end, base + len(tokens)) \
            if head else None
        if fill is not None:
            model.fill_head(*fill, cache)
        mx.eval(cache.arrays())  # the backlog among them; the last chunk's logits are computed on return
        if end in stops and at_stop is not None:
            at_stop(end)
    logits = model.trunk.lm_head(post[:, -1:])[:, -1]
    return logits, (cache.backlog if head else hidden[:, -1:])


def verify(model: MTPModel, cache: ModelCache, block: mx.array) -> tuple[mx.array, mx.array, VerifyRecord]:
    """One trunk pass over ``block [1, T]`` (the pending token and the drafts): logits and
    head-input hiddens at every position, and the record a :func:`commit` rolls back with."""
    record = VerifyRecord()
    logits, hidden = model.trunk_forward(block, cache, record)
    return logits, hidden, record


def draft(model: MTPModel, cache: ModelCache, hidden: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    """One draft step: head rows (hidden [1, r, H], tokens [1, r]) -> logits of the last row over
    the draft vocabulary [1, 1, K] and the hidden the next step chains from [1, 1, H]."""
    return model.draft_rows([hidden], [tokens], [cache])


def ar_step(model: MTPModel, cache: ModelCache, token: mx.array) -> mx.array:
    """One plain autoregressive step on ``token [1]`` (mlx-lm's own forward): logits [1, V]."""
    return model.trunk.logits(token[None], cache.trunk)[:, -1]
