"""A compatibility verdict for a model reference, from its small files only (no weights load)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtplx.core.device import machine_memory_bytes
from mtplx.core.knobs import KV_BITS, check_kv
from mtplx.errors import MtplxError


# KV quantization as mlx-lm's QuantizedKVCache stores it (``--kv-bits``): None is full precision.
KV_BITS_CHOICES: tuple[int | None, ...] = (None, *KV_BITS)
# Rows may take this share of the memory left after the weights and the prompt caches (the rest
# is a step's activations and the system's); the server admits by it (mtplx/server/capacity.py).
ROW_SHARE = 0.5
# The server's default prompt caches take this share of the machine's memory (--prompt-cache-gb).
PROMPT_CACHE_SHARE = 0.1


def kv_token_bytes(tc: dict[str, Any], kv_bits: int | None = None, kv_group_size: int = 64) -> int:
    """Bytes one full-attention layer's keys and values take per token. Quantized (mlx-lm's
    QuantizedKVCache), each group of ``kv_group_size`` values along the head dimension is
    ``bits * group / 8`` bytes of data plus a scale and a bias in the keys' dtype (bf16)."""
    from mtplx.model.shapes import KV_DTYPE

    check_kv(kv_bits, kv_group_size)
    head_dim = tc["head_dim"]
    if kv_bits is None:
        per_head = head_dim * KV_DTYPE
    else:
        per_head = head_dim * kv_bits // 8 + 2 * -(-head_dim // kv_group_size) * KV_DTYPE
    return 2 * tc["num_key_value_heads"] * per_head


def cache_bytes(tc: dict[str, Any], tokens: int, head_layers: int, kv_bits: int | None = None,
                kv_group_size: int = 64) -> int:
    """Bytes one sequence's caches hold at ``tokens`` tokens: every full-attention layer's KV
    (at ``kv_bits``), the MTP head's KV (full precision whatever kv_bits: the engine keeps the
    head's one drafting layer unquantized) and every Gated-DeltaNet layer's state and conv
    window, which are the same size however long the sequence."""
    from mtplx.model.shapes import FULL, LINEAR, ShapeBytes, kind_counts

    # mlx-lm places the kinds by full_attention_interval (default 4); a config.json may give
    # only layer_types, the same pattern spelled out.
    counts = kind_counts({**tc, "full_attention_interval": tc.get("full_attention_interval") or 4})
    shape = ShapeBytes(tc, weights=None, counts=counts, draft_vocab=0, context=tokens)  # type: ignore[arg-type]
    per_token = counts[FULL] * kv_token_bytes(tc, kv_bits, kv_group_size) + head_layers * shape.kv_row_bytes()
    return int(counts[LINEAR] * (shape.state_bytes() + shape.conv_bytes()) + per_token * tokens)


