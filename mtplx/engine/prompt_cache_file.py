"""Prompt caches on disk: one safetensors file, loaded only into the model that wrote it.

mlx-lm's ``save_prompt_cache`` stores a list of per-layer caches; an mtplx cache also holds the
MTP head's KV cache, the head backlog and the Gated-DeltaNet snapshots, so the file has its own
documented layout (format version 2):

- arrays: ``trunk.{i}.keys`` / ``trunk.{i}.values`` (attention KV rows up to the offset; stored
  quantized, ``kv_bits`` 8 or 4, they are the packed data with ``.scales`` and ``.biases`` beside),
  ``trunk.{i}.conv`` / ``trunk.{i}.state`` (Gated-DeltaNet), ``head.{i}.keys`` /
  ``head.{i}.values``, ``backlog``, and per snapshot ``snap.{pos}.{i}.conv`` /
  ``snap.{pos}.{i}.state`` / ``snap.{pos}.backlog``;
- metadata: ``format`` = mtplx-prompt-cache, ``format_version``, ``mtplx_version``, ``model``
  (the cache identity hash of mtplx.engine.prompt_cache.cache_identity: the model's, and the KV
  quantization when there is one), ``kv_bits`` and ``kv_group_size`` (``none`` / the ints),
  ``layout``: JSON
  with the cached tokens, the backlog tokens and each snapshot's head offset and backlog tokens,
  and ``sha256``: a checksum of everything else (every other metadata field, then each array's
  name, dtype, shape and bytes, in name order), checked at load.

The file is safetensors whatever its name says (it is read with an explicit format, so
``cache.bin`` works), written by :func:`write_file` (a temporary file, fsync, os.replace; no
MLX op, so the disk tier's writer thread writes it: mtplx/engine/prompt_cache_disk.py). A file
that is damaged (the checksum catches bytes changed anywhere in the data, with the header
intact), written for another model (or head setting) or by another mtplx version is refused
with an :class:`MtplxError`; callers start cold then (never a wrong answer). So is a file
written with another ``kv_bits`` (or group size) than the one asked for: its rows belong to
another target.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import mlx.core as mx

from mtplx._version import __version__
from mtplx.engine.prompt_cache import PromptCache, Snapshot, cache_identity, check_prompt_cache, copy_array
from mtplx.errors import MtplxError
from mtplx.core import knobs
from mtplx.model import kv_quant
from mtplx.model.gated_delta_cache import GatedDeltaCache
from mtplx.model.mtp_model import MTPModel

FORMAT = "mtplx-prompt-cache"
FORMAT_VERSION = "2"  # 2: the sha256 checksum
_REBUILD = "delete it: the next run starts cold and writes a new one"


def _kv_arrays(prefix: str, c: object, out: dict[str, mx.array], copy: bool = False) -> None:
    for name, a in kv_quant.committed(c).items():
        # A copy holds the rows alone; mx.contiguous may return the view of the live buffer.
        out[f"{prefix}.{name}"] = copy_array(a) if copy else a


# safetensors' names of MLX dtypes (the file is written here, not by MLX: see write_file).
_ST_DTYPES = {mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
              mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.float16: "F16",
              mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64"}


def _digest(arrays: dict[str, mx.array], metadata: dict[str, str]) -> str:
    """The checksum of evaluated, row-contiguous arrays: reads their bytes and runs no MLX op,
    so a thread other than the engine's may compute it."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{key}={metadata[key]}\0".encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}\0".encode())
        h.update(memoryview(a))
    return h.hexdigest()


def _checksum(arrays: dict[str, mx.array], metadata: dict[str, str]) -> str:
    # The bytes as the file stores them (a slice is a view).
    dense = {name: mx.contiguous(a) for name, a in arrays.items()}
    mx.eval(list(dense.values()))
    return _digest(dense, metadata)


