"""Depth policies: which draft depth the next speculative step uses.

Both engines (the one-row loop in speculative.py and the batched decoder) ask a row's policy
once before each step (:meth:`DepthPolicy.choose`) and tell it what the step drafted and
accepted afterwards (:meth:`DepthPolicy.observe`). A policy may only read what is already
decided (past acceptance, costs measured before the step): the depth of a step then never
depends on the step's own random draws, so the output law stays AR's whatever it picks.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DepthPolicy(Protocol):
    """Chooses each step's depth (0 = a plain step: verify the pending token only)."""

    max_depth: int  # no step drafts deeper (stats and caches are sized by it)

    def choose(self) -> int: ...

    def observe(self, drafted: int, accepted: int) -> None: ...


class FixedDepth:
    """Every step drafts exactly ``depth`` tokens: what a pinned integer depth means."""

    def __init__(self, depth: int):
        self.max_depth = depth

    def choose(self) -> int:
        return self.max_depth

    def observe(self, drafted: int, accepted: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedDepth({self.max_depth})"


def as_policy(depth: "int | DepthPolicy") -> DepthPolicy:
    """An integer depth as a :class:`FixedDepth`; a policy as itself."""
    return FixedDepth(depth) if isinstance(depth, int) else depth
