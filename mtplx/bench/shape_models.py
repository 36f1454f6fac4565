"""Real Qwen3.5 shapes as random-weight models: the subject of `mtplx bench --shape` (the
shape's layer kinds, checks and byte model are ``mtplx.model.shapes``, which the runtime uses too).

A shape is a model's text config (the catalog records one per entry, transcribed from the
official config.json). From it this module builds the trunk with mlx-lm's own qwen3_5 modules
and the MTP head with mtplx's, fills them with random weights (nothing is downloaded), and
stores them the way an artifact holds them:

- trunk: bf16 (A_log kept float32, as mlx-lm's convert casts), or 4/8-bit affine g64 through
  mlx-lm's own ``quantize_model`` with the model's own quantization predicate (MoE router
  gates 8-bit), exactly what ``mtplx graft`` runs through ``mlx_lm.convert``;
- head: body linears int4 g64 with graft's own ``quantize_head`` (fc and norms bf16), then, on
  the CPU, expanded to bf16 as the loader does.

``--layers N`` keeps both layer kinds: with N at least the full-attention interval the kind of
layer i is what the full model gives it; below it the interval becomes N (N-1 Gated-DeltaNet
layers and one full-attention layer), since mlx-lm places kinds by the interval.

:func:`save_artifact` writes the random model as an official-looking Hugging Face checkpoint
(``model.language_model.*`` and ``mtp.*`` tensors, zero-centered norms, PyTorch conv layout)
and runs the product's own :func:`mtplx.artifact.graft.graft` on it, so the result loads with
``mtplx.load`` like any artifact.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mtplx.errors import MtplxError
from mtplx.model.mtp_head import MTPHead, dequantize_linears
from mtplx.model.mtp_model import MTPModel
from mtplx.model.shapes import FULL, LINEAR, WeightBytes, check_text_config, layer_kinds
from mtplx.model.trunk import Trunk

TRUNK_BITS = (4, 8, 16)
# The artifact a saved shape model is meant for is small; a larger one is refused before it is built.
SAVE_LIMIT_BYTES = 4 * 2**30
SAVE_PROBE_TEXT = "def add(a, b):\n    return a + b\n\nThe cache keeps the most recent entries."


@dataclass
class Shape:
    """A named text config (HF field names), and where its numbers came from."""

    name: str
    text_config: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return int(self.text_config.get("num_experts", 0) or 0) > 0

    @property
    def model_type(self) -> str:
        return "qwen3_5_moe" if self.is_moe else "qwen3_5"


def load_shape(ref: str) -> Shape:
    """A catalog id (``qwen3.5-4b``) or a JSON file: a config.json (with ``text_config``) or a
    bare text config."""
    from mtplx.artifact.catalog import catalog

    entries = {m["id"]: m for m in catalog() if "text_config" in m}
    if ref in entries:
        m = entries[ref]
        shape = Shape(ref, copy.deepcopy(m["text_config"]), m.get("text_config_source", {}))
    elif Path(ref).is_file():
        try:
            data = json.loads(Path(ref).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MtplxError(f"cannot read a text config from it ({e})", path=ref,
                             fix="pass a config.json or a JSON object of text_config fields") from None
        text = data.get("text_config", data) if isinstance(data, dict) else None
        if not isinstance(text, dict):
            raise MtplxError("the file is not a JSON object", path=ref, fix="pass a config.json")
        shape = Shape(Path(ref).stem, copy.deepcopy(text), {"from": [str(Path(ref).resolve())]})
    else:
        raise MtplxError(f"'{ref}' is neither a catalog model with a text config nor a file",
                         fix=f"use one of {', '.join(sorted(entries))}, or a path to a config.json")
    check_text_config(shape.text_config, where=ref)
    return shape


def reduced(tc: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """The config with ``layers`` decoder layers of both kinds (``None``: all of them)."""
    full = int(tc["num_hidden_layers"])
    if layers is None or layers >= full:
        return copy.deepcopy(tc)
    if layers < 2:
        raise MtplxError(f"--layers {layers} cannot hold both a Gated-DeltaNet and a full-attention layer",
                         fix="pass --layers 2 or more (a multiple of the full-attention interval, e.g. 4, composes best)")
    out = copy.deepcopy(tc)
    out["num_hidden_layers"] = layers
    out["full_attention_interval"] = min(int(tc["full_attention_interval"]), layers)
    out["layer_types"] = layer_kinds(out)
    return out


def model_args(tc: dict[str, Any]):
    """mlx-lm's TextModelArgs for the config (deep-copied: mlx-lm rewrites rope_parameters in place)."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    return TextModelArgs.from_dict(copy.deepcopy(tc))


# -- building ---------------------------------------------------------------------------------


@dataclass
class RandomModules:
    """The bf16 trunk (mlx-lm's Model) and head with random weights, before quantization."""

    shape: Shape
    text_config: dict[str, Any]
    trunk: nn.Module
    head: MTPHead


