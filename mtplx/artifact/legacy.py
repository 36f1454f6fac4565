"""Artifacts published for the other MLX MTP runtime.

Their ``mtplx_runtime.json`` carries keys such as ``arch_id``, ``mtp_depth_max``,
``mtp_depth_default``, ``recommended_profile``, ``recommended_draft_sampler`` and
``mtp_sidecar`` (e.g. "int4-g64-prequantized"), with the head in ``mtp.safetensors`` or
``mtp/weights.safetensors``. They state no conventions and no hashes, so this module builds a
format-1 contract from what the files say and lists every inference, which the loader reports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from mtplx.core import knobs
from mtplx.artifact import contract as contract_io
from mtplx.artifact.contract import RuntimeContract
from mtplx.artifact.tensors import read_header, sha256_file, trunk_dependency_hashes
from mtplx.errors import ArtifactError

SIDECAR_CANDIDATES = ("mtp/weights.safetensors", "mtp.safetensors")


def _norm_names(names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".weight") and "norm" in n.split(".")[-2]]


def _generation_defaults(path: Path) -> dict[str, Any]:
    """The sampler the model's publisher set (temperature, top_p, top_k of generation_config.json),
    only the keys it states; empty when there is no such file. Validation checks the values."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        gen = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"generation_config.json cannot be read ({e})", path=path,
                            fix="re-download the artifact") from None
    if not isinstance(gen, dict):
        return {}
    return {k: gen[k] for k in ("temperature", "top_p", "top_k")
            if isinstance(gen.get(k), (int, float)) and not isinstance(gen[k], bool)}


def contract_from_other_runtime(data: dict[str, Any], path: Path) -> RuntimeContract:
    inferred = [f"artifact made for another runtime (arch_id={data.get('arch_id')!r}); converted to mtplx format 1"]
    sidecar = next((c for c in SIDECAR_CANDIDATES if (path / c).is_file()), None)
    if sidecar is None:
        raise ArtifactError("the contract names no sidecar and neither mtp/weights.safetensors nor mtp.safetensors exists",
                            path=path, fix="re-download the artifact, or build one with `mtplx graft`")
    inferred.append(f"sidecar file: {sidecar}")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tc = config.get("text_config", config)

    header, _ = read_header(path / sidecar)
    names = list(header)
    quantized = sorted({n[: -len(".scales")] for n in names if n.endswith(".scales")})
    match = re.search(r"int(\d+)-g(\d+)", str(data.get("mtp_sidecar", "")).lower())
    bits, group = (int(match.group(1)), int(match.group(2))) if match else (4, 64)
    inferred.append(f"head quantization: {len(quantized)} linears int{bits} g{group}"
                    + ("" if match else " (assumed: mtp_sidecar does not say)"))

    norms = _norm_names(names)
    transforms = []
    if norms:
        weights = mx.load(str(path / sidecar))
        mean = sum(float(weights[n].astype(mx.float32).mean().item()) for n in norms) / len(norms)
        if abs(mean) < 0.5:
            inferred.append(f"norm weights average {mean:+.3f}: zero-centered, shifted by +1 at load")

            def shift(w: dict) -> dict:
                return {k: ((v.astype(mx.float32) + 1.0).astype(v.dtype) if k in {n.removeprefix("mtp.") for n in norms} else v)
                        for k, v in w.items()}

            transforms.append(shift)
        else:
            inferred.append(f"norm weights average {mean:+.3f}: already absolute")

    depth = data.get("mtp_depth_default") or data.get("mtp_depth_max") or 1
    # The target's law is the model's own (generation_config.json, else the graft defaults);
    # recommended_draft_sampler is the law the other runtime drafts from: our draft_temperature.
    draft_sampler = data.get("recommended_draft_sampler") or {}
    target = _generation_defaults(path)
    inferred.append("sampling defaults: temperature, top_p, top_k from "
                    + ("generation_config.json" if target else "mtplx's defaults (no generation_config.json)")
                    + ("; draft_temperature from recommended_draft_sampler" if "temperature" in draft_sampler else ""))
    inferred.append("hidden_source post_norm and chain_hidden post_norm (not stated; the reference deployments' choice)")
    inferred.append("no provenance hashes in the artifact: hashes were computed at load and prove nothing about its origin")
    v1 = {
        "format": contract_io.FORMAT,
        "format_version": contract_io.FORMAT_VERSION,
        "name": str(data.get("arch_id") or path.name),
        "architecture": {
            "model_type": config.get("model_type"),
            "hidden_size": int(tc["hidden_size"]),
            "vocab_size": int(tc["vocab_size"]),
            "num_hidden_layers": int(tc["num_hidden_layers"]),
            "mtp_num_hidden_layers": int(tc.get("mtp_num_hidden_layers", 1)),
            "num_experts": int(tc.get("num_experts", 0)),
            "text_config_sha256": contract_io.text_config_digest(tc),
        },
        "trunk": {"quantization": contract_io.quantization_of_trunk(path)},
        "sidecar": {
            "path": sidecar,
            "norms": "absolute",
            "quantization": {
                "scheme": "body-int4" if quantized and bits == 4 else "bf16",
                "mode": "affine" if quantized else "none",
                "bits": bits if quantized else 16,
                "group_size": group,
                "quantized": quantized,
                "unquantized": sorted(n for n in names if not any(n.startswith(q + ".") for q in quantized)),
            },
        },
        "conventions": {"hidden_source": "post_norm", "chain_hidden": "post_norm", "concat_order": "embedding_hidden"},
        "provenance": {
            "source": {"kind": "local", "name": path.resolve().name},
            "sidecar_sha256": sha256_file(path / sidecar),
            "trunk_tensors_sha256": trunk_dependency_hashes(path),
        },
        "defaults": {
            "depth": int(min(depth, contract_io.MAX_DEPTH)),
            "temperature": float(target.get("temperature", knobs.DEFAULTS["temperature"])),
            "draft_temperature": float(draft_sampler.get("temperature",
                                                         target.get("temperature", knobs.DEFAULTS["temperature"]))),
            "top_p": float(target.get("top_p", knobs.DEFAULTS["top_p"])),
            "top_k": int(target.get("top_k", knobs.DEFAULTS["top_k"])),
        },
    }
    contract_io.validate(v1, path / contract_io.CONTRACT_FILE)
    return RuntimeContract(data=v1, path=path / contract_io.CONTRACT_FILE, inferred=inferred, sidecar_transforms=transforms)