def tokens_that_fit(tc: dict[str, Any], budget: int, head_layers: int, kv_bits: int | None = None,
                    kv_group_size: int = 64) -> int:
    """The longest sequence whose caches fit in ``budget`` bytes (0 when not even the fixed
    state does); the caller caps it at the model's context."""
    fixed = cache_bytes(tc, 0, head_layers, kv_bits, kv_group_size)
    per_token = cache_bytes(tc, 1, head_layers, kv_bits, kv_group_size) - fixed
    return max((budget - fixed) // per_token, 0) if per_token > 0 else 1 << 62


def row_budget(memory: int, weights: int, prompt_cache: int) -> int:
    """The bytes the server's rows may take: ROW_SHARE of what the weights and the prompt
    caches leave."""
    return max(int((memory - weights - prompt_cache) * ROW_SHARE), 0)


@dataclass
class Inspection:
    ref: str
    path: str | None = None
    kind: str = "unknown"  # artifact | other-runtime-artifact | hf-checkpoint | mlx-trunk | catalog | unknown
    architecture: dict[str, Any] = field(default_factory=dict)
    mtp_head: bool = False
    contract_valid: bool | None = None
    contract_error: str | None = None
    inferred: list[str] = field(default_factory=list)
    weights_bytes: int = 0
    memory_bytes: int = 0
    verdict: str = ""
    can_run_mtp: bool = False
    can_run_ar: bool = False
    context_tokens: int = 0  # the model's context (max_position_embeddings)
    # What one request's caches may take under mtplx serve's defaults (row_budget), and per
    # kv_bits (None, 8, 4): bytes per context token and the longest context that budget holds.
    row_budget_bytes: int = 0
    kv_cache: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def memory_lines(self) -> list[str]:
        """The KV report as `mtplx inspect` prints it (empty when the config lacks the shapes)."""
        if not self.kv_cache:
            return []
        lines = [f"  KV cache:      context {self.context_tokens} tokens; mtplx serve lets one request's caches take "
                 f"{self.row_budget_bytes / 2**30:.2f} GiB here (half the memory the weights and the default "
                 "prompt cache leave)"]
        for k in self.kv_cache:
            bits = "none" if k["kv_bits"] is None else str(k["kv_bits"])
            whole = " (the whole context)" if k["max_context_tokens"] >= self.context_tokens else ""
            lines.append(f"    --kv-bits {bits:<4}  {k['bytes_per_token'] / 1024:8.2f} KiB per token   longest context "
                         f"in memory: {k['max_context_tokens']} tokens{whole}")
        return lines


def _local_or_metadata(ref: str) -> Path:
    from mtplx.artifact import hub
    from mtplx.artifact.loader import resolve
    from mtplx.artifact.paths import DEMO_REF
    from mtplx.artifact.paths import find_artifact

    if ref == DEMO_REF or Path(ref).expanduser().exists() or find_artifact(ref):
        return resolve(ref)
    repo = hub.RepoRef.parse(ref)
    if repo is None:
        raise MtplxError(f"'{ref}' is neither an existing directory nor a Hugging Face repo id (org/name)",
                         fix="check the path or the repo id")
    return hub.snapshot(repo, ["*.json", "mtp/*.json"])


def _from_catalog(out: Inspection, entry: dict[str, Any]) -> Inspection:
    """A catalog model with no artifact yet, answered from the catalog's text config: no
    network, so the same answer offline."""
    tc = entry.get("text_config", {})
    out.kind = "catalog"
    out.architecture = {k: tc.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_experts")}
    out.architecture["model_type"] = entry.get("model_type")
    out.mtp_head = int(tc.get("mtp_num_hidden_layers") or 0) > 0
    out.weights_bytes = int(float(entry.get("memory_gb") or 0) * 1e9)
    source = entry.get("text_config_source", {})
    out.inferred = ["answered from the catalog's text config" + ("" if source.get("official_config_read") else
                    " (transcribed from public copies of the official config.json; see runtime_contracts/catalog.json)")]
    out.verdict = (f"catalog model, not grafted yet: `mtplx run --model {entry['id']}` or `mtplx start` grafts it on "
                   f"first use (the MTP head of {entry['source']} by byte range, the MLX trunk {entry['trunk']})")
    return out


def inspect_ref(ref: str) -> Inspection:
    from mtplx.artifact.loader import read_contract
    from mtplx.artifact.paths import catalog_entry, find_artifact
    from mtplx.artifact.sidecar import check_layer_count
    from mtplx.artifact.tensors import check_complete, weight_files
    from mtplx.artifact.catalog import check_model_type, refuse_unsupported
    from mtplx.errors import ArtifactError, ContractError, UnsupportedModelError

    refuse_unsupported(ref)
    out = Inspection(ref=ref, memory_bytes=machine_memory_bytes())
    entry = catalog_entry(ref)
    if entry is not None and entry.get("source") and not Path(ref).expanduser().exists() and find_artifact(ref) is None:
        return _memory_warning(_from_catalog(out, entry), entry.get("text_config", {}))
    path = _local_or_metadata(ref)
    out.path = str(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        out.verdict = "not a model directory (no config.json)"
        return out
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tc = config.get("text_config", config)
    out.architecture = {k: tc.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_experts")}
    out.architecture["model_type"] = config.get("model_type")
    index = path / "model.safetensors.index.json"
    names: list[str] = []
    try:
        names = list(weight_files(path)) if (index.is_file() or any(path.glob("*.safetensors"))) else []
    except ArtifactError:
        names = []
    out.weights_bytes = sum(f.stat().st_size for f in path.rglob("*.safetensors") if f.is_file())
    if index.is_file() and not out.weights_bytes:
        meta = json.loads(index.read_text(encoding="utf-8")).get("metadata", {})
        out.weights_bytes = int(meta.get("total_size", 0))
    has_contract = (path / "mtplx_runtime.json").is_file()
    check_model_type(config.get("model_type"), config_file)
    try:
        check_complete(sorted(path.glob("*.safetensors")))
    except ArtifactError as e:
        out.verdict = f"cannot run: {e}"
        return out
    if has_contract:
        try:
            contract = read_contract(path)
            out.contract_valid = True
            out.inferred = list(contract.inferred)
            out.kind = "other-runtime-artifact" if contract.inferred else "artifact"
            sidecar = path / contract.sidecar_path
            out.mtp_head = sidecar.is_file()
            if out.mtp_head:
                check_layer_count(contract, sidecar)
            out.can_run_ar = True
            out.can_run_mtp = out.mtp_head
            d = contract.defaults
            out.verdict = (f"ready: MTP, depth auto ({contract.sidecar_quantization['scheme']} head, "
                           f"hidden_source {contract.hidden_source}), temperature {d['temperature']}"
                           if out.mtp_head else f"contract valid but the sidecar {contract.sidecar_path} is missing")
        except (ContractError, ArtifactError, UnsupportedModelError) as e:
            out.contract_valid = False
            out.contract_error = str(e)
            out.kind = "artifact"
            out.can_run_ar = True
            out.verdict = "the runtime contract does not validate: MTP refused, AR possible with --no-mtp"
    elif any(n.startswith("mtp.") for n in names):
        out.kind = "hf-checkpoint"
        out.mtp_head = True
        out.verdict = (f"original checkpoint with an MTP head: `mtplx run --model {ref}` grafts it on first use, or build "
                       f"an artifact with `mtplx graft --source {ref} --trunk MLX_CONVERSION` (only the head is fetched)")
    else:
        out.kind = "mlx-trunk" if config.get("quantization") else "checkpoint"
        out.can_run_ar = True
        out.verdict = "no MTP head: runs as plain AR (--no-mtp); graft the head from the original checkpoint for MTP"
    return _memory_warning(out, tc)


def _kv_report(out: Inspection, tc: dict[str, Any]) -> None:
    """Bytes per context token at each kv_bits and the longest context this machine's memory
    holds for one request, counted as the server admits requests (mtplx/server/capacity.py)."""
    try:
        out.context_tokens = int(tc["max_position_embeddings"])
        head_layers = int(tc.get("mtp_num_hidden_layers") or 0) if out.mtp_head else 0
        memory = out.memory_bytes
        out.row_budget_bytes = row_budget(memory, out.weights_bytes, int(memory * PROMPT_CACHE_SHARE))
        out.kv_cache = [{"kv_bits": bits,
                         "bytes_per_token": cache_bytes(tc, 1, head_layers, bits) - cache_bytes(tc, 0, head_layers, bits),
                         "max_context_tokens": min(tokens_that_fit(tc, out.row_budget_bytes, head_layers, bits),
                                                   out.context_tokens)}
                        for bits in KV_BITS_CHOICES]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a config without the shapes: no report
        out.kv_cache = []


def _memory_warning(out: Inspection, tc: dict[str, Any] | None = None) -> Inspection:
    if tc is not None:
        _kv_report(out, tc)
    if out.weights_bytes and out.memory_bytes and out.weights_bytes * 1.2 > out.memory_bytes:
        out.verdict += (f"; WARNING: needs about {out.weights_bytes * 1.2 / 2**30:.1f} GiB, "
                        f"this machine offers {out.memory_bytes / 2**30:.1f} GiB")
    return out
