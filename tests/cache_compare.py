"""The reference for cache-equality tests: the caches an AR pass leaves, one token at a time."""

from __future__ import annotations

import mlx.core as mx

from mtplx.engine.cache import snapshot

ATOL = 2e-5  # float32 random models: blocks vs single tokens agree to rounding, not bit for bit


def ar_reference(model, tokens: list[int], kv_bits: int | None = None, kv_group_size: int = 64,
                 head_start: int = 0):
    """Caches after feeding ``tokens`` one at a time; head rows from the per-token hiddens
    (``kv_bits``: the attention KV quantized, as the cache under test holds it), from position
    ``head_start`` on (a cold prefill's head window: the head's first row at rotary position 0)."""
    ref = model.make_cache(kv_bits, kv_group_size)
    hiddens = []
    for t in tokens:
        _, h = model.trunk_forward(mx.array([[t]]), ref)
        hiddens.append(h)
    hidden = mx.concatenate(hiddens, axis=1)
    ids = mx.array([tokens])
    model.draft(hidden[:, head_start:-1], ids[:, head_start + 1 :], ref)
    ref.head_start = head_start
    return ref


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
