"""The local artifact cache: graft on first use, list, remove.

`mtplx run --model qwen3.5-4b` (or `Qwen/Qwen3.5-4B`, or any original checkpoint's repo id)
finds the artifact grafted for it in ``$MTPLX_CACHE/artifacts``; when there is none yet,
:func:`ensure_artifact` says what will be downloaded, with sizes from the Hub's metadata, and
after a yes grafts it there: the MTP tensors by byte range from the original, the trunk whole
from the MLX conversion the catalog pairs with it (or, for a checkpoint the catalog does not
know, the whole original converted with mlx-lm).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mtplx.artifact import hub
from mtplx.artifact.hub import RepoRef
from mtplx.artifact.paths import (DEMO_REF, artifact_name, artifacts_dir, cache_root, catalog_entry, dir_size,
                                  find_artifact)
from mtplx.artifact.progress import Progress
from mtplx.artifact.catalog import check_model_type, refuse_unsupported
from mtplx.errors import MtplxError



def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _matching(files: dict[str, int], patterns: list[str]) -> int:
    return sum(size for name, size in files.items() if any(fnmatch.fnmatch(name, p) for p in patterns))


@dataclass
class GraftPlan:
    """What building an artifact for a ref will download, and where it will go."""

    ref: str
    source: RepoRef
    trunk: RepoRef | None
    out: Path
    small_bytes: int | None = None
    head_bytes: int | None = None
    trunk_bytes: int | None = None
    whole_bytes: int | None = None  # no trunk: the whole original, converted with mlx-lm
    head: hub.HeadPlan | None = None  # where the head's bytes lie: the graft fetches exactly these

    def describe(self) -> str:
        lines = [f"{self.ref} has no artifact yet. Grafting one will download:"]
        if self.trunk is not None:
            lines.append(f"  - the MTP head of {self.source.repo_id}: {_size(self.head_bytes)} by byte range, "
                         f"plus {_size(self.small_bytes)} of config and tokenizer")
            lines.append(f"  - the MLX trunk {self.trunk.repo_id}: {_size(self.trunk_bytes)} "
                         "(Hugging Face cache, shared with mlx-lm)")
        else:
            lines.append(f"  - the whole of {self.source.repo_id}: {_size(self.whole_bytes)}, converted to a 4-bit "
                         "trunk with mlx-lm (no MLX trunk is paired with it in the catalog)")
        if hub.is_offline():
            lines.append("  (HF_HUB_OFFLINE=1: only what is already cached can be used)")
        lines.append(f"and write the artifact to {self.out}")
        return "\n".join(lines)


def original_checkpoint(repo: RepoRef) -> bool:
    """Whether a repo is an original checkpoint with an MTP head (not an mtplx artifact, not an
    MLX conversion), read from its small files; one of an architecture mtplx cannot run is
    refused here, before any weight byte moves."""
    small = hub.small_files(repo)
    if not hub.is_original_checkpoint(small):
        return False
    try:
        model_type = json.loads((small / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        model_type = None
    check_model_type(model_type, f"{repo.repo_id}: config.json")
    return True


def check_cached_offline(repo: RepoRef, trunk: RepoRef | None) -> None:
    """With HF_HUB_OFFLINE=1 a graft can only use what is cached: say what is missing in one
    line before anything is offered."""
    small = hub.small_files(repo)  # raises the offline error when the source is not cached
    if trunk is None:
        hub.snapshot(repo, hub.MODEL_FILES)
        return
    if not (hub.head_source_dir(cache_root(), repo, small.name) / hub.INDEX_FILE).is_file():
        raise MtplxError(f"the MTP head of {repo.repo_id} is not in the mtplx cache and cannot be downloaded now "
                         "(HF_HUB_OFFLINE=1)", fix="unset HF_HUB_OFFLINE on a machine with a network, or pass a local path")
    hub.snapshot(trunk, hub.MODEL_FILES)


def plan_graft(ref: str, source: RepoRef, trunk: RepoRef | None) -> GraftPlan:
    out = artifacts_dir() / artifact_name(ref)
    if hub.is_offline():
        return GraftPlan(ref, source, trunk, out)
    # The refs stay as given (not pinned to the commits read here): the Hugging Face cache then
    # records which commit a branch pointed to, so a later offline use finds the files.
    _, files = hub.repo_files(source)
    plan = GraftPlan(ref, source, trunk, out, small_bytes=_matching(files, hub.SMALL_FILES))
    if trunk is None:
        plan.whole_bytes = _matching(files, hub.MODEL_FILES)
        return plan
    plan.head = hub.plan_head(source, hub.small_files(source))
    plan.head_bytes = plan.head.tensor_bytes
    plan.trunk_bytes = _matching(hub.repo_files(trunk)[1], hub.MODEL_FILES)
    return plan


def ensure_artifact(ref: str, *, confirm: Callable[[str], bool], trunk: str | None = None,
                    progress: Progress | None = None, draft_vocab: int | None = None) -> str:
    """The model ref to load. ``demo``, a directory and a published artifact come back as they
    are; a catalog id or an original checkpoint's repo id comes back as the artifact grafted
    for it in the cache, grafted first when ``confirm`` (shown the plan) says yes.

    ``trunk`` overrides the MLX trunk the catalog pairs with the source."""
    if ref == DEMO_REF or Path(ref).expanduser().exists():
        return ref
    refuse_unsupported(ref)
    cached = find_artifact(ref)
    if cached is not None:
        return str(cached)
    entry = catalog_entry(ref)
    repo = RepoRef.parse(entry["source"] if entry else ref)
    if repo is None:
        return ref  # not a repo id: the loader says what is wrong with it
    if entry is not None and "@" in ref:
        repo = RepoRef(repo.repo_id, ref.partition("@")[2])
    if entry is None and not original_checkpoint(repo):
        return ref  # an artifact (or an MLX model) on the Hub: the loader downloads it
    trunk_ref = trunk or (entry or {}).get("trunk")
    trunk_repo = RepoRef.parse(trunk_ref) if trunk_ref else None
    if trunk_ref and trunk_repo is None:
        raise MtplxError(f"the trunk '{trunk_ref}' is not a Hugging Face repo id", fix="pass ORG/NAME[@REVISION]")
    if hub.is_offline():  # nothing can be downloaded: no offer unless everything is cached
        check_cached_offline(repo, trunk_repo)
    plan = plan_graft(ref, repo, trunk_repo)
    if not confirm(plan.describe()):
        raise MtplxError(f"{ref} was not grafted and nothing more was downloaded",
                         fix="answer yes (or pass --yes) to graft it, or build it yourself with "
                             f"`mtplx graft --source {repo.repo_id}" + (f" --trunk {trunk_ref}" if trunk_ref else "") + "`")
    from mtplx.artifact.graft import graft

    graft(str(plan.source), plan.out, trunk=str(plan.trunk) if plan.trunk else None, draft_vocab=draft_vocab,
          progress=progress or Progress(), name=ref, head_plan=plan.head)
    return str(plan.out)


def list_artifacts() -> list[dict[str, Any]]:
    """The artifacts in the cache: name (what --model and `mtplx rm` take), size, source."""
    root = artifacts_dir()
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        contract = path / "mtplx_runtime.json"
        if path.name.startswith(".") or not contract.is_file():
            continue
        try:
            data = json.loads(contract.read_text(encoding="utf-8"))
            source = data.get("provenance", {}).get("source", {})
            origin = source.get("repo_id") or source.get("name") or "?"
        except (json.JSONDecodeError, AttributeError):
            origin = "unreadable contract"
        size = dir_size(path)
        out.append({"ref": path.name, "where": "mtplx-cache", "size_bytes": size, "title": f"grafted from {origin}",
                    "path": str(path)})
    return out


def remove_artifact(ref: str) -> tuple[Path, int]:
    """Delete a cached artifact (by cache name, catalog id or repo id); returns it and its size."""
    path = find_artifact(ref)
    if path is None or path.parent.resolve() != artifacts_dir().resolve():
        names = ", ".join(a["ref"] for a in list_artifacts()) or "none"
        raise MtplxError(f"no artifact '{ref}' in the mtplx cache ({artifacts_dir()})",
                         fix=f"pass one of the names `mtplx models` lists (cached: {names})")
    size = dir_size(path)
    shutil.rmtree(path)
    return path, size
