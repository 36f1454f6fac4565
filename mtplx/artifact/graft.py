"""Build an mtplx artifact from an official Hugging Face checkpoint.

source (HF layout, bf16, zero-centered norms, ``mtp.*`` tensors)
  -> trunk: mlx-lm's own conversion (4-bit affine g64 by default, 8-bit, or bf16)
  -> sidecar ``mtp/weights.safetensors``: every ``mtp.*`` tensor, norms shifted to absolute
     exactly once (in float32), body linears int4 affine g64, ``fc`` and norms bf16
  -> ``mtplx_runtime.json``: conventions measured on a probe text, hashes, defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mtplx.core import knobs
from mtplx._version import __version__
from mtplx.artifact import contract as contract_io
from mtplx.artifact.sidecar import DRAFT_VOCAB_TENSOR, check_finite, check_head_shapes, load_head
from mtplx.artifact import hub
from mtplx.artifact.hub import RepoRef
from mtplx.artifact.paths import cache_root
from mtplx.artifact.progress import Progress
from mtplx.artifact.tensors import checkpoint_digest, sha256_file, trunk_dependency_hashes, weight_files
from mtplx.artifact.vocab import choose_draft_vocab, subset_size
from mtplx.artifact.catalog import check_model_type
from mtplx.errors import ArtifactError, MtplxError, UnsupportedModelError
from mtplx.model.mtp_head import MTPHead, body_linear_predicate

GROUP_SIZE = 64
HEAD_BITS = 4


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict[str, Any]
    text_config: dict[str, Any]
    mtp_files: dict[str, Path]

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def read_source(path: str | Path) -> SourceCheckpoint:
    """Check that ``path`` is a Qwen3.5/3.6 HF checkpoint with an MTP head."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError("no config.json: this is not a Hugging Face checkpoint directory", path=path,
                                    fix="pass the directory of the original checkpoint (e.g. a snapshot of Qwen/Qwen3.5-4B)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    check_model_type(model_type, config_path)
    text_config = config.get("text_config", config)
    files = weight_files(path)
    mtp_files = {name: f for name, f in files.items() if name.startswith("mtp.")}
    if not mtp_files:
        raise UnsupportedModelError("the checkpoint has no MTP head (no mtp.* tensors)", path=path,
                                    fix="use the original Hugging Face checkpoint; MLX conversions and most quantized "
                                        "re-uploads drop the mtp.* tensors")
    return SourceCheckpoint(path=path, config=config, text_config=text_config, mtp_files=mtp_files)


def text_args(text_config: dict[str, Any]):
    from mlx_lm.models.qwen3_5 import TextModelArgs

    return TextModelArgs.from_dict(dict(text_config))


