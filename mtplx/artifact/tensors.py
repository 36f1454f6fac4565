"""Safetensors bookkeeping: which file holds which tensor, and hashes of stored bytes.

Hashes are taken over the bytes exactly as stored (quantized weights, scales and biases
included), read straight from the file: no dtype conversion can hide a change.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from mtplx.errors import ArtifactError

_CHUNK = 1 << 24


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of ``path`` and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read the safetensors header ({e})", path=path,
                            fix="the file is damaged or not a safetensors file: rebuild or re-download it") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def check_complete(files: list[Path]) -> None:
    """Each safetensors file as long as its header says (headers only, no tensor bytes read): a
    truncated download is named here, before a loader trips over it mid-load."""
    for f in files:
        header, data_start = read_header(f)
        end = data_start + max((int(e["data_offsets"][1]) for e in header.values() if isinstance(e, dict)
                                and "data_offsets" in e), default=0)
        size = f.stat().st_size
        if size < end:
            raise ArtifactError(f"the file is truncated: {size} bytes where its header describes {end}", path=f,
                                fix="re-download it (an interrupted download?) or rebuild the artifact with `mtplx graft`")


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of a (possibly sharded) checkpoint to the file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ArtifactError("no safetensors weights found", path=model_dir,
                            fix="point at a directory holding model.safetensors (or shards with an index)")
    mapping: dict[str, Path] = {}
    for f in files:
        for name in read_header(f)[0]:
            mapping[name] = f
    return mapping


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(path: Path, name: str) -> str:
    """sha256 of one tensor's stored bytes."""
    header, data_start = read_header(path)
    if name not in header:
        raise ArtifactError(f"tensor '{name}' is not in this file", path=path,
                            fix="the checkpoint index is out of date: rebuild the artifact")
    begin, end = header[name]["data_offsets"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        remaining = end - begin
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise ArtifactError(f"tensor '{name}' is truncated", path=path, fix="rebuild or re-download the file")
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def head_dependencies(files: dict[str, Path]) -> list[str]:
    """The trunk tensors the MTP head reads: the token embedding and the output projection."""
    names = sorted(n for n in files if ".embed_tokens." in n or n.startswith(("lm_head.", "language_model.lm_head.")))
    if not names:
        raise ArtifactError("the trunk has no embed_tokens tensor", path=next(iter(files.values())).parent,
                            fix="point at an MLX Qwen3.5 trunk (converted with mlx-lm)")
    return names


def trunk_dependency_hashes(model_dir: Path) -> dict[str, str]:
    files = weight_files(model_dir)
    return {name: sha256_tensor(files[name], name) for name in head_dependencies(files)}


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 over a checkpoint's config.json and weight index: what identifies a local source
    (the same files on the Hub give the same digest)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = Path(model_dir) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()
