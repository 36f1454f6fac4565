"""The engine's own step functions, as the shape bench calls them: the one seam to the engine.

`mtplx bench --shape` must time the code the engine runs, not copies of it. The engine is
gathering its steps into ``mtplx/engine/steps.py`` with these signatures::

    prefill(model, tokens, cache, *, head=True) -> (last_logits [1, V], last_hidden [1, 1, H])
    verify(model, cache, block [1, T]) -> (logits [1, T, V], hidden [1, T, H], record)
    draft(model, cache, hidden [1, r, H], tokens [1, r]) -> (logits [1, 1, K], chain [1, 1, H])
    commit(cache, record, accepted) -> None
    ar_step(model, cache, token [1]) -> logits [1, V]
    cache.fork() -> an independent copy

Until that lands, this module maps each of them onto today's engine (``Engine._prefill`` and
``_prefill_trunk_only``, ``Trunk.forward`` with ``BlockStates``, ``MTPModel.draft(last_only=True)``,
``mtplx.engine.cache.commit``); switching to ``steps`` changes this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mtplx.engine.cache import commit as engine_commit
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import BlockStates

# How many accepted-but-unapplied positions the rollback keeps pending before it applies them
# at commit (the engine's cap; the bytes model uses it). Today's engine keeps none: it records
# every position's state instead, which the bytes model reports as the old design.
PENDING_CAP = 16


@dataclass
class Record:
    """What a verify pass leaves for commit: today, the per-position states of the block."""

    states: BlockStates
    tokens: int

    def arrays(self) -> list[mx.array]:
        return [*self.states.recurrent.values(), *self.states.conv_inputs.values()]


def prefill(model: MTPModel, tokens: list[int], cache: ModelCache, *, head: bool = True) -> tuple[mx.array, mx.array | None]:
    """Fill the caches over the prompt (lazy). ``head=False`` is the AR engine's prefill, which
    returns no hidden state."""
    engine = Engine(model, 1 if head else 0, SamplingParams(), seed=0)
    if head:
        return engine._prefill(tokens, cache)
    return engine._prefill_trunk_only(tokens, cache.trunk), None


def verify(model: MTPModel, cache: ModelCache, block: mx.array) -> tuple[mx.array, mx.array, Record]:
    states = BlockStates()
    logits, hidden = model.trunk_forward(block, cache, states)
    return logits, hidden, Record(states, int(block.shape[1]))


def draft(model: MTPModel, cache: ModelCache, hidden: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    return model.draft(hidden, tokens, cache, last_only=True)


def commit(cache: ModelCache, record: Record, accepted: int) -> None:
    """Roll the caches back to the first ``accepted`` drafts of the verified block. The head's
    rows are left alone: the bench's draft steps run on forks."""
    engine_commit(cache, record.states, drafted=record.tokens - 1, accepted=accepted, head_rows_drafted=0)


def ar_step(model: MTPModel, cache: ModelCache, token: mx.array) -> mx.array:
    return model.trunk.logits(token.reshape(1, 1), cache.trunk)[:, -1]


def fork(cache: ModelCache) -> ModelCache:
    """A copy to run one step on and drop; the original is not advanced. KV caches write new
    rows past their own offset into a buffer the original never reads there; recurrent caches
    replace their arrays rather than writing into them."""

    def copy(c: Any) -> Any:
        if isinstance(c, KVCache):
            new = KVCache()
            new.keys, new.values, new.offset = c.keys, c.values, c.offset
            return new
        new = type(c)(len(c.cache))
        new.cache = list(c.cache)
        return new

    return ModelCache(trunk=[copy(c) for c in cache.trunk], head=[copy(c) for c in cache.head])


def cache_arrays(cache: ModelCache) -> list[Any]:
    """Everything a step leaves in the caches, to evaluate with it."""
    return [c.state for c in cache.trunk + cache.head]
