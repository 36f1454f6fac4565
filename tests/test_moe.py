"""qwen3_5_moe: the MoE MTP head is grafted from the official fused-expert layout, stored
int4 (router gates bf16), loaded, and speculates exactly (greedy MTP == greedy AR).

The checkpoint is a small random MoE Qwen3.5 written in the files' real formats: the trunk
as mlx-lm saves it, the head as Hugging Face stores it (mtp.* tensors, fused
experts.gate_up_proj, zero-centered norms)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.qwen3_5 import TextModelArgs
from mlx_lm.models.qwen3_5_moe import Model, ModelArgs
from mlx_lm.utils import quantize_model, save_config, save_model

import mtplx
from mtplx.artifact.graft import graft
from mtplx.artifact.loader import demo_path
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.model.mtp_head import MTPHead

TEXT = {
    "model_type": "qwen3_5_moe_text", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-6, "vocab_size": 4096,
    "max_position_embeddings": 512, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
    "tie_word_embeddings": True, "full_attention_interval": 2, "num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1,
    "norm_topk_prob": True, "mtp_num_hidden_layers": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}
CONFIG = {"model_type": "qwen3_5_moe", "tie_word_embeddings": True, "text_config": TEXT}


def _hf_mtp_tensors(head: MTPHead) -> dict[str, mx.array]:
    """The head's parameters in the official layout."""
    flat = dict(tree_flatten(head.parameters()))
    out = {}
    prefix = "layers.0.mlp.switch_mlp"
    gate, up = flat.pop(f"{prefix}.gate_proj.weight"), flat.pop(f"{prefix}.up_proj.weight")
    out["mtp.layers.0.mlp.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=-2)
    out["mtp.layers.0.mlp.experts.down_proj"] = flat.pop(f"{prefix}.down_proj.weight")
    for name, value in flat.items():
        if "norm" in name.split(".")[-2]:
            value = value.astype(mx.float32) - 1.0  # zero-centered, as HF stores RMSNorm
        out[f"mtp.{name}"] = value
    return {k: v.astype(mx.bfloat16) for k, v in out.items()}


@pytest.fixture(scope="module")
def moe_artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    mx.random.seed(0)
    trunk = Model(ModelArgs.from_dict(json.loads(json.dumps(CONFIG))))
    trunk.set_dtype(mx.bfloat16)
    # 4-bit like every real artifact; MLX's CPU backend also has no bf16 expert matmul
    # (gather_mm), only the quantized one.
    trunk, config = quantize_model(trunk, json.loads(json.dumps(CONFIG)), 64, 4, quant_predicate=trunk.quant_predicate)
    save_model(root / "trunk", trunk)
    save_config(config, root / "trunk" / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path() / f, root / "trunk" / f)

    source = root / "source"
    source.mkdir()
    head = MTPHead(TextModelArgs.from_dict(dict(TEXT)))
    mx.save_safetensors(str(source / "model.safetensors"), _hf_mtp_tensors(head))
    (source / "config.json").write_text(json.dumps(CONFIG))
    graft(source, root / "artifact", trunk=root / "trunk")
    return root / "artifact"


def test_moe_sidecar_storage(moe_artifact):
    c = json.loads((moe_artifact / "mtplx_runtime.json").read_text())
    assert c["architecture"]["model_type"] == "qwen3_5_moe" and c["architecture"]["num_experts"] == 4
    q = c["sidecar"]["quantization"]
    assert "mtp.layers.0.mlp.switch_mlp.gate_proj" in q["quantized"]
    assert "mtp.layers.0.mlp.shared_expert.down_proj" in q["quantized"]
    assert "mtp.layers.0.mlp.gate.weight" in q["unquantized"]
    assert "mtp.layers.0.mlp.shared_expert_gate.weight" in q["unquantized"]


def test_moe_greedy_mtp_equals_ar(moe_artifact):
    model, tok = mtplx.load(str(moe_artifact))
    assert type(model.head.layers[0].mlp).__name__ == "Qwen3NextSparseMoeBlock"
    ids = tok.encode("def add(a, b):\n    return")
    outputs = {}
    for depth in (0, 2):
        engine = Engine(model, depth, SamplingParams(temperature=0.0), seed=0)
        outputs[depth] = [t for step in engine.generate(ids, 24) for t in step.tokens]
    assert outputs[2] == outputs[0]
