"""Small random Qwen3.5 models (trunk + MTP head) for statistical tests.

Random weights are enough for exactness: the law of speculative output must equal the trunk's
AR law whatever the head predicts. Embeddings are scaled up so the trunk's and the head's
distributions are far from uniform and differ from each other, which exercises acceptance,
rejection and the residual.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.qwen3_5 import Model, ModelArgs, TextModelArgs

from mtplx.model.mtp_head import MTPHead
from mtplx.model.mtp_model import MTPModel
from mtplx.model.trunk import Trunk


def tiny_text_config(vocab: int = 6, head_dim: int = 16, layers: int = 4) -> dict:
    return {
        "model_type": "qwen3_5_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim, "rms_norm_eps": 1e-6,
        "vocab_size": vocab, "max_position_embeddings": 256, "linear_num_value_heads": 2,
        "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4, "tie_word_embeddings": True, "full_attention_interval": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }


def tiny_model(vocab: int = 6, seed: int = 0, embed_scale: float = 2.5, head_dim: int = 16, layers: int = 4) -> MTPModel:
    """``head_dim`` 32 or more lets the attention KV be quantized (kv_bits: groups of 32 at least).
    ``layers``: every second layer is attention, the others Gated-DeltaNet, so 2 layers still hold
    one of each (the law tests' model: each sampled row costs about half a 4-layer row's time)."""
    mx.random.seed(seed)
    config = tiny_text_config(vocab, head_dim, layers)
    trunk_model = Model(ModelArgs(model_type="qwen3_5", text_config=config))
    head = MTPHead(TextModelArgs.from_dict(config))
    params = dict(tree_flatten(trunk_model.parameters()))
    key = "language_model.model.embed_tokens.weight"
    params[key] = mx.random.normal(params[key].shape) * embed_scale
    trunk_model.update(tree_unflatten(list(params.items())))
    mx.eval(trunk_model.parameters(), head.parameters())
    return MTPModel(Trunk(trunk_model), head, contract=None)
