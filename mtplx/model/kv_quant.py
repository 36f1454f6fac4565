"""Quantized attention KV (``kv_bits``): the trunk's full-attention caches as mlx-lm's
:class:`~mlx_lm.models.cache.QuantizedKVCache`, whose keys and values are stored as ``bits``-bit
groups of ``group_size`` along the head dimension (mlx-lm's ``scaled_dot_product_attention``
then runs the quantized attention kernel on them).

Exactness is relative to plain AR *with the same kv_bits*: each position's keys and values are
quantized on their own (groups run along the head dimension, never across positions), so a
verify block and an AR step hold the same quantized rows and attend to the same values, and
trimming rejected positions (cache.py) leaves exactly the rows an AR pass over the accepted
tokens writes. Quantization changes the target itself (its logits move by the rounding of K and
V), so kv_bits=8 and kv_bits=None are two different targets, each decoded exactly.

The MTP head's one-layer KV cache stays unquantized: it only drafts (any draft law is exact),
it is one layer against the trunk's many, and keeping it full precision keeps its acceptance.
"""

from __future__ import annotations

import hashlib
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

AnyKV = (KVCache, QuantizedKVCache)


def describe(kv_bits: int | None, kv_group_size: int) -> str:
    return "kv_bits=None" if kv_bits is None else f"kv_bits={kv_bits} (group size {kv_group_size})"


def identity(model_identity: str, kv_bits: int | None, kv_group_size: int) -> str:
    """A cache's identity: the model's, and the KV quantization its rows are stored with (the
    model's own identity when unquantized, so existing files stay valid)."""
    if kv_bits is None:
        return model_identity
    return hashlib.sha256(f"{model_identity}:kv{kv_bits}g{kv_group_size}".encode()).hexdigest()


def make(kv_bits: int | None, kv_group_size: int) -> KVCache | QuantizedKVCache:
    return KVCache() if kv_bits is None else QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)


def is_kv(c: Any) -> bool:
    """An attention KV cache, quantized or not (QuantizedKVCache is no KVCache subclass)."""
    return isinstance(c, AnyKV)


def parts(c: Any) -> list[mx.array]:
    """The arrays of a KV cache's buffers: keys and values, or their (data, scales, biases)."""
    if c.keys is None:
        return []
    if isinstance(c, QuantizedKVCache):
        return [*c.keys, *c.values]
    return [c.keys, c.values]


def nbytes(c: Any) -> int:
    """Bytes of the rows a KV cache holds (its buffers are allocated ahead, in steps)."""
    arrays = parts(c)
    if not arrays:
        return 0
    return sum(a.nbytes for a in arrays) * c.offset // arrays[0].shape[2]


def _map(c: Any, f: Any) -> Any:
    if isinstance(c, QuantizedKVCache):
        return tuple(f(a) for a in c.keys), tuple(f(a) for a in c.values)
    return f(c.keys), f(c.values)


def like(c: Any) -> Any:
    """An empty cache of ``c``'s kind (same bits and group size)."""
    if isinstance(c, QuantizedKVCache):
        return QuantizedKVCache(group_size=c.group_size, bits=c.bits)
    return KVCache()


def fork(c: Any) -> Any:
    """A cache sharing ``c``'s buffers up to its offset (see ModelCache.fork)."""
    other = like(c)
    other.keys, other.values, other.offset = c.keys, c.values, c.offset
    return other


def rows(c: Any, n: int) -> Any:
    """A cache owning its own copy of ``c``'s first ``n`` rows."""
    out = like(c)
    if c.keys is not None and n:
        out.keys, out.values = _map(c, lambda a: mx.contiguous(a[..., :n, :]))
        out.offset = n
    return out


def committed(c: Any) -> dict[str, mx.array]:
    """The rows up to the offset by name (``keys``, ``values``; quantized: ``keys.scales`` ...),
    as the file format and the cache comparisons name them."""
    if c.keys is None or not c.offset:
        return {}
    if isinstance(c, QuantizedKVCache):
        out = {}
        for side, arrays in (("keys", c.keys), ("values", c.values)):
            for suffix, a in zip(("", ".scales", ".biases"), arrays):
                out[side + suffix] = a[..., : c.offset, :]
        return out
    return {"keys": c.keys[..., : c.offset, :], "values": c.values[..., : c.offset, :]}


def from_committed(arrays: dict[str, mx.array], prefix: str, kv_bits: int | None, kv_group_size: int) -> Any:
    """The cache :func:`committed` named under ``prefix`` (the inverse, for a file's arrays)."""
    c = make(kv_bits, kv_group_size)
    if f"{prefix}.keys" not in arrays:
        return c
    if kv_bits is None:
        c.keys, c.values = arrays[f"{prefix}.keys"], arrays[f"{prefix}.values"]
    else:
        c.keys, c.values = (tuple(arrays[f"{prefix}.{side}{s}"] for s in ("", ".scales", ".biases"))
                            for side in ("keys", "values"))
    c.offset = arrays[f"{prefix}.keys"].shape[2]
    return c
