"""The trunk: mlx-lm's Qwen3.5 model, run so that it also returns hidden states.

mlx-lm's forward returns logits for every position. The engine needs more and less than that:
the hidden state at every position (after the final norm or before it, per the contract's
``hidden_source``) for the MTP head; logits only where it samples (every verified position,
but only the last prompt position in a prefill); and, in the verify pass, what a rollback of
the Gated-DeltaNet layers needs (mtplx/model/gated_delta_cache.py). So this module walks
mlx-lm's own layers (same weights, same modules) with those changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import ArraysCache

from mtplx.model.gated_delta_cache import GatedDeltaCache, GatedDeltaRecord, verify_block


@dataclass
class VerifyRecord:
    """What one verify pass over a block of ``tokens`` positions keeps for the rollback:
    a record per Gated-DeltaNet layer, by layer index."""

    tokens: int = 0
    layers: dict[int, GatedDeltaRecord] = field(default_factory=dict)


def materialize(cache: list[Any]) -> None:
    """Apply every pending Gated-DeltaNet prefix, so mlx-lm's own layers can read the cache."""
    for c in cache:
        if isinstance(c, GatedDeltaCache):
            c.materialize()


def cache_arrays(cache: list[Any]) -> list[mx.array]:
    """Every array of a trunk or head cache, for one mx.eval."""
    out = []
    for c in cache:
        if isinstance(c, GatedDeltaCache):
            out += c.arrays()
        elif getattr(c, "keys", None) is not None:
            out += [c.keys, c.values]
    return out


class Trunk:
    """A Qwen3.5 / Qwen3.5-MoE model loaded by mlx-lm, seen as the target of speculation."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.text = model.language_model
        self.body = self.text.model
        self.args = self.text.args

    @property
    def layers(self) -> list[nn.Module]:
        return self.body.layers

    def make_cache(self) -> list[Any]:
        """mlx-lm's caches, with each Gated-DeltaNet one able to hold a pending prefix."""
        return [GatedDeltaCache() if isinstance(c, ArraysCache) else c for c in self.model.make_cache()]

    def embed(self, tokens: mx.array) -> mx.array:
        return self.body.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.body.embed_tokens.as_linear(hidden)
        return self.text.lm_head(hidden)

    def logits(self, tokens: mx.array, cache: list[Any]) -> mx.array:
        """mlx-lm's own forward: the AR path, with nothing extra computed."""
        materialize(cache)
        return self.model(tokens, cache=cache)

    def hidden(
        self, tokens: mx.array, cache: list[Any], record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array]:
        """(hidden before the final norm, hidden after it) for a block ``tokens [1, T]``, no
        logits. With ``record``, the Gated-DeltaNet layers run the verify-block forward and
        leave in it what a rollback needs; without, they run mlx-lm's own forward."""
        if record is None:
            materialize(cache)
        else:
            record.tokens = tokens.shape[1]
        h = self.embed(tokens)
        fa_mask = create_attention_mask(h, cache[self.body.fa_idx])
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if layer.is_linear and record is not None:
                r, record.layers[i] = verify_block(layer.linear_attn, layer.input_layernorm(h), c)
                h = h + r
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = layer(h, mask=None if layer.is_linear else fa_mask, cache=c)
        return h, self.body.norm(h)

    def forward_all(
        self, tokens: mx.array, cache: list[Any], record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(logits at every position, hidden before the final norm, hidden after it)."""
        pre, post = self.hidden(tokens, cache, record)
        return self.lm_head(post), pre, post

    def forward(
        self, tokens: mx.array, cache: list[Any], hidden_source: str = "post_norm", record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array]:
        """Logits at every position and the hidden state the MTP head reads."""
        logits, pre, post = self.forward_all(tokens, cache, record)
        return logits, (post if hidden_source == "post_norm" else pre)
