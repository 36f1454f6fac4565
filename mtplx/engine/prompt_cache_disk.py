"""The prompt cache's disk tier: a conversation outlives the server.

It sits behind the memory LRU (:class:`mtplx.engine.prompt_cache.PromptCacheLRU`): one store in
two tiers. Every cache checked in is also written here; a request whose prompt a file serves
further than any cache in memory loads that file.

Layout under the root (``mtplx serve --prompt-cache-dir``)::

    <root>/<model>/<key>.safetensors   one conversation's cache (format: prompt_cache_file.py)
    <root>/<model>/<key>.json          its index entry

``<model>`` is the first 16 hex digits of the cache identity (prompt_cache.cache_identity: the
artifact's hashes, and the KV quantization, ``kv_bits``, when there is one), so two models or
two KV settings never share a folder; the file carries the whole identity, checked at load. ``<key>`` is the prefix hash of all the cache's tokens.

**Prefix hash** of ``n`` tokens: sha256 of the first ``n`` token ids as little-endian uint32,
first 32 hex digits. **Index entry**: ``{"format": "mtplx-prompt-cache-index", "version": 1,
"tokens": N, "prefixes": {"<position>": "<prefix hash>"}}`` with one position per place the cache
can resume from (PromptCache.reusable): its length and each snapshot's position.

**Lookup** (cheap: no cache file is read to find one): in memory, ``(position, prefix hash) ->
keys`` from every index entry. A prompt is hashed once, incrementally, taking a digest at each
indexed position short of its last token; the longest position whose digest is indexed names
the file. Each lookup lists the folder and reads only index entries it has not seen (another
server's), and forgets those gone. The chosen file is then loaded and checked (format, version,
model identity, checksum) and its tokens compared with the prompt by PromptCache.reusable, so a
hash collision is a miss, never a wrong answer.

**Loading** happens at checkout, on the engine thread (reading a few MB and checking their
checksum). Before that, when the request is queued, :meth:`PromptCacheDisk.prefetch` has a
reader thread read the file it will load, so the engine thread's read comes from the page cache.

**Writing** never happens on the engine thread. :meth:`PromptCacheDisk.put` (engine thread, at
checkin) takes copies of the KV rows (the only arrays the engine writes in place; the rest are
the cache's own immutable arrays after PromptCache.own) and hands them to one writer thread
through a bounded queue; when it is full the write is dropped (memory still has the cache). The
writer writes the file, then its index entry, each atomically (a temporary file in the same
folder, fsync, os.replace): a reader, another server sharing the folder included, sees a whole
file or none. Then it deletes the files the new one supersedes (whose tokens it extends), and
evicts the least recently used files of the whole root (by mtime: a load touches its file) until
the root is within its bound.

**Refused files**: one from another model, a damaged one, or one from another format or mtplx
version is logged in one line (logger ``mtplx.prompt_cache``), deleted, and the request prefills
cold.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.prompt_cache_file import cache_arrays, load_prompt_cache, write_file
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import MTPModel

log = logging.getLogger("mtplx.prompt_cache")

INDEX_FORMAT = "mtplx-prompt-cache-index"
INDEX_VERSION = 1
DEFAULT_MAX_BYTES = 10 * 2**30
DEFAULT_FREE_SHARE = 0.25
WRITE_QUEUE = 2  # caches waiting for the writer, each a copy of its KV rows
STALE_TMP_S = 3600  # a temporary file this old is a crashed writer's
# The only names the tier reads, counts or deletes: whatever else the folder holds (a user may
# point --prompt-cache-dir at a folder of their own) is left alone.
_MODEL_DIR = re.compile(r"[0-9a-f]{16}")
_FILE = re.compile(r"([0-9a-f]{32})\.(safetensors|json)")
_TMP = re.compile(r"\.[0-9a-f]{32}\.(safetensors|json)\.\d+\.\d+\.tmp")


def default_max_bytes(root: Path) -> int:
    """The tier's default bound: 10 GiB, or a quarter of the disk space it may use (the free
    space plus what the root already holds), whichever is less."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return DEFAULT_MAX_BYTES
    return int(min(DEFAULT_MAX_BYTES, (free + _root_bytes(Path(root))) * DEFAULT_FREE_SHARE))


def _root_bytes(root: Path) -> int:
    try:
        return sum(f.stat().st_size for f in root.glob("*/*")
                   if _MODEL_DIR.fullmatch(f.parent.name) and _FILE.fullmatch(f.name) and f.is_file())
    except OSError:
        return 0


def prefix_hashes(tokens: list[int], positions: Iterable[int]) -> dict[int, str]:
    """The prefix hash of ``tokens[:p]`` for each position ``p`` (those past the end skipped),
    in one pass over the tokens."""
    data = array.array("I", tokens)  # token ids are below 2**32
    if sys.byteorder == "big":
        data.byteswap()
    view, width = memoryview(data).cast("B"), data.itemsize
    h, done, out = hashlib.sha256(), 0, {}
    for p in sorted(set(positions)):
        if p > len(tokens):
            break
        h.update(view[done * width: p * width])
        done = p
        out[p] = h.copy().hexdigest()[:32]
    return out


