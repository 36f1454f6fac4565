"""Gated-DeltaNet caches that roll back without storing a state per verified position.

A verify pass feeds a block of T tokens through every Gated-DeltaNet layer. If only the first
``keep`` positions are accepted, the layer's state must be the one after position ``keep - 1``.
Storing the state after every position makes that an index, but on a memory-bound GPU it writes
a full recurrent state (Hv x Dv x Dk fp32: 2 MB per layer at Qwen3.5-4B) per verified position.

Instead the verify pass keeps what it already has: the state *before* the block (an existing
array: holding it copies nothing) and the recurrence inputs of the block (q, k, v, g, beta:
~33 KB per layer per position at 4B). On a partial acceptance the state goes back to the one
before the block and the accepted positions' inputs become the cache's ``pending`` prefix; the
next verify runs the recurrence over [pending, next block] in one call, discarding the pending
positions' outputs. No extra pass over the state is made.

The pending prefix is applied eagerly (one state-only recurrence call) once it would grow past
:func:`pending_cap` positions. With a fused kernel (Metal) that cap is 16: re-running a few
pending positions inside the kernel is nearly free, while applying them costs one more read and
write of the state. With the ops reference (CPU, CUDA) every position already materializes
state-sized temporaries, so re-running pending positions at every verify would cost more than
applying them once: the cap is 0 and a partial acceptance applies its prefix at commit.

Conv states are never deferred: the state after any block position is a slice of rows of the
conv window the verify pass computed anyway.

The forward that fills these caches (and a verify block's record) is
mtplx/model/rows.py ``gated_delta_net``, run over one row or several.

Anything that runs mlx-lm's own layer forward on these caches (the AR path, a prompt-cache
prefill) first calls :meth:`GatedDeltaCache.materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from mtplx.kernels.gated_delta import fused, gated_delta

FUSED_PENDING_CAP = 16

# The recurrence inputs of a run of positions: q, k [1, P, Hk, Dk] (normalized, q scaled),
# v [1, P, Hv, Dv], g and beta [1, P, Hv].
Inputs = tuple[mx.array, mx.array, mx.array, mx.array, mx.array]


def pending_cap(key_dim: int) -> int:
    return FUSED_PENDING_CAP if fused(key_dim) else 0


class GatedDeltaCache(ArraysCache):
    """mlx-lm's two-slot cache (conv state, recurrent state) plus the pending prefix: recurrence
    inputs of accepted positions not yet applied to the recurrent state."""

    def __init__(self) -> None:
        super().__init__(size=2)
        self.pending: Inputs | None = None

    @property
    def pending_len(self) -> int:
        return 0 if self.pending is None else int(self.pending[0].shape[1])

    def materialize(self) -> None:
        """Apply the pending prefix to the recurrent state."""
        if self.pending is None:
            return
        _, self[1] = gated_delta(*self.pending, self[1])
        self.pending = None

    def arrays(self) -> list[mx.array]:
        """Every array this cache holds (for mx.eval and byte counts)."""
        return [a for a in (*self.cache, *(self.pending or ())) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def fork(self) -> "GatedDeltaCache":
        other = GatedDeltaCache()
        other.cache = list(self.cache)
        other.pending = self.pending
        return other


@dataclass
class GatedDeltaRecord:
    """What one layer's verify pass keeps for a rollback."""

    before: mx.array  # recurrent state before the call (pending prefix not yet applied)
    inputs: Inputs  # recurrence inputs of [pending, block]
    pending_len: int
    conv_input: mx.array  # [1, K-1+T, C]: the conv state before the block, then the block
    kernel_size: int

    def rollback(self, cache: GatedDeltaCache, keep: int) -> None:
        """Leave ``cache`` as it would be after only the first ``keep`` block positions (0: as
        before the block)."""
        block = self.conv_input.shape[1] - (self.kernel_size - 1)
        if keep == block:
            return  # the verify pass already left the state after the whole block
        cache[0] = self.conv_input[:, keep : keep + self.kernel_size - 1]
        cache[1] = self.before
        # keep = 0 (strict greedy drops the whole block): only the prefix pending before it, if any.
        cache.pending = tuple(x[:, : self.pending_len + keep] for x in self.inputs) if self.pending_len + keep else None
        if cache.pending_len > pending_cap(self.inputs[1].shape[-1]):
            cache.materialize()
