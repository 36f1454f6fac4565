"""How many rows fit: the bytes a row's caches need, the longest request memory holds, and
``--max-batch``'s default.

A row holds its own caches: every full-attention layer's keys and values over its tokens (the
trunk's, at the server's kv_bits, and the MTP head's, full precision), and every Gated-DeltaNet
layer's recurrent state and conv window (fixed size, however long the row). The weights are
shared by all rows. The per-layer sizes are the bytes model's (``mtplx.model.shapes``, through
``mtplx.artifact.inspect.cache_bytes``, which ``mtplx inspect`` reports from), read off the
loaded model's config.

A row is counted at its prompt plus its ``max_tokens`` (all it may grow to), on every route:
each builds a :class:`~mtplx.server.core.Generation` and ``Core.submit`` admits it. A request
that could not fit even alone is refused there, before it queues or prefills
(:meth:`Capacity.admit`): running it would be an out-of-memory crash, not a slow answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlx.utils import tree_flatten

from mtplx.artifact.inspect import cache_bytes, tokens_that_fit
from mtplx.core.knobs import check_kv
from mtplx.server.http_errors import APIError

# The default --max-batch plans each row at this many tokens (prompt + reply); rows longer than
# that still run, and a row joins only while the rows' caches fit (see Capacity.fits). Rows may
# take inspect.ROW_SHARE of the memory the weights and the prompt caches leave (row_budget).
PLAN_TOKENS = 8192
MAX_DEFAULT_BATCH = 8  # past this, a step over more rows stops being nearly free even on a GPU


def weight_bytes(model: Any) -> int:
    parts = [model.trunk.model] + ([model.head] if model.head is not None else [])
    return sum(v.nbytes for p in parts for _, v in tree_flatten(p.parameters()))


def _text_config(model: Any) -> dict[str, Any]:
    args = model.trunk.args
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))


def _head_layers(model: Any) -> int:
    return len(model.head.layers) if model.head is not None else 0


def row_bytes(model: Any, tokens: int, kv_bits: int | None = None, kv_group_size: int = 64) -> int:
    """Bytes one row's caches hold at ``tokens`` tokens, its trunk's KV stored at ``kv_bits``
    (None: bf16; 8 or 4: mlx-lm's QuantizedKVCache, groups of ``kv_group_size``)."""
    return cache_bytes(_text_config(model), tokens, _head_layers(model), kv_bits, kv_group_size)


class Capacity:
    """The memory rows may take: ``budget`` bytes, the trunk's KV stored at ``kv_bits``;
    ``admit`` refuses a request that cannot fit alone, ``fits`` says whether one more row joins."""

    def __init__(self, model: Any, budget: int, kv_bits: int | None = None, kv_group_size: int = 64,
                 prompt_cache_bytes: int = 0):
        check_kv(kv_bits, kv_group_size)
        self.model = model
        self.budget = budget
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.prompt_cache_bytes = prompt_cache_bytes  # what the budget was sized after (a refusal names it)

    @classmethod
    def of_machine(cls, model: Any, prompt_cache_bytes: int = 0, kv_bits: int | None = None,
                   kv_group_size: int = 64) -> "Capacity":
        from mtplx.artifact.inspect import row_budget
        from mtplx.core.device import machine_memory_bytes

        return cls(model, row_budget(machine_memory_bytes(), weight_bytes(model), prompt_cache_bytes),
                   kv_bits, kv_group_size, prompt_cache_bytes)

    def row(self, prompt_tokens: int, max_tokens: int) -> int:
        return row_bytes(self.model, min(prompt_tokens + max_tokens, self.model.max_context), self.kv_bits,
                         self.kv_group_size)

    def max_tokens(self) -> int:
        """The longest row (prompt + reply) whose caches fit the budget alone, at most the context."""
        return min(tokens_that_fit(_text_config(self.model), self.budget, _head_layers(self.model), self.kv_bits,
                                   self.kv_group_size), self.model.max_context)

    def admit(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise a 400 when a row of ``prompt_tokens`` + ``max_tokens`` could not fit even alone,
        naming the limit and the ways under it."""
        limit = self.max_tokens()
        if prompt_tokens + max_tokens <= limit:
            return
        per_token = self.row(1, 0) - self.row(0, 0)
        stored = "bf16" if self.kv_bits is None else f"{self.kv_bits}-bit"
        held = (f"this machine's memory holds the caches of at most {limit} tokens per request for this model "
                f"({per_token} bytes per token with {stored} KV, in {self.budget / 2**30:.2f} GiB left for requests "
                "after the weights and the prompt caches)")
        fixes = []
        if 1 < limit <= prompt_tokens:
            fixes.append(f"send a prompt of fewer than {limit} tokens")
        elif limit > prompt_tokens:
            fixes.append(f"send a shorter prompt, or max_tokens of at most {limit - prompt_tokens} for this prompt")
        smaller = {None: "`mtplx serve --kv-bits 8` or `--kv-bits 4`", 8: "`mtplx serve --kv-bits 4`"}
        if self.kv_bits in smaller:
            fixes.append(f"restart the server with {smaller[self.kv_bits]}, which stores the KV cache in fewer bytes")
        if self.prompt_cache_bytes > 0:
            fixes.append(f"give the prompt caches less memory (--prompt-cache-gb; they hold "
                         f"{self.prompt_cache_bytes / 2**30:.2f} GiB now)")
        if limit <= 1:
            fixes.append("serve a smaller model: its weights leave no room for a request")
        raise APIError(400, f"This request needs the caches of {prompt_tokens} prompt tokens + {max_tokens} "
                            f"max_tokens = {prompt_tokens + max_tokens} tokens, but {held}. "
                            f"Fix: {'; or '.join(fixes)}.",
                       code="context_length_exceeded")

    def fits(self, need: int, held: int, running: int) -> bool:
        """A row needing ``need`` bytes joins ``running`` rows holding ``held``; alone it always
        runs (``admit`` has already refused any row larger than the budget)."""
        return running == 0 or held + need <= self.budget

    def default_max_batch(self) -> int:
        """Rows of PLAN_TOKENS tokens that fit, between 1 and MAX_DEFAULT_BATCH."""
        per_row = max(self.row(min(PLAN_TOKENS, self.model.max_context), 0), 1)
        return max(1, min(MAX_DEFAULT_BATCH, self.budget // per_row))