def _is_norm(name: str) -> bool:
    """RMSNorm weights: the module's own name contains 'norm' (pre_fc_norm_hidden, q_norm, ...).
    The head has no Gated-DeltaNet layer, whose gated norm is not zero-centered."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and "norm" in parts[-2] and "linear_attn" not in name


def extract_mtp_weights(source: SourceCheckpoint) -> dict[str, mx.array]:
    """The head's tensors under MTPHead's names, with zero-centered norms shifted to absolute.

    The shift is done in float32 and cast back once: adding 1 in bf16 would round away the
    low bits of every norm weight.
    """
    raw: dict[str, mx.array] = {}
    for file in sorted(set(source.mtp_files.values())):
        for name, value in mx.load(str(file)).items():
            if name.startswith("mtp."):
                raw[name[len("mtp."):]] = value
    weights: dict[str, mx.array] = {}
    for name, value in raw.items():
        if _is_norm(name):
            value = (value.astype(mx.float32) + 1.0).astype(mx.bfloat16)
        weights[name] = value
    return _stack_experts(weights)


def _stack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """MoE heads: HF stores experts fused (experts.gate_up_proj) or one by one; mlx-lm's
    SwitchGLU wants stacked gate/up/down projections."""
    out = dict(weights)
    prefixes = {n.split(".experts.")[0] for n in weights if ".experts." in n}
    for prefix in prefixes:
        fused = out.pop(f"{prefix}.experts.gate_up_proj", None)
        if fused is not None:
            mid = fused.shape[-2] // 2
            out[f"{prefix}.switch_mlp.gate_proj.weight"] = fused[..., :mid, :]
            out[f"{prefix}.switch_mlp.up_proj.weight"] = fused[..., mid:, :]
            out[f"{prefix}.switch_mlp.down_proj.weight"] = out.pop(f"{prefix}.experts.down_proj")
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys = sorted((n for n in out if n.startswith(f"{prefix}.experts.") and n.endswith(f".{proj}.weight")),
                          key=lambda n: int(n.split(".experts.")[1].split(".")[0]))
            out[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack([out.pop(k) for k in keys])
    return out


def quantize_head(head: MTPHead, bits: int = HEAD_BITS, group_size: int = GROUP_SIZE) -> list[str]:
    """Quantize the body linears in place; returns their module paths."""
    quantized: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if body_linear_predicate(path, module):
            quantized.append(path)
            return True
        return False

    nn.quantize(head, group_size=group_size, bits=bits, class_predicate=predicate)
    return sorted(quantized)


def build_sidecar(source: SourceCheckpoint, out_file: Path, quantize: bool = True,
                  draft_vocab_ids: list[int] | None = None) -> dict[str, Any]:
    """Write the sidecar; returns the contract's ``sidecar.quantization`` section. A reduced
    draft vocabulary is stored beside the weights (int32, so sidecar_sha256 covers it)."""
    args = text_args(source.text_config)
    head = MTPHead(args, num_layers=int(source.text_config.get("mtp_num_hidden_layers", 1)))
    weights = extract_mtp_weights(source)
    check_head_shapes(head, weights, source.path)
    check_finite(weights, next(iter(source.mtp_files.values())),
                 fix="the checkpoint's MTP head is damaged: download the original checkpoint again")
    head.load_weights(list(weights.items()), strict=True)
    quantized = quantize_head(head) if quantize else []
    flat = {f"mtp.{k}": v for k, v in tree_flatten(head.parameters())}
    quantized_tensors = {f"mtp.{m}.{s}" for m in quantized for s in ("weight", "scales", "biases")}
    unquantized = sorted(n for n in flat if n not in quantized_tensors)
    if draft_vocab_ids is not None:
        flat[DRAFT_VOCAB_TENSOR] = mx.array(draft_vocab_ids, dtype=mx.int32)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_file), flat, metadata={"format": "mlx", "producer": f"mtplx {__version__}"})
    return {
        "scheme": "body-int4" if quantize else "bf16",
        "mode": "affine" if quantize else "none",
        "bits": HEAD_BITS if quantize else 16,
        "group_size": GROUP_SIZE,
        "quantized": [f"mtp.{m}" for m in quantized],
        "unquantized": unquantized,
    }


def convert_trunk(source: Path, out: Path, bits: int) -> dict[str, Any]:
    """mlx-lm's own conversion; returns the contract's ``trunk.quantization``."""
    from mlx_lm import convert

    if bits not in (4, 8, 16):
        raise ArtifactError(f"trunk bits {bits} is not supported", fix="use --trunk-bits 4, 8 or 16")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / "trunk"
        convert(str(source), mlx_path=str(target), quantize=bits < 16, q_bits=bits if bits < 16 else 4,
                q_group_size=GROUP_SIZE, dtype="bfloat16")
        for f in target.iterdir():
            shutil.move(str(f), out / f.name)
    return contract_io.quantization_of_trunk(out)


def copy_trunk(trunk: Path, source: SourceCheckpoint, out: Path) -> dict[str, Any]:
    config_path = trunk / "config.json"
    if not config_path.is_file():
        raise ArtifactError("no config.json in the trunk directory", path=trunk, fix="pass an MLX trunk converted with mlx-lm")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    tc = config.get("text_config", config)
    for key in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads"):
        if tc.get(key) != source.text_config.get(key):
            raise ArtifactError(f"the trunk's {key}={tc.get(key)} does not match the source's {source.text_config.get(key)}",
                                path=config_path, fix="pass the MLX conversion of this same checkpoint")
    for f in trunk.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return contract_io.quantization_of_trunk(out)


@dataclass
class GraftReport:
    artifact: Path
    contract: dict[str, Any]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "seconds": round(self.seconds, 2), "sizes_bytes": self.sizes,
                "tensors": self.tensors, "contract": self.contract}


def open_source(source: str | Path, *, whole: bool, cache: Path, progress: Progress,
                head_plan: hub.HeadPlan | None = None) -> tuple[SourceCheckpoint, dict]:
    """A local checkpoint, or a repo id: only its MTP tensors by byte range (``head_plan``: as
    already planned), or the whole checkpoint when ``whole`` (the trunk is converted from it)."""
    path = Path(source).expanduser()
    ref = None if path.exists() else RepoRef.parse(str(source))
    if ref is None:
        if not path.exists():
            raise MtplxError(f"'{source}' is neither an existing directory nor a Hugging Face repo id (org/name[@revision])",
                             fix="check the path, or pass the original checkpoint's repo id (e.g. Qwen/Qwen3.5-4B)")
        return read_source(path), _source_provenance(path)
    if whole:
        progress.phase(f"Downloading the whole of {ref} (the trunk is converted from it; pass --trunk to fetch only "
                       "the MTP head) ...")
        snapshot = hub.snapshot(ref, hub.MODEL_FILES, progress)
        return read_source(snapshot), _source_provenance(snapshot)
    head = hub.fetch_head_source(ref, cache, progress, plan=head_plan)
    return read_source(head.path), head.provenance


def open_trunk(trunk: str | Path, progress: Progress) -> tuple[Path, dict[str, Any]]:
    path = Path(trunk).expanduser()
    ref = None if path.exists() else RepoRef.parse(str(trunk))
    if ref is None:
        if not path.is_dir():
            raise MtplxError(f"'{trunk}' is neither an existing directory nor a Hugging Face repo id (org/name[@revision])",
                             fix="pass an MLX conversion of the same checkpoint (e.g. mlx-community/Qwen3.5-4B-4bit)")
        return path, {"kind": "local", "name": path.resolve().name}
    progress.phase(f"Downloading the MLX trunk {ref} (Hugging Face cache, shared with mlx-lm) ...")
    snapshot = hub.snapshot(ref, hub.MODEL_FILES, progress)
    return snapshot, {"kind": "huggingface", "repo_id": ref.repo_id, "revision": snapshot.name}


def graft(
    source: str | Path,
    out: str | Path,
    trunk: str | Path | None = None,
    trunk_bits: int = 4,
    probe_text: str | None = None,
    hidden_source: str | None = None,
    depth: int = knobs.CONTRACT_DEPTH,
    name: str | None = None,
    overwrite: bool = False,
    draft_vocab: int | None = None,
    vocab_text: str | None = None,
    progress: Progress | None = None,
    cache: Path | None = None,
    head_plan: hub.HeadPlan | None = None,
) -> GraftReport:
    """Build an artifact in a temporary directory beside ``out`` and move it into place whole,
    so a failure (a dropped download, Ctrl-C) never leaves a half-built artifact behind.

    ``source`` and ``trunk`` are directories or Hugging Face repo ids (``org/name[@revision]``).
    ``draft_vocab``: K ids for a reduced draft head (``None``: 32768 where the vocabulary is
    larger, else the full head; 0: the full head), ranked by frequency on ``vocab_text`` if given.
    ``head_plan``: the source's head as already planned (mtplx.artifact.store), not read again.
    """
    progress = progress or Progress.silent()
    started = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ArtifactError("the output directory is not empty", path=out, fix="choose a new --out or pass --overwrite")
    src, source_provenance = open_source(source, whole=trunk is None, cache=cache or cache_root(), progress=progress,
                                         head_plan=head_plan)
    trunk_dir, trunk_provenance = open_trunk(trunk, progress) if trunk is not None else (None, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    build.chmod(0o755)  # mkdtemp's 0700 would stay on the finished artifact
    try:
        data = _build(src, build, trunk_dir, trunk_bits, progress, probe_text, hidden_source, depth, draft_vocab, vocab_text)
        data["name"] = name or out.name
        data["provenance"]["source"] = source_provenance
        if trunk_provenance:
            data["provenance"]["trunk"] = trunk_provenance
        contract_io.write(data, build)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    progress.phase(f"Artifact written to {out}")
    report = GraftReport(artifact=out, contract=data, seconds=time.perf_counter() - started)
    sidecar = out / contract_io.SIDECAR_DEFAULT_PATH
    report.tensors = [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).replace("mlx.core.", "")}
                      for n, v in sorted(mx.load(str(sidecar)).items())]
    report.sizes = {"sidecar": sidecar.stat().st_size, "trunk": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    return report


def _build(src: SourceCheckpoint, out: Path, trunk: Path | None, trunk_bits: int, progress: Progress,
           probe_text: str | None, hidden_source: str | None, depth: int, draft_vocab: int | None,
           vocab_text: str | None) -> dict[str, Any]:
    """Trunk, sidecar and contract (validated, not yet written) in ``out``."""
    from mlx_lm import load as mlx_load

    from mtplx.artifact.probe import (CONVENTIONS, DEFAULT_SAMPLER, MAX_PROBE_TOKENS, default_probe_text, head_figures,
                                      probe_weights, trunk_pass)
    from mtplx.model.mtp_model import MTPModel
    from mtplx.model.trunk import Trunk

    if trunk is not None:
        progress.phase(f"Copying the trunk from {trunk} ...")
        trunk_q = copy_trunk(trunk, src, out)
    else:
        progress.phase(f"Converting the trunk with mlx-lm ({trunk_bits}-bit) ...")
        trunk_q = convert_trunk(src.path, out, trunk_bits)
    model, tokenizer = mlx_load(str(out))
    trunk_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    text_config = trunk_config.get("text_config", trunk_config)
    vocab_size = int(text_config["vocab_size"])
    k = subset_size(draft_vocab, vocab_size)
    choice = choose_draft_vocab(tokenizer, vocab_size, k, vocab_text) if k is not None else None

    progress.phase("Building the sidecar: mtp.* tensors, norms shifted once, body int4 ...")
    sidecar_rel = contract_io.SIDECAR_DEFAULT_PATH
    sidecar_q = build_sidecar(src, out / sidecar_rel, draft_vocab_ids=choice.ids if choice else None)
    sidecar: dict[str, Any] = {"path": sidecar_rel, "quantization": sidecar_q, "norms": "absolute"}
    if choice:
        sidecar["draft_vocab"] = {**choice.describe(), "tensor": DRAFT_VOCAB_TENSOR}
    data: dict[str, Any] = {
        "format": contract_io.FORMAT,
        "format_version": contract_io.FORMAT_VERSION,
        "mtplx_version": __version__,
        "name": out.name,
        "architecture": {
            "model_type": src.model_type,
            "hidden_size": int(text_config["hidden_size"]),
            "vocab_size": vocab_size,
            "num_hidden_layers": int(text_config["num_hidden_layers"]),
            "mtp_num_hidden_layers": int(text_config.get("mtp_num_hidden_layers", 1)),
            "num_experts": int(text_config.get("num_experts", 0)),
            "tie_word_embeddings": bool(text_config.get("tie_word_embeddings", trunk_config.get("tie_word_embeddings", False))),
            "text_config_sha256": contract_io.text_config_digest(text_config),
        },
        "trunk": {"quantization": trunk_q},
        "sidecar": sidecar,
        "conventions": {"hidden_source": "post_norm", "chain_hidden": "post_norm", "concat_order": "embedding_hidden"},
        "provenance": {
            "source": {"kind": "local"},
            "sidecar_sha256": sha256_file(out / sidecar_rel),
            "trunk_tensors_sha256": trunk_dependency_hashes(out),
            "built_with": f"mtplx {__version__}",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "defaults": {"depth": depth, "temperature": knobs.DEFAULTS["temperature"],
                     "draft_temperature": knobs.DEFAULTS["temperature"], "top_p": knobs.DEFAULTS["top_p"],
                     "top_k": knobs.DEFAULTS["top_k"]},
    }
    contract = contract_io.RuntimeContract(data=data)

    progress.phase("Measuring acceptance on the probe text (both hidden-source conventions) ...")
    trunk_view = Trunk(model)
    head, ids = load_head(out, contract, trunk_view.args)
    mtp = MTPModel(trunk_view, head, contract)
    weights = probe_weights(mtp)  # the model was loaded for the probe alone
    tokens = tokenizer.encode(probe_text or default_probe_text())
    tp = trunk_pass(mtp, tokens)
    acceptance = {convention: head_figures(mtp, tp, convention) for convention in CONVENTIONS}
    chosen = hidden_source or choose_hidden_source(acceptance)
    data["conventions"]["hidden_source"] = chosen
    data["measured"] = {
        "probe": "bundled" if probe_text is None else "user",
        "probe_tokens": min(len(tokens), MAX_PROBE_TOKENS),
        "probe_weights": weights,
        "hidden_source_chosen_by": "measurement" if hidden_source is None else "override",
        "acceptance": acceptance,
        "sampler": {k: getattr(DEFAULT_SAMPLER, k) for k in ("temperature", "top_p", "top_k")},
    }
    if ids is not None:
        mtp.set_draft_vocab(ids)
        sidecar["draft_vocab"]["acceptance"] = {"full": acceptance[chosen], "reduced": head_figures(mtp, tp, chosen),
                                                "hidden_source": chosen}
    return data


# On a probe of a few hundred tokens, acceptance differences below a point are noise; the
# reference deployments' convention (post_norm) wins unless pre_norm is clearly better.
HIDDEN_SOURCE_MARGIN = 0.01


def choose_hidden_source(acceptance: dict[str, dict[str, float]]) -> str:
    post, pre = acceptance["post_norm"]["expected_acceptance"], acceptance["pre_norm"]["expected_acceptance"]
    return "pre_norm" if pre > post + HIDDEN_SOURCE_MARGIN else "post_norm"


def _source_provenance(path: Path) -> dict[str, Any]:
    """HF snapshot paths (…/models--org--name/snapshots/<rev>) record repo id and revision;
    other local directories their name and a digest of their config and weight index, never
    the builder's absolute path."""
    parts = path.resolve().parts
    digest = checkpoint_digest(path)
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return {"kind": "huggingface", "repo_id": part[len("models--"):].replace("--", "/"), "revision": parts[i + 2],
                    "digest": digest}
    return {"kind": "local", "name": path.resolve().name, "digest": digest}