def _reason(e: MtplxError) -> str:
    """An error's own sentence, without its path and its fix (the tier deletes the file)."""
    text = str(e)
    if e.path and text.startswith(f"{e.path}: "):
        text = text[len(e.path) + 2:]
    return text.split(" Fix: ")[0].rstrip(".")


class PromptCacheDisk:
    """Prompt caches on disk for one model (see the module docstring). ``root``: the folder,
    shared by models and servers; ``identity``: the caches' (prompt_cache.cache_identity: the
    model's, and ``kv_bits`` / ``kv_group_size``, how their attention KV is stored, so each KV
    setting has its own folder); ``max_bytes``: the bound on everything under ``root``."""

    def __init__(self, root: str | Path, identity: str, max_bytes: int, *, write_queue: int = WRITE_QUEUE,
                 kv_bits: int | None = None, kv_group_size: int = 64):
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.root = Path(root).expanduser()
        self.dir = self.root / identity[:16]
        self.identity = identity
        self.max_bytes = max_bytes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MtplxError(f"the prompt cache folder cannot be created ({e.strerror or e})", path=self.root,
                             fix="pass --prompt-cache-dir a folder you can write to, or 'none' to keep prompt "
                                 "caches in memory only") from None
        self._lock = threading.RLock()  # _scan deletes a bad entry under it
        self._entries: dict[str, dict[int, str]] = {}  # key -> {position: prefix hash}
        self._by_prefix: dict[tuple[int, str], set[str]] = {}
        self._seen: dict[str, float] = {}  # index file name -> its mtime when read
        self.writes = self.dropped = self.loads = self.refused = self.evictions = 0
        self._writes: queue.Queue[Any] = queue.Queue(maxsize=write_queue)
        self._reads: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._writer = threading.Thread(target=self._write_loop, name="mtplx-prompt-cache-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="mtplx-prompt-cache-reader", daemon=True)
        self._closed = False
        self._writer.start()
        self._reader.start()

    # -- index -------------------------------------------------------------------------------

    def _add(self, key: str, prefixes: dict[int, str]) -> None:
        self._drop(key)
        self._entries[key] = prefixes
        for p, h in prefixes.items():
            self._by_prefix.setdefault((p, h), set()).add(key)

    def _drop(self, key: str) -> None:
        for p, h in self._entries.pop(key, {}).items():
            keys = self._by_prefix.get((p, h))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_prefix[(p, h)]

    def _scan(self) -> None:
        """Bring the index up to the folder (under the lock): read new or changed index entries,
        forget those gone."""
        try:
            found = {e.name: e.stat().st_mtime for e in os.scandir(self.dir)
                     if e.name.endswith(".json") and _FILE.fullmatch(e.name)}
        except OSError:
            found = {}
        for name in [n for n in self._seen if n not in found]:
            del self._seen[name]
            self._drop(name[:-5])
        for name, mtime in found.items():
            if self._seen.get(name) == mtime:
                continue
            self._seen[name] = mtime
            try:
                entry = json.loads((self.dir / name).read_text())
                if entry.get("format") != INDEX_FORMAT or entry.get("version") != INDEX_VERSION:
                    raise ValueError(f"not a version {INDEX_VERSION} index entry")
                prefixes = {int(p): str(h) for p, h in entry["prefixes"].items()}
            except FileNotFoundError:
                continue  # evicted meanwhile
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("mtplx: prompt cache index %s not used (%s); it and its file are deleted",
                            self.dir / name, e)
                self._delete(name[:-5])
                continue
            self._add(name[:-5], prefixes)

    def lookup(self, prompt: list[int]) -> tuple[str, int] | None:
        """The file serving the longest prefix of ``prompt`` and that prefix's length, by the
        index (the file is not read)."""
        with self._lock:
            self._scan()
            positions = {p for p, _ in self._by_prefix if 0 < p < len(prompt)}
            digests = prefix_hashes(prompt, positions)
            for p in sorted(digests, reverse=True):
                keys = self._by_prefix.get((p, digests[p]))
                if keys:
                    return min(keys), p
        return None

    # -- reads -------------------------------------------------------------------------------

    def load(self, prompt: list[int], model: MTPModel, longer_than: int = 0) -> PromptCache | None:
        """The cache from the file serving the longest prefix of ``prompt``, if it serves more
        than ``longer_than`` tokens; None otherwise, or when the file is refused (logged once,
        deleted: the request prefills cold)."""
        found = self.lookup(prompt)
        if found is None or found[1] <= longer_than:
            return None
        key, _ = found
        path = self.dir / f"{key}.safetensors"
        try:
            cache = load_prompt_cache(path, model, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)
        except MtplxError as e:
            if not path.is_file():  # another server evicted it meanwhile: a plain miss
                with self._lock:
                    self._drop(key)
                return None
            log.warning("mtplx: prompt cache file %s not used (%s); it is deleted and this request prefills cold",
                        path, _reason(e))
            self.refused += 1
            self._delete(key)
            return None
        if cache.reusable(prompt) <= longer_than:
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        self.loads += 1
        return cache

    def prefetch(self, prompt: list[int]) -> None:
        """Have the reader thread read the file a later :meth:`load` of ``prompt`` would load,
        so the engine thread's read comes from the page cache; dropped when the reader is busy."""
        try:
            self._reads.put_nowait(list(prompt))
        except queue.Full:
            pass

    def _read_loop(self) -> None:
        while (prompt := self._reads.get()) is not None:
            try:
                found = self.lookup(prompt)
                if found is not None:
                    with open(self.dir / f"{found[0]}.safetensors", "rb") as f:
                        while f.read(1 << 22):
                            pass
            except Exception:  # noqa: BLE001 - a prefetch is a hint; load reports what matters
                pass

    # -- writes ------------------------------------------------------------------------------

    def put(self, cache: PromptCache) -> None:
        """Queue ``cache`` for writing, on the engine thread: after PromptCache.own, its KV rows
        are copied here and everything else is already immutable. Nothing is written when the
        file exists (touched instead) or the queue is full (counted in ``dropped``)."""
        if self._closed or not cache.tokens:
            return
        positions = [len(cache.tokens), *cache.snapshots]
        prefixes = prefix_hashes(cache.tokens, positions)
        key = prefixes[len(cache.tokens)]
        with self._lock:
            known = key in self._entries
        if known:
            self._enqueue(("touch", key))
            return
        if self._writes.full():
            self.dropped += 1
            return
        arrays, metadata = cache_arrays(cache, copy=True)
        if sum(a.nbytes for a in arrays.values()) > self.max_bytes:  # it alone would not fit
            self.dropped += 1
            return
        self._enqueue(("write", key, arrays, metadata, prefixes, list(cache.tokens)))

    def _enqueue(self, job: tuple) -> None:
        try:
            self._writes.put_nowait(job)
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        self._writes.join()

    def close(self) -> None:
        """Finish the queued writes and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)
        self._reads.put(None)
        self._writer.join(timeout=60)
        self._reader.join(timeout=5)

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            try:
                if job is None:
                    return
                if job[0] == "touch":
                    os.utime(self.dir / f"{job[1]}.safetensors")
                else:
                    self._write(*job[1:])
            except FileNotFoundError:
                pass  # touched a file another server evicted
            except Exception as e:  # noqa: BLE001 - a full disk costs the tier, never the server
                log.warning("mtplx: a prompt cache could not be written to %s (%s); it stays in memory only",
                            self.dir, e)
            finally:
                self._writes.task_done()

    def _write(self, key: str, arrays: dict, metadata: dict[str, str], prefixes: dict[int, str],
               tokens: list[int]) -> None:
        path = self.dir / f"{key}.safetensors"
        if not path.is_file():  # another server may have written the same tokens: the same file
            write_file(path, arrays, metadata)
        entry = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tokens": len(tokens),
                 "prefixes": {str(p): h for p, h in sorted(prefixes.items())}}
        index = self.dir / f"{key}.json"
        tmp = index.with_name(f".{index.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index)
        self.writes += 1
        with self._lock:
            self._add(key, prefixes)
            self._seen[index.name] = index.stat().st_mtime
            # Files whose whole tokens this one extends: superseded, as in the memory tier.
            ends = {k: max(p) for k, p in self._entries.items() if k != key and p and max(p) <= len(tokens)}
            digests = prefix_hashes(tokens, ends.values())
            stale = [k for k, end in ends.items() if digests.get(end) == k]
        for k in stale:
            self._delete(k)
        self._evict()

    def _delete(self, key: str, folder: Path | None = None) -> None:
        folder = folder or self.dir
        for suffix in (".json", ".safetensors"):  # the index entry first: a lookup never finds a missing file
            try:
                (folder / f"{key}{suffix}").unlink()
            except FileNotFoundError:
                pass
        if folder == self.dir:
            with self._lock:
                self._drop(key)

    def _evict(self) -> None:
        """Delete least recently used caches (of any model) until the root is within its bound."""
        groups: dict[tuple[Path, str], list[float]] = {}  # (folder, key) -> [bytes, mtime]
        total, now = 0, time.time()
        for folder in [d for d in self.root.iterdir() if _MODEL_DIR.fullmatch(d.name) and d.is_dir()]:
            for e in os.scandir(folder):
                tmp = _TMP.fullmatch(e.name)
                if not (tmp or _FILE.fullmatch(e.name)):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if tmp:  # a write in progress, or a crashed writer's once old
                    if now - st.st_mtime > STALE_TMP_S:
                        Path(e.path).unlink(missing_ok=True)
                    else:
                        total += st.st_size
                    continue
                total += st.st_size
                g = groups.setdefault((folder, e.name.rsplit(".", 1)[0]), [0, 0.0])
                g[0] += st.st_size
                if e.name.endswith(".safetensors"):
                    g[1] = st.st_mtime
        for (folder, key), (size, _) in sorted(groups.items(), key=lambda kv: kv[1][1]):
            if total <= self.max_bytes:
                break
            self._delete(key, folder)
            total -= size
            self.evictions += 1
