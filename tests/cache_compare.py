"""The reference for cache-equality tests: the caches an AR pass leaves, one token at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mtplx.engine.cache import snapshot

ATOL = 2e-5  # float32 random models: blocks vs single tokens agree to rounding, not bit for bit


@dataclass
class ArReference:
    """The caches after feeding ``tokens`` one at a time, and the head rows from the per-token
    hiddens from position ``head_start`` on (a cold prefill's head window: the head's first row at
    rotary position 0); ``kv_bits``: the attention KV quantized, as the cache under test holds it.

    :meth:`extend` feeds only the tokens past the last call's, so a test that compares after
    every step feeds each token once instead of the whole sequence at every step (the trunk
    still takes them one at a time; a head row's KV depends on its own hidden and token only, so
    rows drafted a few at a time are the rows drafted at once)."""

    model: Any
    kv_bits: int | None
    kv_group_size: int
    head_start: int
    tokens: list[int] = field(default_factory=list)
    hiddens: list[mx.array] = field(default_factory=list)
    cache: Any = field(init=False)

    def __post_init__(self) -> None:
        self.cache = self.model.make_cache(self.kv_bits, self.kv_group_size)

    def continues(self, model: Any, kv: tuple, head_start: int, tokens: list[int]) -> bool:
        return (model is self.model and kv == (self.kv_bits, self.kv_group_size) and head_start == self.head_start
                and tokens[: len(self.tokens)] == self.tokens)

    def extend(self, tokens: list[int]) -> Any:
        """The reference over ``tokens`` (which continue :attr:`tokens`), as a fork: the caller's
        snapshot applies pending prefixes on the fork, never on the reference itself."""
        for t in tokens[len(self.tokens):]:
            _, h = self.model.trunk_forward(mx.array([[t]]), self.cache)
            self.hiddens.append(h)
        start, end = max(self.head_start, len(self.tokens) - 1), len(tokens) - 1  # head rows not yet drafted
        if end > start:
            self.model.draft(mx.concatenate(self.hiddens[start:end], axis=1), mx.array([tokens[start + 1: end + 1]]),
                             self.cache)
        self.tokens = list(tokens)
        ref = self.cache.fork()
        ref.head_start = self.head_start
        return ref


_last: ArReference | None = None  # holds its model, so an id is never reused under it


def ar_reference(model, tokens: list[int], kv_bits: int | None = None, kv_group_size: int = 64,
                 head_start: int = 0):
    """Caches after feeding ``tokens`` one at a time (see :class:`ArReference`), continuing the
    last call's reference where ``tokens`` continue its tokens on the same model and settings."""
    global _last
    if _last is None or not _last.continues(model, (kv_bits, kv_group_size), head_start, tokens):
        _last = ArReference(model, kv_bits, kv_group_size, head_start)
    return _last.extend(tokens)


def compare(model, cache, committed: list[int], atol: float = ATOL) -> float:
    """Assert ``cache`` holds what an AR pass over ``committed`` leaves; returns the worst gap.
    Head rows for positions after the last verify wait in the backlog: compare the rows the
    head holds. ``cache`` is forked first: applying pending prefixes must not change a run."""
    got = snapshot(cache.fork())
    kv = next(((c.bits, c.group_size) for c in cache.trunk if hasattr(c, "bits")), (None, 64))
    want = snapshot(ar_reference(model, committed, *kv, head_start=cache.head_start))
    assert set(got) == set(want) or all(k.startswith("head") for k in set(want) ^ set(got))
    worst = 0.0
    for name, value in got.items():
        ref = want[name]
        if name.startswith("head"):
            ref = ref[..., : value.shape[-2], :]
        assert value.shape == ref.shape, name
        diff = float(mx.max(mx.abs(value.astype(mx.float32) - ref.astype(mx.float32))).item())
        worst = max(worst, diff)
        assert diff < atol, f"{name} differs by {diff}"
    return worst