def cache_arrays(prompt_cache: PromptCache, *, copy: bool = False) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and metadata (all but the checksum) of ``prompt_cache``'s file, evaluated and
    row-contiguous. ``copy``: the KV rows are copies, not slices of the buffers the engine
    writes into as the cache grows; every other array is immutable (after PromptCache.own, also
    no slice of a larger one), so another thread may write them all while the cache goes on."""
    check_prompt_cache(prompt_cache)
    c = prompt_cache.cache
    arrays: dict[str, mx.array] = {}
    for i, layer in enumerate(c.trunk):
        if isinstance(layer, GatedDeltaCache):
            layer.materialize()
            if layer[0] is not None:
                arrays[f"trunk.{i}.conv"], arrays[f"trunk.{i}.state"] = layer[0], layer[1]
        else:
            _kv_arrays(f"trunk.{i}", layer, arrays, copy)
    for i, layer in enumerate(c.head):
        _kv_arrays(f"head.{i}", layer, arrays, copy)
    if c.backlog is not None:
        arrays["backlog"] = c.backlog
    snapshots = {}
    for pos, snap in prompt_cache.snapshots.items():
        for i, (conv, state) in snap.gated_delta.items():
            arrays[f"snap.{pos}.{i}.conv"], arrays[f"snap.{pos}.{i}.state"] = conv, state
        if snap.backlog is not None:
            arrays[f"snap.{pos}.backlog"] = snap.backlog
        snapshots[str(pos)] = {"head_offset": snap.head_offset, "backlog_tokens": snap.backlog_tokens}
    layout = {"tokens": prompt_cache.tokens, "backlog_tokens": c.backlog_tokens, "snapshots": snapshots}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "mtplx_version": __version__,
                "model": prompt_cache.identity, "layout": json.dumps(layout),
                "kv_bits": str(prompt_cache.kv_bits).lower(), "kv_group_size": str(prompt_cache.kv_group_size)}
    arrays = {name: mx.contiguous(a) for name, a in arrays.items()}
    mx.eval(list(arrays.values()))
    return arrays, metadata


def write_file(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> int:
    """Write a safetensors file of evaluated, row-contiguous ``arrays`` and ``metadata`` (plus
    its ``sha256``) at ``path`` atomically: into a temporary file in the same directory, fsync,
    then os.replace, so a reader (another server sharing the directory too) sees the old file,
    the new one or none, never a part. Runs no MLX op (the disk tier's writer thread calls it);
    Python's file writes and hashlib release the GIL. Returns the file's size."""
    metadata = {**metadata, "sha256": _digest(arrays, metadata)}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors asks
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in sorted(arrays):
                f.write(memoryview(arrays[name]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + offset


def save_prompt_cache(path: str | Path, prompt_cache: PromptCache) -> Path:
    """Write ``prompt_cache`` to ``path`` (atomically: a crash leaves the old file or none).
    Any file name works; the format is safetensors."""
    check_prompt_cache(prompt_cache)
    path = Path(path)
    arrays, metadata = cache_arrays(prompt_cache)
    try:
        write_file(path, arrays, metadata)
    except OSError as e:
        raise MtplxError(f"the prompt cache could not be written ({e})", path=path,
                         fix="choose a path in a directory you can write to, with space left") from None
    return path


def _read(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    if not path.is_file():
        raise MtplxError("no prompt cache file here", path=path, fix="run once without it to create it")
    try:
        # An explicit format: MLX would otherwise go by the extension and refuse "cache.bin".
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # noqa: BLE001 - MLX raises several types for a damaged file
        raise MtplxError(f"the prompt cache file cannot be read ({e})", path=path, fix=_REBUILD) from None


def load_prompt_cache(path: str | Path, model: MTPModel, *, kv_bits: int | None = None,
                      kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE) -> PromptCache:
    """The prompt cache saved at ``path``, for ``model`` decoding with ``kv_bits`` /
    ``kv_group_size`` (the file must have been written with the same); refuses a file that does
    not belong."""
    kv_bits, kv_group_size = knobs.check_kv(kv_bits, kv_group_size)
    path = Path(path)
    arrays, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise MtplxError("not an mtplx prompt cache file", path=path, fix=_REBUILD)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("mtplx_version") != __version__:
        raise MtplxError(f"the prompt cache was written by mtplx {meta.get('mtplx_version')} (format "
                         f"{meta.get('format_version')}), this is mtplx {__version__}", path=path, fix=_REBUILD)
    if meta.get("model") != cache_identity(model, kv_bits, kv_group_size):
        written = (meta.get("kv_bits", "none"), meta.get("kv_group_size", str(knobs.DEFAULT_KV_GROUP_SIZE)))
        if meta.get("model") == cache_identity(model, *_kv_of(written)):
            raise MtplxError(f"the prompt cache was written with kv_bits={written[0]} (group size {written[1]}); this "
                             f"run uses {kv_quant.describe(kv_bits, kv_group_size)}", path=path,
                             fix=f"pass kv_bits={written[0]} (--kv-bits {written[0]}) to use it, or {_REBUILD}")
        raise MtplxError("the prompt cache was written for another model (its hash does not match this one's)",
                         path=path, fix=_REBUILD)
    try:
        checksum = _checksum(arrays, meta)
    except Exception as e:  # noqa: BLE001 - a damaged array may fail to load while it is read
        raise MtplxError(f"the prompt cache file cannot be read ({e})", path=path, fix=_REBUILD) from None
    if meta.get("sha256") != checksum:
        raise MtplxError("the prompt cache file is damaged (its data does not match its sha256 checksum)",
                         path=path, fix=_REBUILD)
    try:
        return _rebuild(arrays, json.loads(meta["layout"]), model, kv_bits, kv_group_size)
    except (KeyError, ValueError, TypeError) as e:
        raise MtplxError(f"the prompt cache file is damaged ({type(e).__name__}: {e})", path=path, fix=_REBUILD) from None


def _kv_of(written: tuple[str, str]) -> tuple[int | None, int]:
    """The (kv_bits, kv_group_size) a file's metadata records, or the default for a value it
    cannot be (whose identity then matches nothing)."""
    try:
        return knobs.check_kv(None if written[0] == "none" else int(written[0]), int(written[1]))
    except (ValueError, MtplxError):
        return None, knobs.DEFAULT_KV_GROUP_SIZE


def _rebuild(arrays: dict[str, mx.array], layout: dict, model: MTPModel, kv_bits: int | None,
             kv_group_size: int) -> PromptCache:
    out = PromptCache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    c = out.cache
    for i, layer in enumerate(c.trunk):
        if isinstance(layer, GatedDeltaCache):
            if f"trunk.{i}.state" in arrays:
                layer.cache = [arrays[f"trunk.{i}.conv"], arrays[f"trunk.{i}.state"]]
        else:
            c.trunk[i] = kv_quant.from_committed(arrays, f"trunk.{i}", kv_bits, kv_group_size)
    # The head's KV is full precision whatever kv_bits (kv_quant.py).
    c.head = [kv_quant.from_committed(arrays, f"head.{i}", None, kv_group_size) for i in range(len(c.head))]
    c.backlog, c.backlog_tokens = arrays.get("backlog"), [int(t) for t in layout["backlog_tokens"]]
    out.tokens = [int(t) for t in layout["tokens"]]
    for pos, info in layout["snapshots"].items():
        gated = {i: [arrays[f"snap.{pos}.{i}.conv"], arrays[f"snap.{pos}.{i}.state"]]
                 for i, layer in enumerate(c.trunk) if isinstance(layer, GatedDeltaCache)}
        out.snapshots[int(pos)] = Snapshot(gated_delta=gated, head_offset=int(info["head_offset"]),
                                           backlog=arrays.get(f"snap.{pos}.backlog"),
                                           backlog_tokens=[int(t) for t in info["backlog_tokens"]])
    c.realign_head_start()
    if out.tokens and not (out.consistent() and 0 <= c.head_start <= len(out.tokens)):
        raise ValueError("its caches do not hold the number of tokens it records")
    return out
