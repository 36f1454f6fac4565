"""The trunk: mlx-lm's Qwen3.5 model, run so that it also returns hidden states.

mlx-lm's forward returns logits for every position. The engine needs more and less than that:
the hidden state at every position (after the final norm or before it, per the contract's
``hidden_source``) for the MTP head; logits only where it samples (every verified position,
but only the last prompt position in a prefill); and, in the verify pass, what a rollback of
the Gated-DeltaNet layers needs (mtplx/model/gated_delta_cache.py). So this module walks
mlx-lm's own layers (same weights, same modules) with those changes.

In a distributed run (mtplx/distributed/) the trunk is one stage of a pipeline: it holds only
its own layer range (mlx-lm's ``pipeline``), and its ``stage`` says where a pass's input comes
from (token ids, or the previous rank's hidden state) and where its output goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache

from mtplx.core import knobs
from mtplx.model import kv_quant, rows
from mtplx.model.gated_delta_cache import GatedDeltaCache, GatedDeltaRecord


@dataclass
class VerifyRecord:
    """What one verify pass over a block of ``tokens`` positions keeps for the rollback:
    a record per Gated-DeltaNet layer, by layer index."""

    tokens: int = 0
    layers: dict[int, GatedDeltaRecord] = field(default_factory=dict)
    # What the commit kept (set by engine/cache.py): a pipeline's leader tells the other ranks.
    accepted: int | None = None


def materialize(cache: list[Any]) -> None:
    """Apply every pending Gated-DeltaNet prefix, so mlx-lm's own layers can read the cache."""
    for c in cache:
        if isinstance(c, GatedDeltaCache):
            c.materialize()


def cache_arrays(cache: list[Any]) -> list[mx.array]:
    """Every array of a trunk or head cache, for one mx.eval."""
    out = []
    for c in cache:
        if isinstance(c, GatedDeltaCache):
            out += c.arrays()
        elif kv_quant.is_kv(c):
            out += kv_quant.parts(c)
    return out


class Trunk:
    """A Qwen3.5 / Qwen3.5-MoE model loaded by mlx-lm, seen as the target of speculation."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.text = model.language_model
        self.body = self.text.model
        self.args = self.text.args
        # A pipeline stage (mtplx/distributed/stage.py) when this process holds only some of
        # the layers: ``enter`` gives a pass its input, ``leave`` passes its output on.
        self.stage: Any = None

    @property
    def layers(self) -> list[nn.Module]:
        """The layers this process runs: all of them, or its range of a pipeline split."""
        return self.body.pipeline_layers

    def check_kv(self, kv_bits: int | None, kv_group_size: int) -> tuple[int | None, int]:
        """``knobs.check_kv``, and the group size must divide the attention head size (the
        quantization groups run along it)."""
        kv_bits, kv_group_size = knobs.check_kv(kv_bits, kv_group_size)
        if kv_bits is not None and self.stage is not None:  # the other ranks make their own caches, unquantized
            raise knobs.KnobError("kv_bits", "kv_bits is not supported in a distributed run (--distributed)",
                                  fix="drop --kv-bits (kv_bits=None) with --distributed")
        head_dim = getattr(self.args, "head_dim", None)
        if kv_bits is not None and head_dim and head_dim % kv_group_size:
            fits = [g for g in knobs.KV_GROUP_SIZES if head_dim % g == 0]
            raise knobs.KnobError("kv_group_size", f"kv_group_size {kv_group_size} does not divide this model's "
                                  f"attention head size ({head_dim})",
                                  fix=f"pass kv_group_size {' or '.join(map(str, fits))}" if fits
                                  else "use kv_bits=None: no group size divides this model's head size")
        return kv_bits, kv_group_size

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE) -> list[Any]:
        """mlx-lm's caches (of this process's layers), with each Gated-DeltaNet one able to
        hold a pending prefix and, with ``kv_bits``, each attention one quantized (kv_quant.py)."""
        kv_bits, kv_group_size = self.check_kv(kv_bits, kv_group_size)
        if self.stage is not None:
            self.stage.new_sequence()
        return [GatedDeltaCache() if isinstance(c, ArraysCache)
                else kv_quant.make(kv_bits, kv_group_size) if isinstance(c, KVCache) and kv_bits is not None else c
                for c in self.model.make_cache()]

    def embed(self, tokens: mx.array) -> mx.array:
        return self.body.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.body.embed_tokens.as_linear(hidden)
        return self.text.lm_head(hidden)

    def logits(self, tokens: mx.array, cache: list[Any]) -> mx.array:
        """mlx-lm's own forward: the AR path, with nothing extra computed. (mlx-lm's pipelined
        forward assumes every rank knows the tokens; a stage's ranks do not, so a stage walks
        the same layers through :meth:`hidden`.)"""
        if self.stage is not None:
            return self.lm_head(self.hidden(tokens, cache)[1])
        materialize(cache)
        return self.model(tokens, cache=cache)

    def hidden(
        self, tokens: mx.array, cache: list[Any], record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array]:
        """(hidden before the final norm, hidden after it) for a block ``tokens [1, T]``, no
        logits. With ``record``, the Gated-DeltaNet layers run the verify-block forward and
        leave in it what a rollback needs; without, they apply any pending prefix first. The
        one-row case of the ragged pass (mtplx/model/rows.py), which follows mlx-lm's layers."""
        return rows.trunk_pass(self, [rows.Segment(tokens, cache, record)])

    def forward_all(
        self, tokens: mx.array, cache: list[Any], record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(logits at every position, hidden before the final norm, hidden after it)."""
        pre, post = self.hidden(tokens, cache, record)
        return self.lm_head(post), pre, post

    def forward(
        self, tokens: mx.array, cache: list[Any], hidden_source: str = "post_norm", record: VerifyRecord | None = None
    ) -> tuple[mx.array, mx.array]:
        """Logits at every position and the hidden state the MTP head reads."""
        logits, pre, post = self.forward_all(tokens, cache, record)
        return logits, (post if hidden_source == "post_norm" else pre)
