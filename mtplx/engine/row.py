"""One row of the decoder: a request, its state between steps, and the checks it passes on the
way in. Shared by the decoder (batch.py), the one-row API (speculative.py), strict greedy
(strict.py) and the AR reference loop (reference.py), which is why it imports none of them.

A row's tokens depend only on its own request: its prompt, settings, random stream and policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from mtplx.core import knobs
from mtplx.engine.constraints import Constraint
from mtplx.engine.logprobs import LogprobReader, LogprobRows, TokenLogprob
from mtplx.engine.lookup import Lookup
from mtplx.engine.policy import DepthPolicy, FixedDepth, as_policy
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays
from mtplx.engine.stats import DecodeStats
from mtplx.errors import ContextOverflowError, MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import VerifyRecord

__all__ = ["BACKLOG_FLUSH", "Budget", "Emitted", "Row", "RowRequest", "Work", "check_depth", "check_prompt",
           "extend_backlog"]


@dataclass
class Emitted:
    """Tokens decided by one step (1 + accepted drafts), and the step's shape. ``logprobs``
    (when the row asked for them) is aligned with ``tokens``."""

    tokens: list[int]
    drafted: int
    accepted: int
    logprobs: list[TokenLogprob] | None = None


class Budget:
    """How many of a step's tokens may be emitted: at most ``remaining``, and none after EOS."""

    def __init__(self, remaining: int, eos: set[int]):
        self.remaining = remaining
        self.eos = eos
        self.done = remaining <= 0

    def take(self, tokens: list[int]) -> list[int]:
        kept = tokens[: self.remaining]
        for i, t in enumerate(kept):
            if t in self.eos:
                kept = kept[: i + 1]
                self.done = True
                break
        self.remaining -= len(kept)
        self.done = self.done or self.remaining <= 0
        return kept


# -- checks on the way in ------------------------------------------------------------------

def check_prompt(model: MTPModel, prompt: list[int]) -> list[int]:
    """The prompt as ints, or :class:`MtplxError`: empty, an id outside the embedding table
    (which would read past it: a crash on some backends, garbage on others), or no room left
    in the context for one token. The one prompt check of every decoding path."""
    if not prompt:
        raise MtplxError("the prompt is empty", fix="pass at least one token")
    ids = knobs.check_token_ids(prompt, model.vocab_size)
    if len(ids) >= model.max_context:
        raise ContextOverflowError(len(ids), model.max_context)
    return ids


def check_depth(model: MTPModel, depth: int | DepthPolicy) -> DepthPolicy:
    """``depth`` as a policy, or :class:`MtplxError` when it is negative or drafts on a model
    without a head."""
    policy = as_policy(depth)
    if policy.max_depth < 0:
        raise MtplxError(f"depth must be >= 0, got {policy.max_depth}", fix="use 0 for plain AR or 1..8 for MTP")
    if policy.max_depth > 0 and not model.has_mtp:
        raise MtplxError("this model has no MTP head, so it cannot draft", path=model.path,
                         fix="use depth 0 (--no-mtp) or load an mtplx artifact built with `mtplx graft`")
    return policy


# -- the head's backlog ----------------------------------------------------------------------

# Rows a run of plain steps leaves in the backlog before they are written to the head's cache:
# feeding them with the next draft is cheaper, but the backlog must not grow without bound
# (growing it by concatenation copies it whole at every token: O(n^2) over a reply).
BACKLOG_FLUSH = 8


def extend_backlog(model: MTPModel, cache: ModelCache, hidden: mx.array, token: int | list[int]) -> None:
    """Append committed positions (their head-input hiddens ``[1, r, H]``; ``token``: the r
    tokens they followed, or the one for r = 1)."""
    cache.backlog = mx.concatenate([cache.backlog, hidden], axis=1)
    cache.backlog_tokens = cache.backlog_tokens + ([token] if isinstance(token, int) else list(token))
    if cache.backlog.shape[1] > BACKLOG_FLUSH:
        model.fill_head(cache.backlog[:, :-1], mx.array([cache.backlog_tokens]), cache)
        cache.backlog, cache.backlog_tokens = cache.backlog[:, -1:], []


# -- the row ---------------------------------------------------------------------------------

