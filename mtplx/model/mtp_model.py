"""Trunk and MTP head composed: what the engine drives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mtplx.errors import MtplxError
from mtplx.core import knobs
from mtplx.model import kv_quant, rows
from mtplx.model.draft_vocab import DraftVocab
from mtplx.model.mtp_head import MTPHead
from mtplx.model.gated_delta_cache import GatedDeltaCache
from mtplx.model.trunk import Trunk, VerifyRecord, cache_arrays


def kv_nbytes(c: KVCache | QuantizedKVCache) -> int:
    """Bytes of the rows a KV cache holds (its buffers are allocated ahead, in steps)."""
    return kv_quant.nbytes(c)


@dataclass
class ModelCache:
    """Every cache of one sequence: the trunk's (KV + Gated-DeltaNet) and the head's KV.

    Head row i pairs the trunk hidden at position ``head_start + i`` with the token after it,
    so the hiddens of the last positions wait in ``backlog [1, r, H]`` until their rows enter the
    head's cache; ``backlog_tokens`` are the r-1 already-consumed tokens that follow all but the
    last of them (the last one's successor is the next token fed). ``head_start`` (0 unless a
    cold prefill kept only the prompt's last positions: knobs.head_window) plus the head's rows
    plus the backlog always make every position the trunk has consumed."""

    trunk: list[Any]
    head: list[KVCache]  # full precision whatever kv_bits (kv_quant.py says why)
    backlog: mx.array | None = None
    backlog_tokens: list[int] = field(default_factory=list)
    head_start: int = 0

    @property
    def offset(self) -> int:
        """Tokens the trunk has consumed (read from a full-attention layer's KV cache)."""
        return next(c.offset for c in self.trunk if kv_quant.is_kv(c))

    def arrays(self) -> list[mx.array]:
        """Every array held, for one mx.eval."""
        return cache_arrays(self.trunk) + cache_arrays(self.head) + ([self.backlog] if self.backlog is not None else [])

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds for its tokens (KV rows up to the offset, states, pending)."""
        total = self.backlog.nbytes if self.backlog is not None else 0
        return total + sum(c.nbytes if isinstance(c, GatedDeltaCache) else kv_nbytes(c) for c in self.trunk + self.head)

    def fork(self) -> "ModelCache":
        """A copy that can be advanced (and rolled back) independently of this one, sharing
        arrays until then. KV buffers are written in place past their offset, so this cache
        must not be advanced while the fork is in use."""
        return ModelCache(trunk=[c.fork() if isinstance(c, GatedDeltaCache) else kv_quant.fork(c) for c in self.trunk],
                          head=[kv_quant.fork(c) for c in self.head], backlog=self.backlog,
                          backlog_tokens=list(self.backlog_tokens), head_start=self.head_start)

    def realign_head_start(self) -> None:
        """Set ``head_start`` from what the caches hold (after a cut, a copy or a load): the
        positions the head's rows and its backlog do not cover came before them."""
        backlog = self.backlog.shape[1] if self.backlog is not None else 0
        self.head_start = self.offset - self.head[0].offset - backlog if self.head else 0

    def _first_head_row(self, start: int, end: int, prompt_len: int) -> int:
        """The first position of a prompt piece ``[start, end)`` whose head row this prefill makes:
        ``start``, or, while the head's cache is still empty, no earlier than the prompt's last
        ``knobs.head_window()`` positions (``end``: none of the piece). The head then starts there,
        so its cache never has a gap."""
        window = knobs.head_window()
        if not window or self.backlog is not None or (self.head and self.head[0].offset):
            return start
        first = min(max(start, prompt_len - window), end)
        self.head_start = first
        return first

    def take_prompt_rows(self, hidden: mx.array, ids: list[int], start: int, end: int,
                         prompt_len: int) -> tuple[mx.array, mx.array] | None:
        """The head rows a prompt piece ``[start, end)`` makes, from its trunk hiddens
        ``[1, end - start, H]`` and its tokens: (row hiddens, their successor tokens) to fill, or
        None. Row i pairs the hidden at i with token i+1, so the piece's last hidden waits in the
        backlog for the token after it (the next piece's first, or the sampled one); a piece
        before the head's window makes no row and leaves the backlog alone."""
        skip = self._first_head_row(start, end, prompt_len) - start
        if skip == end - start:
            return None
        if self.backlog is None:  # the head's first rows: the first is this piece's (or the window's) first
            rows, successors = hidden[:, skip:], list(ids[skip + 1:])
        else:
            rows, successors = mx.concatenate([self.backlog, hidden[:, skip:]], axis=1), self.backlog_tokens + list(ids)
        self.backlog, self.backlog_tokens = rows[:, -1:], []
        return (rows[:, :-1], mx.array(successors)[None]) if successors else None


def _check_draft_ids(ids: Any, vocab_size: int) -> mx.array:
    """Draft vocabulary ids as int32, or :class:`MtplxError`: a duplicate id would scatter two
    subset columns onto one token and leave q too small there (the output inexact), so they
    must be integers, sorted, unique and inside the vocabulary."""
    ids = mx.array(ids)
    if ids.ndim != 1 or ids.size == 0 or not mx.issubdtype(ids.dtype, mx.integer):
        raise MtplxError(f"draft vocabulary ids must be a non-empty 1-D array of integers, got shape "
                         f"{tuple(ids.shape)} of {ids.dtype}", fix="pass token ids such as mx.arange(1024)")
    if ids.size > 1 and not bool(mx.all(ids[1:] > ids[:-1]).item()):
        raise MtplxError("draft vocabulary ids must be sorted and unique", fix="pass sorted(set(ids))")
    low, high = int(ids[0].item()), int(ids[-1].item())
    if low < 0 or high >= vocab_size:
        raise MtplxError(f"draft vocabulary ids must lie in [0, {vocab_size}), got {low if low < 0 else high}",
                         fix="pass token ids of this model's vocabulary")
    return ids.astype(mx.int32)


class MTPModel:
    """A loaded artifact: trunk + head + the conventions of its contract."""

    def __init__(self, trunk: Trunk, head: MTPHead | None, contract: Any | None, path: str | None = None):
        self.trunk = trunk
        self.head = head
        self.contract = contract
        self.path = path
        conventions = contract.data["conventions"] if contract else {}
        self.hidden_source = conventions.get("hidden_source", "post_norm")
        self.chain_hidden = conventions.get("chain_hidden", "post_norm")
        self.draft_vocab: DraftVocab | None = None

    def set_draft_vocab(self, ids: mx.array | None) -> None:
        """Draft from the token ids ``ids`` only (int, unique, in [0, V)); ``None`` restores the
        full vocabulary. :meth:`draft` then returns logits over the subset."""
        if ids is None:
            self.draft_vocab = None
            return
        ids = _check_draft_ids(ids, self.vocab_size)
        t = self.trunk
        projection = t.body.embed_tokens if t.args.tie_word_embeddings else t.text.lm_head
        self.draft_vocab = DraftVocab(ids, projection)

    @property
    def has_mtp(self) -> bool:
        return self.head is not None

    @property
    def vocab_size(self) -> int:
        return self.trunk.args.vocab_size

    @property
    def max_context(self) -> int:
        return self.trunk.args.max_position_embeddings

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE) -> ModelCache:
        """Empty caches for one sequence; ``kv_bits`` 8 or 4 stores the trunk's attention KV
        quantized (mtplx/model/kv_quant.py; the head's stays full precision)."""
        head_layers = len(self.head.layers) if self.head is not None else 0
        return ModelCache(trunk=self.trunk.make_cache(kv_bits, kv_group_size),
                          head=[KVCache() for _ in range(head_layers)])

    def trunk_forward(self, tokens: mx.array, cache: ModelCache, record: VerifyRecord | None = None) -> tuple[mx.array, mx.array]:
        """Logits at every position and the hidden the head reads (see Trunk.forward)."""
        return self.trunk.forward(tokens, cache.trunk, self.hidden_source, record)

    def trunk_hidden(self, tokens: mx.array, cache: ModelCache, record: VerifyRecord | None = None) -> tuple[mx.array, mx.array]:
        """(hidden the head reads, hidden after the final norm: the lm_head's input), no logits."""
        return self.trunk_rows([rows.Segment(tokens, cache.trunk, record)])

    def trunk_rows(self, segments: list[rows.Segment]) -> tuple[mx.array, mx.array]:
        """:meth:`trunk_hidden` for several sequences in one ragged pass (mtplx/model/rows.py):
        each segment's hiddens, concatenated in order ``[1, N, H]``."""
        pre, post = rows.trunk_pass(self.trunk, segments)
        return (post if self.hidden_source == "post_norm" else pre), post

    def fill_head(self, hidden: mx.array, tokens: mx.array, cache: ModelCache) -> None:
        """Head rows (trunk hidden at t, token t+1) into the head's KV cache, outputs skipped."""
        self.fill_head_rows([hidden], [tokens], [cache])

    def fill_head_rows(self, hiddens: list[mx.array], tokens: list[mx.array], caches: list[ModelCache]) -> None:
        """:meth:`fill_head` for several sequences in one ragged pass."""
        rows.head_fill(self.head, self.trunk.embed(rows.join(tokens)), rows.join(hiddens), [c.head for c in caches],
                       [t.shape[1] for t in tokens])

    def draft(self, hidden: mx.array, tokens: mx.array, cache: ModelCache) -> tuple[mx.array, mx.array]:
        """Head rows (trunk-or-chain hidden at t, token t+1) -> (draft logits, hidden to chain) at
        every row (the acceptance probe and the cache-equality reference read them all; a
        decoding step drafts from the last row only: :meth:`draft_rows`).

        The logits are over the draft vocabulary: all V tokens, or the K of :attr:`draft_vocab`
        (column j is token ``draft_vocab.ids[j]``)."""
        normed, pre = self.head(self.trunk.embed(tokens), hidden, cache.head)
        return self._project(normed, pre)

    def draft_rows(self, hiddens: list[mx.array], tokens: list[mx.array], caches: list[ModelCache]) -> tuple[mx.array, mx.array]:
        """A draft step for several sequences in one ragged pass: row j's rows (hiddens[j]
        [1, r_j, H], tokens[j] [1, r_j]) -> draft logits of its last row and its chain hidden, as
        ``[1, rows, K]`` and ``[1, rows, H]`` (row j at index j). The earlier rows (committed by
        the last verify) only fill the head's KV cache: nothing drafts from them."""
        fill = [j for j, t in enumerate(tokens) if t.shape[1] > 1]
        if fill:
            self.fill_head_rows([hiddens[j][:, :-1] for j in fill], [tokens[j][:, :-1] for j in fill],
                                [caches[j] for j in fill])
        last_h = rows.join([h[:, -1:] if h.shape[1] > 1 else h for h in hiddens])
        last_t = rows.join([t[:, -1:] if t.shape[1] > 1 else t for t in tokens])
        normed, pre = rows.head_pass(self.head, self.trunk.embed(last_t), last_h, [c.head for c in caches],
                                     [1] * len(caches))
        return self._project(normed, pre)

    def _project(self, normed: mx.array, pre: mx.array) -> tuple[mx.array, mx.array]:
        chain = normed if self.chain_hidden == "post_norm" else pre
        project = self.draft_vocab if self.draft_vocab is not None else self.trunk.lm_head
        return project(normed), chain