def estimated_bytes(tc: dict[str, Any]) -> int:
    """bf16 bytes of trunk + head for the config, from the modules' shapes (nothing is allocated:
    MLX builds the random initial values lazily)."""
    return _bf16_bytes(*_modules(tc))


def _bf16_bytes(*modules: nn.Module) -> int:
    return sum(v.size * 2 for m in modules for _, v in tree_flatten(m.parameters()))


def _modules(tc: dict[str, Any]) -> tuple[nn.Module, MTPHead]:
    from mlx_lm.models import qwen3_5, qwen3_5_moe

    moe = int(tc.get("num_experts", 0) or 0) > 0
    module = qwen3_5_moe if moe else qwen3_5
    trunk = module.Model(module.ModelArgs(model_type="qwen3_5_moe" if moe else "qwen3_5", text_config=copy.deepcopy(tc)))
    head = MTPHead(model_args(tc), num_layers=int(tc.get("mtp_num_hidden_layers", 1)))
    return trunk, head


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bf16_cast(module: nn.Module):
    """bf16 for the floating parameters the module's own predicate casts (A_log stays float32)."""
    cast = getattr(module, "cast_predicate", lambda _: True)

    def to_bf16(path: str, value: mx.array) -> mx.array:
        return value.astype(mx.bfloat16) if cast(path) and mx.issubdtype(value.dtype, mx.floating) else value
    return to_bf16


def random_modules(shape: Shape, layers: int | None, seed: int = 0) -> RandomModules:
    """Trunk and head at the shape (``layers`` of them), random bf16 weights, evaluated."""
    tc = reduced(shape.text_config, layers)
    mx.random.seed(seed)
    trunk, head = _modules(tc)  # lazy: nothing is allocated until the evaluation below
    need = _bf16_bytes(trunk, head)
    free = _available_bytes()
    if free is not None and need > 0.8 * free:
        raise MtplxError(f"a random {shape.name} with {tc['num_hidden_layers']} layers needs about {need / 2**30:.1f} GiB "
                         f"in bf16 and this machine has {free / 2**30:.1f} GiB free",
                         fix="measure fewer layers with --layers N (the cost model composes them to the full depth)")
    # One module at a time, so the float32 initial values never all exist at once.
    trunk.update(tree_map_with_path(_bf16_cast(trunk), trunk.parameters()))
    for part in [trunk.language_model.model.embed_tokens, *trunk.layers, trunk.language_model]:
        mx.eval(part.parameters())
    head.update(tree_map_with_path(_bf16_cast(head), head.parameters()))
    mx.eval(head.parameters())
    return RandomModules(shape, tc, trunk, head)


def _nbytes(module: nn.Module, prefix: str = "") -> int:
    return sum(v.nbytes for k, v in tree_flatten(module.parameters()) if k.startswith(prefix))


def _quantize_as_stored(mods: RandomModules, trunk_bits: int, evaluate: bool = True) -> None:
    """Quantize in place as an artifact holds the weights (see the module docstring); with
    ``evaluate`` False nothing is computed (the sizes of lazy arrays are known from their shapes)."""
    from mlx_lm.utils import quantize_model

    from mtplx.artifact.graft import GROUP_SIZE, quantize_head

    if trunk_bits not in TRUNK_BITS:
        raise MtplxError(f"--trunk-bits {trunk_bits} is not supported", fix="use 4, 8 or 16")
    trunk = mods.trunk
    if trunk_bits < 16:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
            quantize_model(trunk, {}, group_size=GROUP_SIZE, bits=trunk_bits)
        if evaluate:
            for part in [trunk.language_model.model.embed_tokens, *trunk.layers, trunk.language_model]:
                mx.eval(part.parameters())
    quantize_head(mods.head)
    if evaluate:
        mx.eval(mods.head.parameters())


def _stored_sizes(mods: RandomModules) -> WeightBytes:
    text = mods.trunk.language_model
    kinds = layer_kinds(mods.text_config)
    first = {k: kinds.index(k) for k in (LINEAR, FULL)}
    embed = _nbytes(text.model.embed_tokens)
    return WeightBytes(
        embed=embed,
        lm_head=embed if text.args.tie_word_embeddings else _nbytes(text.lm_head),
        final_norm=_nbytes(text.model.norm),
        layers={k: _nbytes(text.model.layers[i]) for k, i in first.items()},
        experts={k: _nbytes(text.model.layers[i], "mlp.switch_mlp.") for k, i in first.items()},
        head=_nbytes(mods.head),
        head_experts=_nbytes(mods.head, "layers.0.mlp.switch_mlp."),
    )


def lazy_modules(shape: Shape) -> RandomModules:
    """The full shape's bf16 trunk and head, nothing computed: enough to count parameters and, with
    :func:`stored_weight_bytes`, stored bytes, at any size (MLX knows a lazy array's size)."""
    trunk, head = _modules(shape.text_config)
    trunk.update(tree_map_with_path(_bf16_cast(trunk), trunk.parameters()))
    head.update(tree_map_with_path(_bf16_cast(head), head.parameters()))
    return RandomModules(shape, copy.deepcopy(shape.text_config), trunk, head)


