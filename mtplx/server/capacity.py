"""How many rows fit: the bytes a row's caches need, and ``--max-batch``'s default.

A row holds its own caches: every full-attention layer's keys and values over its tokens (the
trunk's and the MTP head's), and every Gated-DeltaNet layer's recurrent state and conv window
(fixed size, however long the row). The weights are shared by all rows. The per-layer sizes are
the bytes model's (``mtplx.model.shapes``), read off the loaded model's config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlx.utils import tree_flatten

# The default --max-batch plans each row at this many tokens (prompt + reply); rows longer than
# that still run, and a row joins only while the rows' caches fit (see Capacity.fits).
PLAN_TOKENS = 8192
MAX_DEFAULT_BATCH = 8  # past this, a step over more rows stops being nearly free even on a GPU
# Of the memory left after the weights and the prompt caches, rows may take this share (the rest
# is the activations of a step and the system's).
ROW_SHARE = 0.5


def weight_bytes(model: Any) -> int:
    parts = [model.trunk.model] + ([model.head] if model.head is not None else [])
    return sum(v.nbytes for p in parts for _, v in tree_flatten(p.parameters()))


def row_bytes(model: Any, tokens: int) -> int:
    """Bytes one row's caches hold at ``tokens`` tokens."""
    from mtplx.model.shapes import ShapeBytes
    from mtplx.model.shapes import FULL, LINEAR, kind_counts

    args = model.trunk.args
    tc = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    counts = kind_counts(tc)
    shape = ShapeBytes(tc, weights=None, counts=counts, draft_vocab=0, context=tokens)  # type: ignore[arg-type]
    head_layers = len(model.head.layers) if model.head is not None else 0
    return int(counts[LINEAR] * (shape.state_bytes() + shape.conv_bytes())
               + (counts[FULL] + head_layers) * shape.kv_row_bytes() * tokens)


class Capacity:
    """The memory rows may take: ``budget`` bytes; ``fits`` says whether one more row joins."""

    def __init__(self, model: Any, budget: int):
        self.model = model
        self.budget = budget

    @classmethod
    def of_machine(cls, model: Any, prompt_cache_bytes: int = 0) -> "Capacity":
        from mtplx.artifact.inspect import machine_memory_bytes

        free = machine_memory_bytes() - weight_bytes(model) - prompt_cache_bytes
        return cls(model, max(int(free * ROW_SHARE), 0))

    def row(self, prompt_tokens: int, max_tokens: int) -> int:
        return row_bytes(self.model, min(prompt_tokens + max_tokens, self.model.max_context))

    def fits(self, need: int, held: int, running: int) -> bool:
        """A row needing ``need`` bytes joins ``running`` rows holding ``held``; alone it always runs
        (a row larger than the budget would otherwise never run)."""
        return running == 0 or held + need <= self.budget

    def default_max_batch(self) -> int:
        """Rows of PLAN_TOKENS tokens that fit, between 1 and MAX_DEFAULT_BATCH."""
        per_row = max(row_bytes(self.model, min(PLAN_TOKENS, self.model.max_context)), 1)
        return max(1, min(MAX_DEFAULT_BATCH, self.budget // per_row))
