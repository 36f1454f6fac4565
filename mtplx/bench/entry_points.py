"""The engine's own step functions, as the shape bench calls them: the one seam to the engine.

`mtplx bench --shape` must time the code the engine runs, not copies of it: these are the
primitives of ``mtplx/engine/steps.py`` (prefill, verify, draft, commit, AR step) and
``ModelCache.fork``, with what the bench needs around them (what to evaluate so a call counts
as done, and the rollback's pending cap for the bytes model). A change of the engine's step
signatures is a change to this file only.
"""

from __future__ import annotations

import mlx.core as mx

from mtplx.engine import steps
from mtplx.model.gated_delta_cache import FUSED_PENDING_CAP, pending_cap
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import VerifyRecord

# The rollback's pending cap on a device with a fused Gated-DeltaNet kernel: the bytes model
# describes such a device (on the ops reference the engine applies each accepted prefix at
# commit instead, cap 0, since every position materializes state-sized temporaries anyway).
PENDING_CAP = FUSED_PENDING_CAP


def prefill(model: MTPModel, tokens: list[int], cache: ModelCache, *, head: bool = True) -> tuple[mx.array, mx.array]:
    """Logits at the last prompt token [1, V] and its hidden [1, 1, H] (lazy)."""
    return steps.prefill(model, tokens, cache, head=head)


def verify(model: MTPModel, cache: ModelCache, block: mx.array) -> tuple[mx.array, mx.array, VerifyRecord]:
    return steps.verify(model, cache, block)


def draft(model: MTPModel, cache: ModelCache, hidden: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    return steps.draft(model, cache, hidden, tokens)


def commit(cache: ModelCache, record: VerifyRecord, accepted: int) -> None:
    steps.commit(cache, record, accepted)


def ar_step(model: MTPModel, cache: ModelCache, token: mx.array) -> mx.array:
    return steps.ar_step(model, cache, token.reshape(1))


def fork(cache: ModelCache) -> ModelCache:
    """A copy to run one step on and drop; the original is not advanced meanwhile."""
    return cache.fork()


def cache_arrays(cache: ModelCache) -> list[mx.array]:
    """Everything a step leaves in the caches, to evaluate with it."""
    return cache.arrays()


def record_arrays(record: VerifyRecord) -> list[mx.array]:
    """What a verify pass keeps for its rollback, to evaluate with it."""
    return [a for r in record.layers.values() for a in (r.before, *r.inputs, r.conv_input)]


def backend_pending_cap(key_head_dim: int) -> int:
    """The pending cap the engine uses on this machine's backend."""
    return pending_cap(key_head_dim)
