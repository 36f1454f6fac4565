"""Trunk and MTP head composed: what the engine drives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mtplx.model.draft_vocab import DraftVocab
from mtplx.model.mtp_head import MTPHead
from mtplx.model.trunk import BlockStates, Trunk


@dataclass
class ModelCache:
    """Every cache of one sequence: the trunk's (KV + Gated-DeltaNet) and the head's KV."""

    trunk: list[Any]
    head: list[KVCache]

    @property
    def offset(self) -> int:
        """Tokens the trunk has consumed (read from a full-attention layer's KV cache)."""
        return next(c.offset for c in self.trunk if isinstance(c, KVCache))


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
        t = self.trunk
        projection = t.body.embed_tokens if t.args.tie_word_embeddings else t.text.lm_head
        self.draft_vocab = DraftVocab(ids, projection)

    @property
    def draft_vocab_size(self) -> int:
        return self.draft_vocab.size if self.draft_vocab is not None else self.vocab_size

    @property
    def has_mtp(self) -> bool:
        return self.head is not None

    @property
    def vocab_size(self) -> int:
        return self.trunk.args.vocab_size

    @property
    def max_context(self) -> int:
        return self.trunk.args.max_position_embeddings

    def make_cache(self) -> ModelCache:
        head_layers = len(self.head.layers) if self.head is not None else 0
        return ModelCache(trunk=self.trunk.make_cache(), head=[KVCache() for _ in range(head_layers)])

    def trunk_forward(self, tokens: mx.array, cache: ModelCache, states: BlockStates | None = None) -> tuple[mx.array, mx.array]:
        return self.trunk.forward(tokens, cache.trunk, self.hidden_source, states)

    def draft(self, hidden: mx.array, tokens: mx.array, cache: ModelCache, last_only: bool = False) -> tuple[mx.array, mx.array]:
        """Head rows (trunk-or-chain hidden at t, token t+1) -> (draft logits, hidden to chain).

        The logits are over the draft vocabulary: all V tokens, or the K of :attr:`draft_vocab`
        (column j is token ``draft_vocab.ids[j]``). ``last_only`` projects only the last row:
        the engine feeds the rows committed by the last verify together with the new one and
        drafts from the new one."""
        normed, pre = self.head(self.trunk.embed(tokens), hidden, cache.head)
        chain = normed if self.chain_hidden == "post_norm" else pre
        if last_only:
            normed, chain = normed[:, -1:], chain[:, -1:]
        project = self.draft_vocab if self.draft_vocab is not None else self.trunk.lm_head
        return project(normed), chain
