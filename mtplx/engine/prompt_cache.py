"""Prompt caches: a conversation never prefills the same tokens twice.

A :class:`PromptCache` holds every cache a generation needs for a token prefix: the trunk's
attention KV and Gated-DeltaNet conv/recurrent states, the MTP head's KV cache, and the trunk
hiddens whose head rows are still pending (``ModelCache.backlog``). A call whose prompt extends
the cached tokens prefills only the new suffix; afterwards the cache holds prompt + reply (as
far as the trunk consumed it), so the next chat turn extends it again.

When a new prompt diverges from the cached tokens (an edited or regenerated last message, a
chat template that re-renders the previous assistant turn differently), attention KV can be
trimmed but the Gated-DeltaNet states cannot be cut back: they are one state for the whole
prefix. So the cache keeps snapshots of those states (references to immutable arrays: taking
one copies nothing) at reuse boundaries:
- before the last token of every prompt, i.e. before the reply: a regenerated reply, or a
  template that renders the previous reply differently, resumes there and prefills from there;
- at the end of a chat's system/tools prefix (mtplx.generation.chat_template.reuse_boundaries), so
  conversations sharing only that prefix reuse it, however short;
- every ``snapshot_interval`` tokens of a long prompt, so an edit deep inside a long document
  keeps the part before it.
The longest usable prefix is then: all cached tokens when the prompt extends them, else the
latest snapshot at or before the first differing token. At least the prompt's last token is
always prefilled, since its logits are what the first sampled token comes from.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import mlx.core as mx

from mtplx.errors import MtplxError
from mtplx.core import knobs
from mtplx.model import kv_quant
from mtplx.model.gated_delta_cache import GatedDeltaCache
from mtplx.model.mtp_model import ModelCache, MTPModel

SNAPSHOT_INTERVAL = 4096
MAX_SNAPSHOTS = 8


def model_identity(model: MTPModel) -> str:
    """What a cache's contents depend on: the weights (by the artifact's provenance hashes, or
    the trunk's config and files when there is no contract), the hidden the head reads, and
    whether a head is loaded."""
    contract = getattr(model, "contract", None)
    if contract is not None:
        weights = {k: contract.provenance.get(k) for k in ("sidecar_sha256", "trunk_tensors_sha256")}
    else:
        files = sorted(Path(model.path).glob("*.safetensors")) if model.path else []
        weights = {"config": {k: v for k, v in vars(model.trunk.args).items() if isinstance(v, (int, float, str, bool))},
                   "files": [(f.name, f.stat().st_size) for f in files]}
    key = {"weights": weights, "hidden_source": model.hidden_source, "head": model.has_mtp}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def copy_array(a: mx.array) -> mx.array:
    """``a`` in a buffer of its own (evaluated). mx.array(a) copies an evaluated array, but of
    an unevaluated one it makes an alias, which evaluates to a view of the same parent."""
    mx.eval(a)
    out = mx.array(a)
    mx.eval(out)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Snapshot:
    """The non-trimmable part of the caches after ``position`` tokens."""

    gated_delta: dict[int, list[mx.array]]  # trunk layer index -> [conv state, recurrent state]
    head_offset: int
    backlog: mx.array | None
    backlog_tokens: list[int] = field(default_factory=list)
    owned: bool = False  # its arrays are copies of their own (PromptCache.own), not views

    def arrays(self) -> list[mx.array]:
        out = [a for states in self.gated_delta.values() for a in states if a is not None]
        return out + ([self.backlog] if self.backlog is not None else [])


def cache_identity(model: MTPModel, kv_bits: int | None = None,
                   kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE) -> str:
    """What a prompt cache's contents depend on: the model (:func:`model_identity`) and the KV
    quantization its attention rows are stored with, so a file or a disk folder written with
    one ``kv_bits`` never serves another."""
    return kv_quant.identity(model_identity(model), kv_bits, kv_group_size)


class PromptCache:
    """The caches of one token prefix, reusable by later generations on the same model.

    Use one per conversation (``mtplx.make_prompt_cache(model)``) and pass it as
    ``prompt_cache=`` to generate / stream_generate. Not thread-safe: one generation at a time
    (PromptCacheLRU hands each request its own). ``kv_bits`` / ``kv_group_size``: how its
    attention KV is stored (mtplx/model/kv_quant.py); only generations with the same setting
    may use it."""

    def __init__(self, model: MTPModel, *, snapshot_interval: int = SNAPSHOT_INTERVAL,
                 max_snapshots: int = MAX_SNAPSHOTS, kv_bits: int | None = None,
                 kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE):
        if snapshot_interval < 1 or max_snapshots < 1:
            raise MtplxError("snapshot_interval and max_snapshots must be >= 1")
        self.kv_bits, self.kv_group_size = knobs.check_kv(kv_bits, kv_group_size)
        self.identity = cache_identity(model, self.kv_bits, self.kv_group_size)
        self.snapshot_interval = snapshot_interval
        self.max_snapshots = max_snapshots
        self._make_cache = lambda: model.make_cache(self.kv_bits, self.kv_group_size)
        self.cache: ModelCache = self._make_cache()
        self.tokens: list[int] = []  # the tokens the trunk has consumed
        self.snapshots: dict[int, Snapshot] = {}

    # -- reuse ------------------------------------------------------------------------------

    def check_model(self, model: MTPModel) -> None:
        if model.trunk.stage is not None:  # forks, snapshots and trims would have to reach every rank
            raise MtplxError("prompt caches are not supported in a distributed run (--distributed)",
                             fix="generate without a prompt cache")
        if cache_identity(model, self.kv_bits, self.kv_group_size) != self.identity:
            raise MtplxError("this prompt cache was built with another model (or another head setting)",
                             fix="make a new one with mtplx.make_prompt_cache(model)")

    def check_kv(self, kv_bits: int | None, kv_group_size: int) -> None:
        """Refuse a generation whose KV quantization is not the one this cache holds: its rows
        would be read as another target's."""
        if (kv_bits, kv_group_size if kv_bits is not None else None) != \
                (self.kv_bits, self.kv_group_size if self.kv_bits is not None else None):
            raise MtplxError(f"this prompt cache holds attention KV stored with "
                             f"{kv_quant.describe(self.kv_bits, self.kv_group_size)}, and the generation asks for "
                             f"{kv_quant.describe(kv_bits, kv_group_size)}",
                             fix=f"generate with {kv_quant.describe(self.kv_bits, self.kv_group_size)}, or make a new "
                                 f"cache with mtplx.make_prompt_cache(model, kv_bits={kv_bits!r})")

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` this cache can serve without a prefill."""
        common = common_prefix(self.tokens, prompt[: len(prompt) - 1])
        if common == len(self.tokens):
            return common
        return max((s for s in self.snapshots if s <= common), default=0)

    def prepare(self, model: MTPModel, prompt: list[int]) -> int:
        """Bring the caches to the longest reusable prefix of ``prompt``; returns its length."""
        if not self.consistent():
            self.reset()  # a generation was interrupted between a cache update and its record
        reuse = self.reusable(prompt)
        if reuse < len(self.tokens):
            self.restore(reuse)
        return reuse

    def consistent(self) -> bool:
        offset = self.cache.offset
        head = self.cache.head[0].offset if self.cache.head else None
        backlog = self.cache.backlog.shape[1] if self.cache.backlog is not None else 0
        return offset == len(self.tokens) and (head is None or not self.tokens
                                               or self.cache.head_start + head + backlog == offset)

    def reset(self) -> None:
        self.cache = self._make_cache()
        self.tokens = []
        self.snapshots = {}

    def restore(self, position: int) -> None:
        """Cut back to ``position`` tokens (0, or a snapshot's position)."""
        if position == 0:
            self.reset()
            return
        snap = self.snapshots[position]
        c = self.cache
        for i, layer in enumerate(c.trunk):
            if isinstance(layer, GatedDeltaCache):
                layer.cache, layer.pending = list(snap.gated_delta[i]), None
            else:
                layer.trim(layer.offset - position)
        for layer in c.head:
            layer.trim(layer.offset - snap.head_offset)
        c.backlog, c.backlog_tokens = snap.backlog, list(snap.backlog_tokens)
        c.realign_head_start()
        self.tokens = self.tokens[:position]
        self.snapshots = {s: v for s, v in self.snapshots.items() if s <= position}

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_stops(self, prompt_len: int, reused: int, extra: Iterable[int] = ()) -> tuple[list[int], Callable[[int], None]]:
        """Where a prefill of ``prompt[reused:]`` stops for snapshots (relative positions) and
        the callback it calls there; ``extra`` adds positions (where a caller knows the next
        prompt may diverge: see mtplx.generation.chat_template.reuse_boundaries)."""
        wanted = {prompt_len - 1, *(p for p in extra if 0 < p < prompt_len)}
        wanted |= set(range(self.snapshot_interval, prompt_len, self.snapshot_interval))
        if reused == prompt_len - 1 and reused > 0 and reused not in self.snapshots:
            self.take_snapshot(reused)  # the cache is already where the end-of-prompt snapshot goes
        stops = sorted(s - reused for s in wanted if s > reused)
        return stops, lambda k: self.take_snapshot(reused + k)

    def take_snapshot(self, position: int) -> None:
        c = self.cache
        gated = {}
        for i, layer in enumerate(c.trunk):
            if isinstance(layer, GatedDeltaCache):
                layer.materialize()
                gated[i] = list(layer.cache)
        self.snapshots[position] = Snapshot(gated_delta=gated, head_offset=c.head[0].offset if c.head else 0,
                                            backlog=c.backlog, backlog_tokens=list(c.backlog_tokens))
        while len(self.snapshots) > self.max_snapshots:
            # Evict from the middle: the smallest position is the prefix most conversations share
            # (a system prompt and tools), the largest ones serve a regenerated or re-rendered
            # last turn; those in between are the cheapest to lose.
            del self.snapshots[sorted(self.snapshots)[len(self.snapshots) // 2]]

    # -- copies and size --------------------------------------------------------------------

    def own(self) -> None:
        """Give every array a buffer of its own. A Gated-DeltaNet conv state or a backlog is a
        slice of the pass that made it (a prefill chunk's inputs or hiddens), and a slice keeps
        its whole parent alive: counted at its own size, it held many times that. The copies are
        evaluated here; a snapshot's states, immutable, are copied once."""
        copies: dict[int, mx.array] = {}  # an array shared by the cache and a snapshot stays shared

        def mine(a: mx.array | None) -> mx.array | None:
            if a is None:
                return None
            if id(a) not in copies:
                copies[id(a)] = copy_array(a)
            return copies[id(a)]

        c = self.cache
        for layer in c.trunk:
            if isinstance(layer, GatedDeltaCache):
                layer.materialize()
                layer.cache = [mine(a) for a in layer.cache]
        c.backlog = mine(c.backlog)
        for snap in self.snapshots.values():
            if not snap.owned:
                snap.gated_delta = {i: [mine(a) for a in states] for i, states in snap.gated_delta.items()}
                snap.backlog, snap.owned = mine(snap.backlog), True
        mx.eval(list(copies.values()))

    def copy_prefix(self, position: int) -> "PromptCache":
        """An independent cache holding the first ``position`` tokens (0, a snapshot's position,
        or all of them), sharing no buffer that either will write."""
        out = PromptCache.__new__(PromptCache)
        out.identity, out.snapshot_interval, out.max_snapshots = self.identity, self.snapshot_interval, self.max_snapshots
        out.kv_bits, out.kv_group_size = self.kv_bits, self.kv_group_size
        out._make_cache = self._make_cache
        out.reset()
        if position == 0:
            return out
        c = self.cache
        snap = None if position == len(self.tokens) else self.snapshots[position]
        trunk = []
        for i, layer in enumerate(c.trunk):
            if isinstance(layer, GatedDeltaCache):
                copy = GatedDeltaCache()
                if snap is None:
                    copy.cache, copy.pending = list(layer.cache), layer.pending
                else:
                    copy.cache = list(snap.gated_delta[i])
                trunk.append(copy)
            else:
                trunk.append(kv_quant.rows(layer, position))
        head_rows = c.head[0].offset if snap is None and c.head else (snap.head_offset if snap else 0)
        out.cache = ModelCache(trunk=trunk, head=[kv_quant.rows(h, head_rows) for h in c.head],
                               backlog=c.backlog if snap is None else snap.backlog,
                               backlog_tokens=list(c.backlog_tokens if snap is None else snap.backlog_tokens))
        out.cache.realign_head_start()
        out.tokens = self.tokens[:position]
        out.snapshots = {s: v for s, v in self.snapshots.items() if s <= position}
        # Copy the KV rows now: the source's buffers are written in place when it is extended.
        mx.eval(out.cache.arrays())
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: the caches and the snapshots' states (shared arrays counted once), KV
        buffers whole (they are allocated ahead, in steps, and a restore trims only the offset).
        Exact once :meth:`own` has run; before, a view's parent is not counted."""
        c = self.cache
        arrays = {id(a): a.nbytes for snap in self.snapshots.values() for a in snap.arrays()}
        for layer in c.trunk:
            if isinstance(layer, GatedDeltaCache):
                arrays.update({id(a): a.nbytes for a in layer.arrays()})
        if c.backlog is not None:
            arrays[id(c.backlog)] = c.backlog.nbytes
        for layer in c.trunk + c.head:
            if kv_quant.is_kv(layer):
                arrays.update({id(a): a.nbytes for a in kv_quant.parts(layer)})
        return sum(arrays.values())

    def __repr__(self) -> str:
        return f"PromptCache({len(self.tokens)} tokens, {len(self.snapshots)} snapshots, {self.nbytes / 2**20:.1f} MiB)"


class DiskTier(Protocol):
    """What the LRU needs of its disk tier (mtplx.engine.prompt_cache_disk.PromptCacheDisk)."""

    def load(self, prompt: list[int], model: MTPModel, longer_than: int) -> PromptCache | None: ...

    def put(self, cache: PromptCache) -> None: ...

    def prefetch(self, prompt: list[int]) -> None: ...

    def close(self) -> None: ...


class PromptCacheLRU:
    """Prompt caches of many conversations, least recently used first out, bounded in bytes.

    A request checks out the entry serving the longest prefix of its prompt and checks it back
    in when done, so no other request reads a cache while it is written. An entry the prompt
    extends is handed over as it is; one it diverges from inside is left in place for its own
    conversation and the request gets an independent copy of the reusable prefix.

    With a ``disk`` tier (mtplx.engine.prompt_cache_disk), every cache checked in is also
    written to disk (by the tier's own thread), and a checkout whose prompt a file serves
    further than any entry in memory loads that file: a conversation outlives the server."""

    def __init__(self, model: MTPModel, max_bytes: int, *, disk: DiskTier | None = None, **cache_kwargs: Any):
        self.model = model
        self.max_bytes = max_bytes
        self.disk = disk
        self.cache_kwargs = cache_kwargs
        self._entries: OrderedDict[int, tuple[PromptCache, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.disk_hits = 0

    def _best(self, prompt: list[int]) -> tuple[int | None, int]:
        best, reuse = None, 0
        for key, (entry, _) in self._entries.items():
            r = entry.reusable(prompt)
            if r > reuse:
                best, reuse = key, r
        return best, reuse

    def checkout(self, prompt: list[int]) -> PromptCache:
        if self.disk is not None:
            with self._lock:
                _, reuse = self._best(prompt)
            loaded = self.disk.load(prompt, self.model, reuse)  # None unless it serves more than memory
            if loaded is not None:
                for k, v in self.cache_kwargs.items():
                    setattr(loaded, k, v)
                with self._lock:
                    self.hits += 1
                    self.disk_hits += 1
                return loaded  # the request's own: the file stays for its conversation
        with self._lock:
            best, reuse = self._best(prompt)
            if best is None:
                self.misses += 1
                return PromptCache(self.model, **self.cache_kwargs)
            self.hits += 1
            entry, _ = self._entries[best]
            if reuse == len(entry.tokens):
                del self._entries[best]
                return entry
            self._entries.move_to_end(best)
        return entry.copy_prefix(reuse)

    def prefetch(self, prompt: list[int]) -> None:
        """A request's prompt, before it joins: the disk tier may read the file it will load
        meanwhile, on its own thread (any thread may call this)."""
        if self.disk is not None:
            self.disk.prefetch(prompt)

    def checkin(self, cache: PromptCache) -> None:
        if not cache.tokens or not cache.consistent():
            return
        cache.own()
        if self.disk is not None:
            self.disk.put(cache)  # copies taken now, written by the tier's thread
        size = cache.nbytes
        with self._lock:
            # An entry whose tokens this one extends is superseded by it.
            for key in [k for k, (e, _) in self._entries.items()
                        if len(e.tokens) <= len(cache.tokens) and cache.tokens[: len(e.tokens)] == e.tokens]:
                del self._entries[key]
            self._entries[id(cache)] = (cache, size)
            while self._entries and self._bytes() > self.max_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1

    def close(self) -> None:
        """Finish the disk tier's pending writes (a server that stops keeps its last turns)."""
        if self.disk is not None:
            self.disk.close()

    def _bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def check_prompt_cache(value: Any) -> None:
    """Raise :class:`MtplxError` unless ``value`` is a :class:`PromptCache` (a dict or a path
    would otherwise fail deep inside the engine)."""
    if not isinstance(value, PromptCache):
        raise MtplxError(f"prompt_cache is a {type(value).__name__}, not a PromptCache",
                         fix="make one with mtplx.make_prompt_cache(model) or load one with "
                             "mtplx.load_prompt_cache(path, model)")


def make_prompt_cache(model: MTPModel, **kwargs: Any) -> PromptCache:
    """A prompt cache for ``model``, in mlx-lm's style (see :class:`PromptCache`)."""
    return PromptCache(model, **kwargs)
