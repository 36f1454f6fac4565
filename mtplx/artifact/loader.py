"""Resolve a model reference and load trunk + MTP head, refusing mismatched artifacts.

A reference is ``demo`` (the bundled artifact), a local directory, or a Hugging Face repo id
(fetched with huggingface_hub; ``HF_HUB_OFFLINE=1`` resolves from the local cache only).
Before anything runs, the sidecar's bytes and the trunk tensors the head reads (embed_tokens,
lm_head) are hashed and compared with the contract, and every head tensor's shape is checked.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from mtplx.artifact import contract as contract_io
from mtplx.artifact.contract import RuntimeContract
from mtplx.artifact.tensors import sha256_file, trunk_dependency_hashes
from mtplx.errors import ArtifactError, MtplxError, UnsupportedModelError
from mtplx.model.mtp_head import MTPHead, dequantize_linears
from mtplx.model.mtp_model import MTPModel
from mtplx.model.trunk import Trunk

DEMO_REF = "demo"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "mtp/*"]


def demo_path() -> Path:
    return Path(str(resources.files("mtplx").joinpath("demo/tiny-qwen35-mtp")))


def resolve(ref: str, revision: str | None = None) -> Path:
    """A local directory for ``ref``, downloading from Hugging Face if needed."""
    if ref == DEMO_REF:
        return demo_path()
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MtplxError("a model reference must be a directory, not a file", path=path,
                             fix="pass the artifact directory (the one holding mtplx_runtime.json)")
        return path
    if not _REPO_ID.match(ref):
        raise MtplxError(f"'{ref}' is neither an existing directory nor a Hugging Face repo id (org/name)",
                         fix="check the path, or use `mtplx models` to list what is available")
    return _download(ref, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError:
        raise MtplxError(f"'{repo_id}' is not in the local Hugging Face cache and cannot be downloaded now "
                         "(offline, or HF_HUB_OFFLINE=1)", fix="connect to the network once, or pass a local path") from None
    except GatedRepoError:
        raise MtplxError(f"'{repo_id}' is gated on Hugging Face",
                         fix="accept its licence on huggingface.co and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MtplxError(f"no Hugging Face repository '{repo_id}'", fix="check the repo id's spelling") from None
    except RevisionNotFoundError:
        raise MtplxError(f"'{repo_id}' has no revision '{revision}'", fix="pass an existing branch, tag or commit") from None


def read_contract(path: Path) -> RuntimeContract:
    """The artifact's contract: format v1, or one of another runtime converted (see legacy)."""
    file = path / contract_io.CONTRACT_FILE
    if not file.is_file():
        raise UnsupportedModelError("no mtplx_runtime.json: this directory is not an mtplx artifact", path=path,
                                    fix="build one with `mtplx graft --source ORIGINAL_CHECKPOINT --out DIR`, "
                                        "or load it without MTP (mtp=False / --no-mtp)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "format" not in data and "arch_id" in data:
        from mtplx.artifact.legacy import contract_from_other_runtime

        return contract_from_other_runtime(data, path)
    return contract_io.read(path)


@dataclass
class LoadReport:
    path: Path
    checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)


def sidecar_file(path: Path, contract: RuntimeContract) -> Path:
    file = path / contract.sidecar_path
    if not file.is_file():
        raise ArtifactError(f"the sidecar {contract.sidecar_path} named by the contract is missing", path=path,
                            fix="re-download the artifact or rebuild it with `mtplx graft`")
    return file


def verify_provenance(path: Path, contract: RuntimeContract, report: LoadReport, force: bool) -> None:
    """Compare the sidecar and the trunk tensors the head reads with the contract's hashes."""
    sidecar = sidecar_file(path, contract)
    problems = []
    if sha256_file(sidecar) != contract.provenance["sidecar_sha256"]:
        problems.append((f"the sidecar {contract.sidecar_path} does not match the sha256 in the contract "
                         "(it was modified or replaced after the artifact was built)"))
    expected = contract.provenance["trunk_tensors_sha256"]
    actual = trunk_dependency_hashes(path)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            problems.append(f"trunk tensor {name} differs from the one the sidecar was built for "
                            "(the head shares embed_tokens/lm_head with the trunk, so it would draft from another model)")
            break
    if not problems:
        report.checks.append("sidecar and trunk hashes match the contract")
        return
    if not force:
        raise ArtifactError(problems[0], path=path / contract_io.CONTRACT_FILE,
                            fix="rebuild the artifact with `mtplx graft`, or pass force=True (--force) to load it anyway "
                                "at your own risk")
    for p in problems:
        report.warnings.append(f"FORCED: {p}")
        print(f"mtplx: WARNING: FORCED LOAD: {p}", file=sys.stderr)


