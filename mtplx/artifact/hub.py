"""Hugging Face Hub access: repo ids, whole snapshots, and the MTP head's bytes alone.

A trunk comes whole, through ``snapshot_download`` (the ordinary Hugging Face cache, resumable
and shared with mlx-lm). An original checkpoint is another matter: Qwen3.5-4B is 9 GB of bf16
and the 35B-A3B 70 GB, of which the MTP head is 2-5%, sitting in one or two shards. So for a
source only the small files come through the cache (config, tokenizer, the weight index);
then, for each shard that holds ``mtp.*`` tensors, two ranged reads fetch its safetensors
header (8 bytes of length, then the JSON), and one ranged read per contiguous run of ``mtp.*``
tensors fetches their bytes and nothing else. Those bytes are written, unchanged, as a small
local checkpoint (the *head source*) that graft reads like any other directory: a sidecar
built from it is byte-identical to one built from the full checkpoint.

Ranged reads go to ``<cache>/sources/.staging`` first, one ``.part`` file per run, appended as
bytes arrive, so a rerun after a dropped connection continues where it stopped; the head
source is assembled in a temporary directory and moved into place whole.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtplx.artifact.progress import Progress
from mtplx.errors import MtplxError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a checkpoint holds besides its weights: config, tokenizer, chat template, weight index.
SMALL_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"]
MODEL_FILES = SMALL_FILES + ["*.safetensors"]
ARTIFACT_FILES = MODEL_FILES + ["mtp/*"]
HEAD_FILE = "model-mtp.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Runs of mtp.* tensors closer than this are fetched in one read (the gap's bytes come along).
MERGE_GAP = 64 * 1024


@dataclass(frozen=True)
class RepoRef:
    """``org/name`` with an optional ``@revision`` (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "RepoRef | None":
        repo, at, revision = str(ref).partition("@")
        if not REPO_ID.match(repo) or (at and not revision):
            return None
        return cls(repo, revision or None)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def folder(self) -> str:
        return self.repo_id.replace("/", "--")


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of whatever HTTP client huggingface_hub uses (httpx or its fork)."""
    from huggingface_hub.utils import get_session

    module = importlib.import_module(type(get_session()).__module__.split(".")[0])
    return tuple(getattr(module, n) for n in ("TransportError", "StreamError") if hasattr(module, n))


def _connection_failure(error: BaseException) -> str | None:
    """The first line of the network failure behind ``error`` (itself or a cause), if it is one:
    the HTTP client's transport errors and the socket errors under them (DNS, refused, unreachable)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _transport_errors()) or isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
            text = str(error).strip()
            return text.splitlines()[0] if text else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


def hub_error(ref: RepoRef, error: BaseException, file: str | None = None) -> MtplxError:
    """One clear paragraph for anything huggingface_hub raises, naming the repo (and file)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{ref.repo_id}" + (f": {file}" if file else "")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, LocalEntryNotFoundError) and is_offline():
        return MtplxError(f"{where} is not in the local Hugging Face cache (or only partly) and cannot be downloaded now "
                          "(HF_HUB_OFFLINE=1)", fix="unset HF_HUB_OFFLINE on a machine with a network, or pass a local path")
    unreachable = _connection_failure(error)
    if unreachable is not None or isinstance(error, LocalEntryNotFoundError):
        # huggingface_hub says LocalEntryNotFound when the Hub could not be asked and the cache lacks the file
        return MtplxError(f"the Hugging Face Hub cannot be reached for {where}, and the local cache does not hold it "
                          f"(no network: {unreachable or first_line})",
                          fix="connect to the network, pass a local path (an artifact or checkpoint directory), or "
                              "point HF_ENDPOINT at a Hub mirror")
    if isinstance(error, GatedRepoError):
        return MtplxError(f"{where} is gated on Hugging Face",
                          fix="accept its licence on huggingface.co and log in with `hf auth login`")
    if isinstance(error, RevisionNotFoundError):
        return MtplxError(f"{where}: the repository has no revision '{ref.revision}'",
                          fix="pass an existing branch, tag or commit after the @")
    if isinstance(error, RepositoryNotFoundError):
        return MtplxError(f"no Hugging Face repository '{ref.repo_id}' (or it is private)",
                          fix="check the repo id's spelling, or log in with `hf auth login`")
    if isinstance(error, RemoteEntryNotFoundError):
        return MtplxError(f"{where} does not exist in this revision of the repository",
                          fix="check that the repository is a complete checkpoint")
    if isinstance(error, HfHubHTTPError):
        return MtplxError(f"the Hub refused a request for {where} ({first_line})", fix="retry later")
    return MtplxError(f"downloading {where} failed ({first_line})",
                      fix="rerun the command: downloads resume where they stopped")


def snapshot(ref: RepoRef, patterns: list[str], progress: Progress | None = None) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` into the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    progress = progress or Progress.silent()
    try:
        with progress.hub_bars():
            return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except MtplxError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one paragraph naming the repo
        raise hub_error(ref, e, _missing_file(ref, patterns)) from None


def _missing_file(ref: RepoRef, patterns: list[str]) -> str | None:
    """After a failed snapshot: the first expected file not in the cache, if the cached tree
    listing says which (it names the file a truncated or dropped download was fetching)."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.utils import filter_repo_objects

        files = [f.path for f in get_cached_repo_tree(ref.repo_id, revision=ref.revision)]
        snapshot_dir = Path(hub_cache_dir()) / f"models--{ref.folder}" / "snapshots"
        present = {p.relative_to(d).as_posix() for d in snapshot_dir.iterdir() for p in d.rglob("*") if p.is_file()}
        return next((f for f in filter_repo_objects(files, allow_patterns=patterns) if f not in present), None)
    except Exception:  # noqa: BLE001 - only a nicer message is at stake
        return None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def repo_files(ref: RepoRef) -> tuple[str, dict[str, int]]:
    """The commit a ref resolves to and the size of every file, from the Hub's metadata."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one paragraph naming the repo
        raise hub_error(ref, e) from None
    return info.sha, {s.rfilename: int(s.size or 0) for s in info.siblings or []}


# ----------------------------------------------------------------------------- the head's bytes

@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in the shard
    end: int


@dataclass
class Run:
    """Contiguous bytes of one shard holding whole mtp.* tensors: [start, end) in the file."""

    start: int
    end: int
    tensors: list[Tensor] = field(default_factory=list)  # by offset

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class HeadPlan:
    """Where a source's MTP tensors lie: per shard, the runs of bytes to fetch."""

    ref: RepoRef
    revision: str  # the commit sha the ref resolved to
    snapshot: Path  # the small files in the Hugging Face cache
    runs: dict[str, list[Run]]

    @property
    def tensor_bytes(self) -> int:
        return sum(r.size for runs in self.runs.values() for r in runs)


@dataclass
class HeadSource:
    path: Path
    provenance: dict[str, Any]


def sources_dir(cache: Path) -> Path:
    return cache / "sources"


def head_source_dir(cache: Path, ref: RepoRef, revision: str) -> Path:
    return sources_dir(cache) / ref.folder / revision


def _resolve_url(ref: RepoRef, revision: str, file: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(ref.repo_id, file, revision=revision)


def _fetch(ref: RepoRef, revision: str, file: str, start: int, end: int, sink, bar=None) -> int:
    """Bytes [start, end) of a repo file, appended to ``sink``; returns how many arrived.

    Fewer than asked means a truncated response; a connection that drops midway keeps what
    arrived in ``sink`` and raises, so a rerun can resume after it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if is_offline():
        raise MtplxError(f"{ref.repo_id}: {file} (bytes {start}-{end - 1}) is not cached and HF_HUB_OFFLINE=1 "
                         "forbids fetching it", fix="unset HF_HUB_OFFLINE and rerun, or pass a local checkpoint")
    headers = build_hf_headers()
    headers.update({"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
    got = 0
    try:
        with get_session().stream("GET", _resolve_url(ref, revision, file), headers=headers,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise MtplxError(f"{ref.repo_id}: {file}: the server answered {response.status_code} to a byte-range "
                                 "request instead of 206", fix="retry later, or pass a local copy of the checkpoint")
            for chunk in response.iter_bytes():  # unbuffered: what arrived before a drop is kept
                sink.write(chunk)
                got += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except MtplxError:
        raise
    except HfHubHTTPError as e:
        raise hub_error(ref, e, file) from None
    except _transport_errors() as e:
        raise MtplxError(f"{ref.repo_id}: {file}: the connection dropped after {got} of {end - start} bytes "
                         f"({type(e).__name__})", fix="rerun the command: the download resumes where it stopped") from None
    return got


def _read_exact(ref: RepoRef, revision: str, file: str, start: int, end: int) -> bytes:
    import io

    buf = io.BytesIO()
    got = _fetch(ref, revision, file, start, end, buf)
    if got != end - start:
        raise MtplxError(f"{ref.repo_id}: {file}: the response was truncated ({got} of {end - start} bytes of the "
                         "safetensors header)", fix="rerun the command")
    return buf.getvalue()


def _remote_header(ref: RepoRef, revision: str, file: str) -> tuple[dict[str, Any], int]:
    (length,) = struct.unpack("<Q", _read_exact(ref, revision, file, 0, 8))
    if not 2 <= length <= 100 * 2**20:
        raise MtplxError(f"{ref.repo_id}: {file} is not a safetensors file (header length {length})",
                         fix="check that the repository is an original Hugging Face checkpoint")
    try:
        header = json.loads(_read_exact(ref, revision, file, 8, 8 + length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MtplxError(f"{ref.repo_id}: {file} has an unreadable safetensors header",
                         fix="check that the repository is an original Hugging Face checkpoint") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def _runs(header: dict[str, Any], data_start: int) -> list[Run]:
    tensors = sorted(((n, e) for n, e in header.items() if n.startswith("mtp.")), key=lambda t: t[1]["data_offsets"][0])
    runs: list[Run] = []
    for name, entry in tensors:
        begin, end = (data_start + o for o in entry["data_offsets"])
        if runs and begin - runs[-1].end <= MERGE_GAP:
            runs[-1].end = max(runs[-1].end, end)
        else:
            runs.append(Run(begin, end))
        runs[-1].tensors.append(Tensor(name, entry["dtype"], entry["shape"], begin, end))
    return runs


def small_files(ref: RepoRef, progress: Progress | None = None) -> Path:
    """Config, tokenizer and weight index of a checkpoint, through the Hugging Face cache."""
    progress = progress or Progress.silent()
    progress.phase(f"Reading {ref}: config, tokenizer and weight index ...")
    small = snapshot(ref, SMALL_FILES, progress)
    if not (small / "config.json").is_file():
        raise MtplxError(f"{ref.repo_id} has no config.json: it is not a Hugging Face checkpoint",
                         fix="pass the original checkpoint's repo id (e.g. Qwen/Qwen3.5-4B)")
    return small


def is_original_checkpoint(small: Path) -> bool:
    """Whether a repo's small files (:func:`small_files`) are those of an original checkpoint with
    an MTP head: no mtplx contract, and ``mtp.*`` tensors in the weight index."""
    if (small / "mtplx_runtime.json").is_file() or not (small / INDEX_FILE).is_file():
        return False
    try:
        weight_map = json.loads((small / INDEX_FILE).read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(weight_map, dict) and any(str(name).startswith("mtp.") for name in weight_map)


def plan_head(ref: RepoRef, small: Path, progress: Progress | None = None) -> HeadPlan:
    """Where the mtp.* tensors lie: the index names the shards, their headers the offsets."""
    progress = progress or Progress.silent()
    index = small / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({f for n, f in weight_map.items() if n.startswith("mtp.")})
    else:
        shards = ["model.safetensors"]
    if not shards:
        raise MtplxError(f"{ref.repo_id} has no MTP head (no mtp.* tensors in {INDEX_FILE})",
                         fix="use the original Hugging Face checkpoint; MLX conversions and most quantized "
                             "re-uploads drop the mtp.* tensors")
    progress.phase(f"Reading the safetensors headers of {len(shards)} shard(s) of {ref.repo_id} ...")
    revision = small.name  # snapshots/<commit sha>
    runs = {}
    for shard in shards:
        header, data_start = _remote_header(ref, revision, shard)
        runs[shard] = _runs(header, data_start)
    if not any(runs.values()):
        raise MtplxError(f"{ref.repo_id} has no MTP head (its shards hold no mtp.* tensors)",
                         fix="use the original Hugging Face checkpoint; MLX conversions and most quantized "
                             "re-uploads drop the mtp.* tensors")
    return HeadPlan(ref=ref, revision=revision, snapshot=small, runs=runs)


def _fetch_run(plan: HeadPlan, shard: str, run: Run, staging: Path, bar) -> Path:
    """One run's bytes in ``staging``, resuming a ``.part`` file a previous attempt left."""
    done = staging / f"{shard}.{run.start}-{run.end}.bin"
    if done.is_file() and done.stat().st_size == run.size:
        bar.update(run.size)
        return done
    part = done.with_suffix(".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > run.size:
        part.unlink()
        have = 0
    bar.update(have)
    with open(part, "ab") as sink:
        got = _fetch(plan.ref, plan.revision, shard, run.start + have, run.end, sink, bar) if have < run.size else 0
    if have + got != run.size:
        raise MtplxError(f"{plan.ref.repo_id}: {shard}: the response was truncated ({have + got} of {run.size} bytes of "
                         "the MTP tensors arrived)", fix="rerun the command: the download resumes where it stopped")
    os.replace(part, done)
    return done


def _assemble(plan: HeadPlan, pieces: dict[str, list[tuple[Run, Path]]], out: Path) -> None:
    """The fetched tensors as one safetensors file (bytes unchanged, offsets renumbered), the
    small files beside it, and an index naming that file for every mtp.* tensor."""
    pieces_in_order = [(run, file) for runs in pieces.values() for run, file in runs]
    entries, offset = {}, 0
    for run, _ in pieces_in_order:
        for t in run.tensors:
            entries[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.end - t.start]}
            offset += t.end - t.start
    header = json.dumps({"__metadata__": {"format": "pt", "source": f"{plan.ref.repo_id}@{plan.revision}"}, **entries},
                        separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(out / HEAD_FILE, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for run, file in pieces_in_order:  # streamed: an MoE head is more than a gigabyte
            with open(file, "rb") as src:
                for t in run.tensors:
                    src.seek(t.start - run.start)
                    _copy_exactly(src, f, t.end - t.start)
    for src in plan.snapshot.iterdir():
        if src.is_file() and src.name != INDEX_FILE:
            shutil.copyfile(src, out / src.name)
    index = {"metadata": {"total_size": offset, "fetched_from": f"{plan.ref.repo_id}@{plan.revision}"},
             "weight_map": {name: HEAD_FILE for name in entries}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_exactly(src, dst, n: int) -> None:
    while n:
        chunk = src.read(min(n, 1 << 24))
        if not chunk:
            raise MtplxError("a fetched piece of the MTP tensors is shorter than planned", path=src.name,
                             fix="delete it and rerun the command")
        dst.write(chunk)
        n -= len(chunk)


def source_provenance(repo_id: str, revision: str, small: Path) -> dict[str, Any]:
    from mtplx.artifact.tensors import checkpoint_digest

    return {"kind": "huggingface", "repo_id": repo_id, "revision": revision, "digest": checkpoint_digest(small)}


def fetch_head_source(ref: RepoRef, cache: Path, progress: Progress | None = None,
                      plan: HeadPlan | None = None) -> HeadSource:
    """A local checkpoint holding only the source's MTP tensors (plus its small files),
    kept under ``<cache>/sources/<org>--<name>/<commit>``: a second graft, or one with
    HF_HUB_OFFLINE=1, reads it without touching the network. ``plan``: the head's plan when
    the caller has already read it (:func:`plan_head`), so its files and headers are not read
    again; the fetch is then of the commit that plan resolved."""
    progress = progress or Progress.silent()
    small = plan.snapshot if plan is not None else small_files(ref, progress)
    revision = small.name
    final = head_source_dir(cache, ref, revision)
    provenance = source_provenance(ref.repo_id, revision, small)
    if (final / INDEX_FILE).is_file():
        progress.phase(f"The MTP tensors of {ref.repo_id}@{revision[:12]} are cached ({final})")
        return HeadSource(final, provenance)
    plan = plan or plan_head(ref, small, progress)
    staging = sources_dir(cache) / ".staging" / f"{ref.folder}--{revision}"
    staging.mkdir(parents=True, exist_ok=True)
    total = plan.tensor_bytes
    progress.phase(f"Fetching the MTP tensors of {ref.repo_id}: {total / 2**20:.1f} MiB by byte range from "
                   f"{len(plan.runs)} shard(s), not the whole shards ...")
    pieces: dict[str, list[tuple[Run, Path]]] = {}
    with progress.byte_bar(total, "mtp.* tensors") as bar:
        for shard, runs in plan.runs.items():
            pieces[shard] = [(run, _fetch_run(plan, shard, run, staging, bar)) for run in runs]
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{revision[:12]}-", dir=final.parent))
    build.chmod(0o755)
    try:
        _assemble(plan, pieces, build)
        try:
            os.replace(build, final)
        except OSError:
            if not (final / INDEX_FILE).is_file():  # else another process finished the same fetch first
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)  # already gone once moved into place
    shutil.rmtree(staging, ignore_errors=True)
    return HeadSource(final, provenance)
