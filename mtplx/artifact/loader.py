"""Resolve a model reference and load trunk + MTP head, refusing mismatched artifacts.

A reference is ``demo`` (the bundled artifact), a local directory, or a Hugging Face repo id
(fetched with huggingface_hub; ``HF_HUB_OFFLINE=1`` resolves from the local cache only).
Before anything runs, the sidecar's bytes and the trunk tensors the head reads (embed_tokens,
lm_head) are hashed and compared with the contract, and every head tensor's shape is checked.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable


from mtplx.artifact import contract as contract_io
from mtplx.artifact import hub
from mtplx.artifact.contract import RuntimeContract
from mtplx.artifact.hub import RepoRef
from mtplx.artifact.paths import DEMO_REF, catalog_entry, find_artifact
from mtplx.artifact.sidecar import load_head, sidecar_file
from mtplx.artifact.tensors import check_complete, sha256_file, trunk_dependency_hashes
from mtplx.artifact.catalog import check_model_type, refuse_unsupported
from mtplx.errors import ArtifactError, MtplxError, UnsupportedModelError
from mtplx.model.mtp_model import MTPModel
from mtplx.model.trunk import Trunk

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def demo_path() -> Path:
    return Path(str(resources.files("mtplx").joinpath("demo/tiny-qwen35-mtp")))


def resolve(ref: str, revision: str | None = None) -> Path:
    """A local directory for ``ref``: ``demo``, a directory, an artifact grafted into the
    mtplx cache (by catalog id or repo id), or a Hugging Face repo id (``org/name[@revision]``,
    downloaded through the Hugging Face cache)."""
    if ref == DEMO_REF:
        return demo_path()
    refuse_unsupported(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MtplxError("a model reference must be a directory, not a file", path=path,
                             fix="pass the artifact directory (the one holding mtplx_runtime.json)")
        return path
    cached = find_artifact(ref if revision is None else f"{ref}@{revision}")
    if cached is not None:
        return cached
    repo = RepoRef.parse(ref)
    if repo is None:
        entry = catalog_entry(ref)
        if entry is not None:
            raise MtplxError(f"'{ref}' is a catalog model that has not been grafted yet",
                             fix=f"run `mtplx run --model {ref}` or `mtplx start --model {ref}` (they offer to graft it)")
        raise MtplxError(f"'{ref}' is neither an existing directory nor a Hugging Face repo id (org/name)",
                         fix="check the path, or use `mtplx models` to list what is available")
    repo = RepoRef(repo.repo_id, revision or repo.revision)
    # The small files first: an original checkpoint's weights are not an artifact's, and are
    # not downloaded here (9 GB for a 4B, 70 GB for a 35B-A3B) only to be refused.
    if hub.is_original_checkpoint(hub.small_files(repo)):
        raise UnsupportedModelError(
            f"{repo} is an original checkpoint, not an mtplx artifact; nothing but its config and tokenizer was "
            "downloaded", fix=f"graft it first: `mtplx run --model {ref}` (or serve/bench/tune with --yes) grafts the "
                              f"MTP head by byte range onto an MLX trunk, or `mtplx graft --source {repo} --trunk "
                              "MLX_TRUNK`; then load the artifact")
    return hub.snapshot(repo, hub.ARTIFACT_FILES)


def read_contract(path: Path) -> RuntimeContract:
    """The artifact's contract: format v1, or one of another runtime converted (see legacy)."""
    file = path / contract_io.CONTRACT_FILE
    if not file.is_file():
        raise UnsupportedModelError("no mtplx_runtime.json: this directory is not an mtplx artifact", path=path,
                                    fix="build one with `mtplx graft --source ORIGINAL_CHECKPOINT --out DIR`, "
                                        "or load it without MTP (mtp=False / --no-mtp)")
    data = contract_io.read_json(file)
    if isinstance(data, dict) and "format" not in data and "arch_id" in data:
        from mtplx.artifact.legacy import contract_from_other_runtime

        return contract_from_other_runtime(data, path)
    contract_io.validate(data, file)
    return RuntimeContract(data=data, path=file)


@dataclass
class LoadReport:
    path: Path
    checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)


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


def load_tokenizer(path: Path, eos_token_ids: Any = None) -> Any:
    """mlx-lm's tokenizer for ``path``, or one clear error naming the file that is missing or
    unreadable (without it every prompt would encode to nothing)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not present:
        raise UnsupportedModelError("the tokenizer is missing (no tokenizer.json)", path=path / "tokenizer.json",
                                    fix="copy tokenizer.json and tokenizer_config.json from the checkpoint the trunk "
                                        "was converted from, or rebuild the artifact with `mtplx graft`")
    try:
        return mlx_load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types for a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"the tokenizer cannot be read ({reason})", path=path / present[0],
                            fix="copy an intact tokenizer.json from the original checkpoint, or rebuild the artifact "
                                "with `mtplx graft`") from None


def load(ref: str, *, mtp: bool = True, force: bool = False, revision: str | None = None,
         draft_vocab: bool = True, split: Callable[[Any], bool] | None = None) -> tuple[MTPModel, Any, LoadReport]:
    """Load an artifact: (model, tokenizer, report). With ``mtp=False`` any Qwen3.5 MLX
    checkpoint loads for plain AR decoding. An artifact with a reduced draft vocabulary drafts
    from it; ``draft_vocab=False`` loads the full head instead (to compare the two).

    ``split`` (a distributed run, mtplx/distributed/) gets the mlx-lm model before any weight
    is read, keeps only this process's part of it, and says whether this process holds the
    MTP head; only the weights left are then read."""
    from mlx_lm.utils import load_model

    path = resolve(ref, revision)
    report = LoadReport(path=path)
    contract = read_contract(path) if mtp else None
    if contract is not None:
        report.inferred = list(contract.inferred)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError("no config.json: not a model directory", path=path,
                                    fix="pass an mtplx artifact or an MLX Qwen3.5 checkpoint")
    check_model_type(json.loads(config_file.read_text(encoding="utf-8")).get("model_type"), config_file)
    check_complete(sorted(path.glob("*.safetensors")))
    model, config = load_model(path, lazy=split is not None)
    keep_head = True
    if split is not None:
        import mlx.core as mx

        keep_head = split(model)
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    trunk = Trunk(model)
    head = vocab_ids = None
    if contract is not None:
        check_architecture(trunk, contract, path)
        if contract.inferred:
            report.warnings.append("provenance not verified: the artifact carries no hashes of its own")
        else:
            verify_provenance(path, contract, report, force)
        if keep_head:
            head, vocab_ids = load_head(path, contract, trunk.args)
            report.checks.append("sidecar tensors match the head's shapes and hold no NaN or Inf")
    mtp_model = MTPModel(trunk, head, contract, str(path))
    if vocab_ids is not None and draft_vocab:
        mtp_model.set_draft_vocab(vocab_ids)
        report.checks.append(f"drafting from a reduced vocabulary of {vocab_ids.size} token ids")
    return mtp_model, tokenizer, report
