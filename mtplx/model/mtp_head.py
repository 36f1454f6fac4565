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
from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs

from mtplx.model import rows


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
        return rows.head_pass(self, embeddings, hidden, [cache], [embeddings.shape[1]])


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