def check_architecture(trunk: Trunk, contract: RuntimeContract, path: Path) -> None:
    arch = contract.data["architecture"]
    args = trunk.args
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if getattr(args, key) != arch[key]:
            raise ArtifactError(f"the trunk's {key} is {getattr(args, key)} but the contract says {arch[key]}",
                                path=path / contract_io.CONTRACT_FILE,
                                fix="this contract belongs to another model: rebuild the artifact with `mtplx graft`")


def load_head(path: Path, contract: RuntimeContract, args: Any) -> MTPHead:
    """Build the head for the architecture, quantize as the contract says, load strictly."""
    arch = contract.data["architecture"]
    head = MTPHead(args, num_layers=arch["mtp_num_hidden_layers"], concat_order=contract.data["conventions"]["concat_order"])
    q = contract.sidecar_quantization
    if q["quantized"]:
        wanted = {name[len("mtp."):] for name in q["quantized"]}
        nn.quantize(head, group_size=q["group_size"], bits=q["bits"], class_predicate=lambda p, m: p in wanted)
    file = sidecar_file(path, contract)
    weights = {k[len("mtp."):] if k.startswith("mtp.") else k: v for k, v in mx.load(str(file)).items()}
    for transform in getattr(contract, "sidecar_transforms", []):
        weights = transform(weights)
    from mtplx.artifact.graft import check_head_shapes

    check_head_shapes(head, weights, file)
    head.load_weights(list(weights.items()), strict=True)
    if q["quantized"] and mx.default_device() == mx.cpu:
        dequantize_linears(head)
    mx.eval(head.parameters())
    return head


def load(ref: str, *, mtp: bool = True, force: bool = False, revision: str | None = None,
         split: Callable[[nn.Module], bool] | None = None) -> tuple[MTPModel, Any, LoadReport]:
    """Load an artifact: (model, tokenizer, report). With ``mtp=False`` any Qwen3.5 MLX
    checkpoint loads for plain AR decoding.

    ``split`` (a distributed run, mtplx/distributed/) gets the mlx-lm model before any weight
    is read, keeps only this process's part of it, and says whether this process holds the
    MTP head; only the weights left are then read."""
    from mlx_lm import load as mlx_load

    path = resolve(ref, revision)
    report = LoadReport(path=path)
    contract = read_contract(path) if mtp else None
    if contract is not None:
        report.inferred = list(contract.inferred)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError("no config.json: not a model directory", path=path,
                                    fix="pass an mtplx artifact or an MLX Qwen3.5 checkpoint")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("qwen3_5", "qwen3_5_moe"):
        raise UnsupportedModelError(f"unknown architecture model_type={model_type!r}; mtplx runs qwen3_5 and qwen3_5_moe",
                                    path=config_file, fix="use a Qwen3.5 or Qwen3.6 model")
    model, tokenizer = mlx_load(str(path), lazy=split is not None)
    keep_head = True
    if split is not None:
        keep_head = split(model)
        mx.eval(model.parameters())
    trunk = Trunk(model)
    head = None
    if contract is not None:
        check_architecture(trunk, contract, path)
        if contract.inferred:
            report.warnings.append("provenance not verified: the artifact carries no hashes of its own")
        else:
            verify_provenance(path, contract, report, force)
        if keep_head:
            head = load_head(path, contract, trunk.args)
            report.checks.append("sidecar tensors match the head's shapes")
    return MTPModel(trunk, head, contract, str(path)), tokenizer, report
