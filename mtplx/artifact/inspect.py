"""A compatibility verdict for a model reference, from its small files only (no weights load)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtplx.errors import MtplxError


def machine_memory_bytes() -> int:
    """What the model may use: Metal's recommended working set on a Mac, else physical memory."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except Exception:  # noqa: BLE001 - fall back to physical memory
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Inspection:
    ref: str
    path: str | None = None
    kind: str = "unknown"  # artifact | other-runtime-artifact | hf-checkpoint | mlx-trunk | unknown
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

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


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


def inspect_ref(ref: str) -> Inspection:
    from mtplx.artifact.loader import read_contract
    from mtplx.artifact.tensors import weight_files
    from mtplx.errors import ArtifactError, ContractError, UnsupportedModelError

    out = Inspection(ref=ref, memory_bytes=machine_memory_bytes())
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
    supported = config.get("model_type") in ("qwen3_5", "qwen3_5_moe")
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
    if not supported:
        out.verdict = f"unsupported architecture model_type={config.get('model_type')!r}: mtplx runs qwen3_5 and qwen3_5_moe"
        return out
    if has_contract:
        try:
            contract = read_contract(path)
            out.contract_valid = True
            out.inferred = list(contract.inferred)
            out.kind = "other-runtime-artifact" if contract.inferred else "artifact"
            sidecar = path / contract.sidecar_path
            out.mtp_head = sidecar.is_file()
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
    if out.weights_bytes and out.memory_bytes and out.weights_bytes * 1.2 > out.memory_bytes:
        out.verdict += (f"; WARNING: needs about {out.weights_bytes * 1.2 / 2**30:.1f} GiB, "
                        f"this machine offers {out.memory_bytes / 2**30:.1f} GiB")
    return out
