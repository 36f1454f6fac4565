"""The Qwen3.5 Multi-Token-Prediction head.

::

    e = pre_fc_norm_embedding(embed(token[t+1]))      shared embed_tokens of the trunk
    h = pre_fc_norm_hidden(trunk_hidden[t])
    x = fc(concat([e, h]))                             2H -> H, embedding first
    x = layers[0](x)                                   one full-attention block (dense or MoE),
                                                       with its own KV cache
    out = norm(x)                                      then the trunk's lm_head

The block is mlx-lm's own Qwen3.5 decoder layer, built as a full-attention layer, so the MoE
variant of qwen3_5_moe comes with it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs


class MTPHead(nn.Module):
    def __init__(self, args: TextModelArgs, num_layers: int = 1, concat_order: str = "embedding_hidden"):
        super().__init__()
        hidden = args.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        # layer_idx = interval - 1 makes mlx-lm build a full-attention block.
        self.layers = [DecoderLayer(args, layer_idx=args.full_attention_interval - 1) for _ in range(num_layers)]
        self.norm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self._embedding_first = concat_order == "embedding_hidden"

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: list[Any] | None = None) -> tuple[mx.array, mx.array]:
        """Rows ``[1, T, H]`` of (embedding of token t+1, trunk hidden at t) -> (normed, pre-norm) output."""
        e = self.pre_fc_norm_embedding(embeddings)
        h = self.pre_fc_norm_hidden(hidden)
        x = self.fc(mx.concatenate([e, h] if self._embedding_first else [h, e], axis=-1))
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask=mask, cache=c)
        return self.norm(x), x

    def fill_cache(self, embeddings: mx.array, hidden: mx.array, cache: list[Any]) -> None:
        """Append rows to the head's KV cache without computing their outputs.

        Prompt rows are only ever attended to, never drafted from, so for the last layer only
        its keys and values are needed: no queries, attention, MLP, final norm or lm_head (the
        MLP alone is most of a block). Earlier layers, if a head had several, run in full since
        the next one reads their output. The cache ends exactly as :meth:`__call__` leaves it."""
        e = self.pre_fc_norm_embedding(embeddings)
        h = self.pre_fc_norm_hidden(hidden)
        x = self.fc(mx.concatenate([e, h] if self._embedding_first else [h, e], axis=-1))
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers[:-1], cache):
            x = layer(x, mask=mask, cache=c)
        # mlx-lm's Qwen3-Next attention, up to the cache update.
        attn, c = self.layers[-1].self_attn, cache[len(self.layers) - 1]
        a = self.layers[-1].input_layernorm(x)
        B, L, _ = a.shape
        keys = attn.k_norm(attn.k_proj(a).reshape(B, L, attn.num_key_value_heads, -1)).transpose(0, 2, 1, 3)
        values = attn.v_proj(a).reshape(B, L, attn.num_key_value_heads, -1).transpose(0, 2, 1, 3)
        c.update_and_fetch(attn.rope(keys, offset=c.offset), values)


def body_linear_predicate(path: str, module: nn.Module) -> bool:
    """The head's body linears stored int4: attention and MLP projections of ``layers.*``.

    ``fc``, the norms and the MoE router gates stay bf16.
    """
    if not path.startswith("layers.") or not hasattr(module, "to_quantized"):
        return False
    leaf = path.rsplit(".", 1)[-1]
    return leaf not in ("gate", "shared_expert_gate") and not isinstance(module, nn.RMSNorm)


def dequantize_linears(module: nn.Module) -> int:
    """Replace int4 linears by bf16 ones holding the same dequantized weights; returns how many.

    MLX's CPU backend runs quantized matmuls compute-bound, several times slower than bf16,
    while GPUs run them memory-bound and faster. The head is small, so on the CPU it is
    expanded once at load. Exactness does not depend on it: the draft law q is whatever the
    head computes, and the same q enters the acceptance test. MoE experts stay quantized:
    the CPU backend has a quantized expert matmul (gather_qmm) but no bf16 one.
    """
    from mlx.utils import tree_unflatten

    replaced = []
    for path, child in module.named_modules():
        if isinstance(child, nn.QuantizedLinear):
            w = mx.dequantize(child.weight, child.scales, child.biases, group_size=child.group_size, bits=child.bits)
            has_bias = "bias" in child
            new = nn.Linear(w.shape[-1], w.shape[0], bias=has_bias)
            new.weight = w
            if has_bias:
                new.bias = child.bias
            replaced.append((path, new))
    if replaced:
        module.update_modules(tree_unflatten(replaced))
    return len(replaced)