@dataclass
class RowRequest:
    """One sequence to decode."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    depth: int | DepthPolicy = 2
    draft_params: SamplingParams | None = None
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    constraint: Constraint | None = None
    logprobs: int | None = None
    prompt_cache: PromptCache | None = None
    snapshot_at: tuple[int, ...] = ()
    # Strict greedy (strict.py): the top-2 margin at or under which a greedy token decided by a
    # verify row is decided again by a one-row pass; None: off. No effect at temperature > 0.
    strict_greedy: float | None = None
    # Drafts copied from the context (lookup.py): 0 off, N up to N tokens a step, "auto".
    lookup: int | str = 0
    # How the trunk's attention KV is stored (mtplx/model/kv_quant.py): None full precision, 8 or
    # 4 bits in groups of kv_group_size. A prompt cache must hold the same.
    kv_bits: int | None = None
    kv_group_size: int = 64


class Row:
    """A request inside the decoder. ``emitted``: every token it has output so far; ``done``:
    finished (EOS, budget) or removed; ``cache``: its live caches (None once it has left)."""

    def __init__(self, id: int, request: RowRequest, model: MTPModel):
        self.id = id
        self.request = request
        self.policy = as_policy(request.depth)
        self.depth = self.policy.max_depth
        self.stats = DecodeStats(depth=self.depth, adaptive=not isinstance(self.policy, FixedDepth),
                                 prompt_tokens=len(request.prompt))
        self.done = False
        self.error: BaseException | None = None  # what ended it, when its own host work raised (isolate_rows)
        self.cache: ModelCache | None = None
        self.emitted: list[int] = []
        params = request.params
        # Greedy targets draft greedily: any q is exact, the argmax maximizes acceptance.
        self.draft_params = SamplingParams(temperature=0.0) if params.greedy else (request.draft_params or params)
        self.rng = Rng(request.seed)
        self.logprobs = LogprobReader(request.logprobs, model.vocab_size)
        self.budget = Budget(min(request.max_tokens, model.max_context - len(request.prompt)), set(request.eos))
        self.constraint = request.constraint
        self.lookup = Lookup(request.lookup)
        # The acceptance rule's device side, swappable so tests can prove they detect a biased one.
        self.acceptance_arrays = acceptance_arrays
        self.pending: int | None = None  # sampled and emitted, not yet fed to the trunk
        self.fed: list[int] = []  # tokens the trunk consumed after the prompt
        self.chunks: list[tuple[int, int]] = []  # prompt pieces still to prefill ([start, end) of the prompt)
        self.at_stop: Callable[[int], None] | None = None
        self.stops: set[int] = set()
        self.reused = 0
        # Whether the row runs the pipelined plain lane (BatchDecoder._plain): the decoder decides
        # it on admission, since it depends on the batch (strict greedy, batch.py).
        self.plain = False
        # Whether it moves between the plain lane and speculative steps as its policy chooses
        # (an adaptive policy that may draft; batch.py decides on admission).
        self.switches = False
        # The head's cache is kept in step with the trunk only where it will be read: by a row
        # that may draft, or by a later call on the row's prompt cache.
        self.keeps_head = self.depth > 0 or request.prompt_cache is not None
        self.feed: mx.array | None = None  # plain lane: the token the next pass feeds (device)
        self.feed_lp: LogprobRows | None = None  # ... its logprob rows, when it is still unread
        self.unread = False  # ... whether ``feed`` is still to be read and emitted

    @property
    def prefilling(self) -> bool:
        return self.pending is None

    @property
    def consumed(self) -> list[int]:
        """The tokens its trunk cache holds."""
        if self.prefilling:
            done = self.chunks[0][0] if self.chunks else len(self.request.prompt)
            return self.request.prompt[:done]
        return self.request.prompt + self.fed

    def count_step(self, drafted: int, accepted: int, kept: list[int], copied: bool = False) -> None:
        """Record a step in the row's stats. A step cut short by the budget or EOS counts only
        the drafts that reached the output: ``kept`` is the accepted drafts, then the step's own
        token; a cut inside the drafts leaves only drafts, all accepted."""
        self.stats.record_step(drafted, min(accepted, len(kept)), len(kept), copied)

    def __repr__(self) -> str:
        state = "done" if self.done else ("prefill" if self.prefilling else "decode")
        return f"Row({self.id}, {state}, {len(self.emitted)} tokens)"


@dataclass
class Work:
    """One row's part of a step (lazy arrays until the step's evaluation)."""

    row: Row
    depth: int = 0
    drafts: list[mx.array] = field(default_factory=list)
    qs: list[mx.array] = field(default_factory=list)
    draft_tokens: mx.array | None = None
    q: mx.array | None = None
    record: VerifyRecord | None = None
    chunk: tuple[int, int] | None = None  # prefill rows: the prompt piece this step feeds
    hidden: mx.array | None = None
    lp: LogprobRows | None = None
    ratio: mx.array | None = None
    candidates: mx.array | None = None
    first: mx.array | None = None  # prefill rows whose prompt ends here: the first token
    next: mx.array | None = None  # plain rows: the token sampled after the fed one
    margins: mx.array | None = None  # strict greedy: each verify row's top-2 margin
    copy: list[int] | None = None  # drafts copied from the context (lookup.py) instead of the head's
