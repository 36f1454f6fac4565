"""The trunk: mlx-lm's Qwen3.5 model, run so that it also returns hidden states.

mlx-lm's forward returns logits only. The MTP head needs the hidden state at every position
(after the final norm or before it, per the contract's ``hidden_source``) and the verify pass
needs every Gated-DeltaNet layer's state after each position, so this module walks mlx-lm's own
layers (same weights, same modules) with those two additions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import compute_g, normalize_qk

from mtplx.kernels.gated_delta import gated_delta_states


@dataclass
class BlockStates:
    """Per-position Gated-DeltaNet states of one block forward, for rollback.

    ``conv_inputs[i]`` is layer i's conv window over [previous state, block]; the conv state
    after block position j is rows j+1 .. j+K-1 of it. ``recurrent[i][:, j]`` is the
    recurrent state after position j.
    """

    conv_inputs: dict[int, mx.array] = field(default_factory=dict)
    recurrent: dict[int, mx.array] = field(default_factory=dict)
    kernel_size: int = 4

    def restore(self, cache: list[Any], position: int) -> None:
        """Set every Gated-DeltaNet cache to its state right after block ``position``."""
        keep = self.kernel_size - 1
        for i, conv_input in self.conv_inputs.items():
            cache[i][0] = conv_input[:, position + 1 : position + 1 + keep]
            cache[i][1] = self.recurrent[i][:, position]


def _gated_delta_block(layer: nn.Module, x: mx.array, cache: ArraysCache, states: BlockStates, index: int) -> mx.array:
    """mlx-lm's GatedDeltaNet forward for one unpadded sequence, recording per-position states."""
    B, S, _ = x.shape
    qkv = layer.in_proj_qkv(x)
    z = layer.in_proj_z(x).reshape(B, S, layer.num_v_heads, layer.head_v_dim)
    b = layer.in_proj_b(x)
    a = layer.in_proj_a(x)

    conv_state = cache[0]
    if conv_state is None:
        conv_state = mx.zeros((B, layer.conv_kernel_size - 1, layer.conv_dim), dtype=x.dtype)
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    conv_out = nn.silu(layer.conv1d(conv_input))
    q, k, v = mx.split(conv_out, [layer.key_dim, 2 * layer.key_dim], axis=-1)
    q = q.reshape(B, S, layer.num_k_heads, layer.head_k_dim)
    k = k.reshape(B, S, layer.num_k_heads, layer.head_k_dim)
    v = v.reshape(B, S, layer.num_v_heads, layer.head_v_dim)
    q, k = normalize_qk(q, k, inv_scale=layer.head_k_dim**-0.5, eps=1e-6)

    recurrent = cache[1]
    if recurrent is None:
        recurrent = mx.zeros((B, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim), dtype=mx.float32)
    g = compute_g(layer.A_log, a, layer.dt_bias)
    y, all_states = gated_delta_states(q, k, v, g, mx.sigmoid(b), recurrent)

    states.conv_inputs[index] = conv_input
    states.recurrent[index] = all_states
    states.kernel_size = layer.conv_kernel_size
    cache[0] = conv_input[:, -(layer.conv_kernel_size - 1) :]
    cache[1] = all_states[:, -1]

    out = layer.norm(y, z)
    return layer.out_proj(out.reshape(B, S, -1))


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
        return self.model.make_cache()

    def embed(self, tokens: mx.array) -> mx.array:
        return self.body.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.body.embed_tokens.as_linear(hidden)
        return self.text.lm_head(hidden)

    def logits(self, tokens: mx.array, cache: list[Any]) -> mx.array:
        """mlx-lm's own forward: the AR path, with nothing extra computed."""
        return self.model(tokens, cache=cache)

    def forward(
        self,
        tokens: mx.array,
        cache: list[Any],
        hidden_source: str = "post_norm",
        states: BlockStates | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Logits and the hidden state the MTP head reads, for a block ``tokens [1, T]``.

        With ``states``, the Gated-DeltaNet layers record their state after every position.
        """
        logits, pre, post = self.forward_all(tokens, cache, states)
        return logits, (post if hidden_source == "post_norm" else pre)

    def forward_all(
        self, tokens: mx.array, cache: list[Any], states: BlockStates | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(logits, hidden before the final norm, hidden after it)."""
        h = self.embed(tokens)
        fa_mask = create_attention_mask(h, cache[self.body.fa_idx])
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if layer.is_linear:
                if states is None:
                    h = layer(h, mask=None, cache=c)
                    continue
                h = h + _gated_delta_block(layer.linear_attn, layer.input_layernorm(h), c, states, i)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = layer(h, mask=fa_mask, cache=c)
        post = self.body.norm(h)
        return self.lm_head(post), h, post