def stored_weight_bytes(mods: RandomModules, trunk_bits: int) -> WeightBytes:
    """The bytes each part would have in an artifact (quantizes ``mods`` in place, lazily)."""
    _quantize_as_stored(mods, trunk_bits, evaluate=False)
    return _stored_sizes(mods)


def as_artifact(mods: RandomModules, trunk_bits: int) -> tuple[MTPModel, WeightBytes]:
    """Quantize as an artifact holds the weights (see the module docstring) and compose the model
    the engine drives. The modules are changed in place."""
    _quantize_as_stored(mods, trunk_bits)
    sizes = _stored_sizes(mods)
    if mx.default_device() == mx.cpu:
        dequantize_linears(mods.head)  # what the loader does on the CPU (see load_head)
        mx.eval(mods.head.parameters())
    return MTPModel(Trunk(mods.trunk), mods.head, contract=None), sizes


# -- saving as an artifact --------------------------------------------------------------------


def _zero_centered(module: nn.Module) -> set[str]:
    """Parameter names of RMSNorm weights: stored zero-centered (w - 1) in HF checkpoints. The
    Gated-DeltaNet's gated norm is another class and stays absolute, as in the official files."""
    return {f"{path}.weight" if path else "weight" for path, m in module.named_modules() if isinstance(m, nn.RMSNorm)}


def _hf_tensors(mods: RandomModules) -> dict[str, mx.array]:
    """The official checkpoint's names and layouts for the trunk and the head."""
    out: dict[str, mx.array] = {}
    trunk_norms = _zero_centered(mods.trunk)
    for name, value in tree_flatten(mods.trunk.parameters()):
        if name in trunk_norms:
            value = (value.astype(mx.float32) - 1.0).astype(value.dtype)
        if name.endswith("conv1d.weight"):
            value = value.swapaxes(1, 2)  # MLX [C, K, 1] -> PyTorch [C, 1, K]
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith("language_model."):
            name = name[len("language_model."):]
        out[name] = value
    head_norms = _zero_centered(mods.head)
    for name, value in tree_flatten(mods.head.parameters()):
        if name in head_norms:
            value = (value.astype(mx.float32) - 1.0).astype(value.dtype)
        out[f"mtp.{name}"] = value
    return out


def _hf_config(mods: RandomModules) -> dict[str, Any]:
    tc = copy.deepcopy(mods.text_config)
    tc["model_type"] = "qwen3_5_moe_text" if mods.shape.is_moe else "qwen3_5_text"
    tc["dtype"] = "bfloat16"
    tc.setdefault("eos_token_id", 2)  # the demo tokenizer's end of text
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration" if mods.shape.is_moe else "Qwen3_5ForConditionalGeneration"],
            "model_type": mods.shape.model_type, "tie_word_embeddings": tc["tie_word_embeddings"],
            "text_config": tc, "dtype": "bfloat16"}


def save_artifact(mods: RandomModules, out: str | Path, trunk_bits: int, overwrite: bool = False):
    """Write the (bf16, not yet quantized) random modules as an HF checkpoint next to ``out`` and
    graft it into ``out``; returns graft's report. The tokenizer is the demo's (its ids fit any
    vocabulary of 4096 tokens or more)."""
    from mtplx.artifact.graft import graft
    from mtplx.artifact.loader import demo_path

    size = sum(v.nbytes for m in (mods.trunk, mods.head) for _, v in tree_flatten(m.parameters()))
    if size > SAVE_LIMIT_BYTES:
        raise MtplxError(f"--save writes a bf16 checkpoint first and this one would be {size / 2**30:.1f} GiB",
                         fix=f"save a smaller model with --layers (at most {SAVE_LIMIT_BYTES // 2**30} GiB)")
    if mods.text_config["vocab_size"] < 4096:
        raise MtplxError("--save needs a vocabulary of at least 4096 tokens (the demo tokenizer's)",
                         fix="save a shape with a larger vocab_size")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".mtplx-shape-") as tmp:
        source = Path(tmp) / f"random-{mods.shape.name}"
        source.mkdir()
        mx.save_safetensors(str(source / "model.safetensors"), _hf_tensors(mods), metadata={"format": "pt"})
        (source / "config.json").write_text(json.dumps(_hf_config(mods), indent=2) + "\n", encoding="utf-8")
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (demo_path() / f).is_file():
                shutil.copy2(demo_path() / f, source / f)
        layers = mods.text_config["num_hidden_layers"]
        # Random weights make graft's acceptance probe meaningless, and at real widths on the CPU
        # its full-vocabulary passes over the default probe take most of a save: a few words do.
        return graft(source, out, trunk_bits=trunk_bits, overwrite=overwrite, probe_text=SAVE_PROBE_TEXT,
                     name=f"random {mods.shape.name} ({layers} layers, {trunk_bits}-bit trunk)")
