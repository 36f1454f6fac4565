"""The control message the leader sends down the pipeline before every trunk pass.

One fixed-size int32 array, so a rank can post its receive before it knows anything:
``[op, reset, keep, T, token_0 .. token_15]``. ``keep`` carries the leader's decision on the
previous verify pass (how many of its drafts were accepted, or -1 when there is nothing to
commit), so a speculative step costs one message down the pipeline and one hidden state up
each hop, never a separate broadcast. Blocks longer than :data:`INLINE_TOKENS` (prefill
chunks) send their tokens in a second message of exactly ``T`` ids, to the first stage only:
the other ranks receive hidden states, not tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import mlx.core as mx

INLINE_TOKENS = 16
HEADER_FIELDS = 4
MESSAGE_SIZE = HEADER_FIELDS + INLINE_TOKENS
NO_DECISION = -1


class Op(IntEnum):
    FORWARD = 1  # a plain trunk pass: prefill chunks and AR steps
    VERIFY = 2  # a verify block: the Gated-DeltaNet layers keep what a rollback needs
    PING = 3  # the leader is idle: prove every rank is still there (see heartbeat)
    STATS = 4  # each follower reports its counters and memory to the leader
    STOP = 5  # the run is over: every follower leaves its loop


@dataclass
class Control:
    op: Op
    reset: bool = False  # a new sequence: drop the caches before this pass
    keep: int = NO_DECISION  # accepted drafts of the previous verify pass, if any
    tokens: list[int] = field(default_factory=list)  # only the first stage reads them
    length: int = 0  # T, the block length (len(tokens) on the leader)

    def __post_init__(self) -> None:
        self.length = self.length or len(self.tokens)

    @property
    def inline(self) -> bool:
        return self.length <= INLINE_TOKENS

    def encode(self) -> mx.array:
        body = self.tokens if self.inline else []
        row = [int(self.op), int(self.reset), self.keep, self.length, *body]
        return mx.array(row + [0] * (MESSAGE_SIZE - len(row)), dtype=mx.int32)

    @classmethod
    def decode(cls, message: list[int]) -> "Control":
        op, reset, keep, length = message[:HEADER_FIELDS]
        tokens = message[HEADER_FIELDS : HEADER_FIELDS + length] if length <= INLINE_TOKENS else []
        return cls(Op(op), bool(reset), keep, tokens, length)
