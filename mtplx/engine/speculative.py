"""The one-row API: :class:`Engine` decodes one sequence per call, as the decoder (batch.py) with
room for one row, at every depth: depth 0 is the decoder's plain (pipelined AR) lane, depth >= 1
(or a policy) its speculative step. There is no second loop: prefill, prompt checks, prompt-cache
setup, the first token and the plain lane are the decoder's. batch.py describes a step.

An engine keeps its random stream, policy and acceptance rule across calls, so a second
:meth:`Engine.generate` continues them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mtplx.core import knobs
from mtplx.engine.batch import BatchDecoder
from mtplx.engine.constraints import Constraint
from mtplx.engine.logprobs import LogprobReader
from mtplx.engine.policy import DepthPolicy, FixedDepth
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.row import Emitted, RowRequest, check_depth
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays
from mtplx.engine.stats import DecodeStats
from mtplx.model.mtp_model import ModelCache, MTPModel

__all__ = ["Emitted", "Engine"]


class Engine:
    """Decodes one sequence at a time. ``depth`` is a pinned integer (0 = plain AR) or a
    :class:`~mtplx.engine.policy.DepthPolicy` asked before every step. ``prefill_chunk``: prompt
    tokens per prefill pass (:data:`mtplx.core.knobs.PREFILL_CHUNK` by default); ``lookup``: drafts
    copied from the context (:mod:`mtplx.engine.lookup`); ``kv_bits`` / ``kv_group_size``: the
    trunk's attention KV stored quantized (:mod:`mtplx.model.kv_quant`)."""

    def __init__(
        self,
        model: MTPModel,
        depth: int | DepthPolicy,
        params: SamplingParams,
        draft_params: SamplingParams | None = None,
        seed: int | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        strict_greedy: float | None = None,
        prefill_chunk: int = knobs.PREFILL_CHUNK,
        lookup: int | str = 0,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        self.policy = check_depth(model, depth)
        self.model = model
        self.depth = self.policy.max_depth
        self.params = params
        # Greedy targets draft greedily: any q is exact, the argmax maximizes acceptance.
        self.draft_params = SamplingParams(temperature=0.0) if params.greedy else (draft_params or params)
        self.rng = Rng(seed)
        # logprobs: None = off (no device work), k = the token's log-probability and k alternatives.
        self.logprobs = LogprobReader(logprobs, model.vocab_size)
        # A policy other than a pinned depth chooses per step: stats report its mix of depths.
        self.adaptive = not isinstance(self.policy, FixedDepth)
        self.stats = DecodeStats(depth=self.depth, adaptive=self.adaptive)
        # The acceptance rule's device side, swappable so tests can prove they detect a biased one.
        self.acceptance_arrays = acceptance_arrays
        # The live caches of the current generation (inspected by the cache-equality tests).
        self.cache: ModelCache | None = None
        # A grammar that masks p and q (response_format); None decodes unconstrained.
        self.constraint = constraint
        # Strict greedy's margin (engine/strict.py; None: off).
        self.strict_greedy = strict_greedy
        self.prefill_chunk = knobs.check("prefill_chunk", prefill_chunk)
        # Drafts copied from the context (engine/lookup.py): 0 off, N up to N a step, "auto".
        self.lookup = knobs.check("lookup", lookup)
        self.kv_bits, self.kv_group_size = model.trunk.check_kv(kv_bits, kv_group_size)

    def generate(self, prompt: list[int], max_tokens: int, eos: Iterable[int] = (),
                 prompt_cache: PromptCache | None = None, snapshot_at: Iterable[int] = ()) -> Iterator[Emitted]:
        """Yield tokens step by step until ``max_tokens`` are out or an EOS token is emitted
        (the EOS token is the last one yielded). The total is exactly ``max_tokens`` otherwise.

        With ``prompt_cache``, only the part of ``prompt`` it does not already hold is prefilled,
        and afterwards it holds the prompt and the reply (as far as the trunk consumed it);
        ``snapshot_at`` adds prompt positions where it keeps a snapshot (see prompt_cache.py)."""
        # A decoder per call: a generation abandoned unclosed cannot hold the next one's slot.
        decoder = BatchDecoder(self.model, max_batch=1, prefill_chunk=self.prefill_chunk)
        row = decoder.add(RowRequest(
            prompt=prompt, max_tokens=max_tokens, params=self.params, depth=self.policy,
            draft_params=self.draft_params, eos=frozenset(eos), constraint=self.constraint,
            logprobs=self.logprobs.k, prompt_cache=prompt_cache, snapshot_at=tuple(snapshot_at),
            strict_greedy=self.strict_greedy, lookup=self.lookup, kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size))
        # The row draws from this engine's stream and uses its acceptance rule, so a later call
        # continues them.
        row.rng, row.acceptance_arrays = self.rng, self.acceptance_arrays
        self.stats, self.cache = row.stats, row.cache
        try:
            while not row.done:
                for _, emitted in decoder.step():
                    yield emitted
        finally:
            decoder.remove(row)  # leaves the prompt cache holding what the trunk consumed
