"""Depth policies: which draft depth the next speculative step uses.

The decoder (batch.py, for one row or many) asks a row's policy once before each step
(:meth:`DepthPolicy.choose`, with the row's context length) and tells it what the step drafted
and accepted afterwards (:meth:`DepthPolicy.observe`). A policy may only read what is already
decided (past acceptance, the context, costs measured before the step): the depth of a step
then never depends on the step's own random draws, so the output law stays AR's whatever it
picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class DepthPolicy(Protocol):
    """Chooses each step's depth (0 = a plain step: verify the pending token only)."""

    max_depth: int  # no step drafts deeper (stats and caches are sized by it)

    def choose(self, context: int = 0) -> int: ...

    def observe(self, drafted: int, accepted: int) -> None: ...


class FixedDepth:
    """Every step drafts exactly ``depth`` tokens: what a pinned integer depth means."""


    def __init__(self, depth: int):
        self.max_depth = depth

    def choose(self, context: int = 0) -> int:
        return self.max_depth

    def observe(self, drafted: int, accepted: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedDepth({self.max_depth})"


def as_policy(depth: "int | DepthPolicy") -> DepthPolicy:
    """An integer depth as a :class:`FixedDepth`; a policy as itself."""
    return FixedDepth(depth) if isinstance(depth, int) else depth


@dataclass(frozen=True)
class StepCosts:
    """What a step costs on this machine for one artifact: ``verify_ms[t - 1]`` is a verify pass
    over t tokens (t = 1 .. max depth + 1), ``draft_ms`` one draft step, ``overhead_ms`` what a
    real step of the speculative loop costs beyond those (sampling, acceptance, commit, host
    syncs), ``ar_ms`` a step of the pipelined AR loop (None: unknown, taken as a 1-token verify),
    all at a context of ``context`` tokens.

    Attention reads the whole context on every pass, so each cost grows with it: ``verify_per_k``
    and ``draft_per_k`` are the milliseconds one verify pass (per t) and one draft step gain per
    1,000 tokens of context (empty / 0: not measured, costs taken as flat). An AR step gains what
    a 1-token verify does. :meth:`at` gives the costs at another context. Only ratios matter."""

    verify_ms: tuple[float, ...]
    draft_ms: float
    overhead_ms: float = 0.0
    ar_ms: float | None = None
    context: int = 0
    verify_per_k: tuple[float, ...] = ()
    draft_per_k: float = 0.0

    def __post_init__(self) -> None:
        if not self.verify_ms or not all(math.isfinite(v) and v > 0 for v in self.verify_ms):
            raise ValueError(f"verify costs must be positive, got {self.verify_ms}")
        for name in ("draft_ms", "overhead_ms", "draft_per_k"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ar_ms is not None and not (math.isfinite(self.ar_ms) and self.ar_ms > 0):
            raise ValueError(f"ar_ms must be positive, got {self.ar_ms}")
        if self.verify_per_k and (len(self.verify_per_k) != len(self.verify_ms)
                                  or not all(math.isfinite(v) and v >= 0 for v in self.verify_per_k)):
            raise ValueError(f"verify_per_k needs one slope >= 0 per verify size, got {self.verify_per_k}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")

    @property
    def max_depth(self) -> int:
        return len(self.verify_ms) - 1

    def step(self, depth: int) -> float:
        """One step of the speculative loop at ``depth``: a verify pass over depth + 1 tokens,
        ``depth`` draft steps and the loop's own overhead."""
        return self.verify_ms[depth] + depth * self.draft_ms + self.overhead_ms

    @property
    def ar(self) -> float:
        """One step of the plain AR loop."""
        return self.ar_ms if self.ar_ms is not None else self.verify_ms[0]

    @property
    def grows(self) -> bool:
        """Whether the costs were measured at two contexts (:meth:`at` moves them)."""
        return bool(self.verify_per_k)

    def at(self, context: int) -> "StepCosts":
        """The costs at a context of ``context`` tokens: linear in the context, from the two
        contexts they were measured at (no lower than at the shorter one)."""
        if not self.grows or context == self.context:
            return self
        k = max(context - self.context, 0) / 1000
        return replace(self, verify_ms=tuple(v + s * k for v, s in zip(self.verify_ms, self.verify_per_k)),
                       draft_ms=self.draft_ms + self.draft_per_k * k,
                       ar_ms=None if self.ar_ms is None else self.ar_ms + self.verify_per_k[0] * k,
                       context=max(context, self.context))

    def winning(self, margin: float = 1.0) -> list[int]:
        """Depths that would beat the AR loop here (by ``margin``) if every draft were accepted."""
        return [d for d in range(1, self.max_depth + 1) if (d + 1) / self.step(d) > margin / self.ar]

    def as_dict(self) -> dict:
        out = {"verify_ms": [round(v, 4) for v in self.verify_ms], "draft_ms": round(self.draft_ms, 4),
               "overhead_ms": round(self.overhead_ms, 4)}
        if self.ar_ms is not None:
            out["ar_ms"] = round(self.ar_ms, 4)
        out["context"] = self.context
        if self.grows:
            out |= {"verify_per_k": [round(v, 4) for v in self.verify_per_k], "draft_per_k": round(self.draft_per_k, 4)}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "StepCosts":
        ar = data.get("ar_ms")
        return cls(tuple(float(v) for v in data["verify_ms"]), float(data["draft_ms"]),
                   float(data.get("overhead_ms", 0.0)), None if ar is None else float(ar),
                   int(data.get("context", 0)), tuple(float(v) for v in data.get("verify_per_k", ())),
                   float(data.get("draft_per_k", 0.0)))


def expected_tokens(acceptance: Sequence[float], depth: int) -> float:
    """E[tokens per step] at ``depth`` when draft k is accepted with probability
    ``acceptance[k-1]`` given that drafts 1..k-1 were: 1 + sum_j prod_{k<=j} a_k."""
    total, reach = 1.0, 1.0
    for a in acceptance[:depth]:
        reach *= a
        total += reach
    return total


class AutoDepth:
    """Depth "auto": before each step, the depth D in 0..max_depth with the most expected
    tokens per unit of time, E(D) / (c_verify(D+1) + D c_draft).

    E comes from a running estimate of the acceptance at each draft position (conditional on
    the drafts before it being accepted), started at ``prior`` (the artifact's measured
    acceptance) and moved by an exponential average with weight ``ALPHA`` per observation, so
    a drop or a recovery shows within about ten observed steps.

    A position the chosen depth does not draft is never observed, so the policy probes: after
    a run of steps at a depth D below the maximum it drafts D + 1 once. The probe's interval
    is set so that its expected loss (against staying at D) is at most ``PROBE_BUDGET`` of the
    time spent at D, within [``PROBE_MIN``, ``PROBE_MAX``] steps: where the next depth is close
    to paying off it probes often; where it is hopeless (a compute-bound CPU) rarely.

    Depth 0 is a step of the decoder's plain lane (the pipelined AR loop, no head work, costing
    ``costs.ar``), which the decoder leaves whenever the policy drafts. So the choice to speculate
    at all is made at every step, like any depth: a generation starts at the artifact's measured
    acceptance (``prior``), and where that says no depth pays it stays in the plain lane but
    still probes depth 1 now and then (the probe also pays for leaving the lane: one step's
    lost overlap), so a text the head predicts well is noticed. A depth that could not beat the
    AR loop even if every draft were accepted is never drafted nor probed; where none could
    (a compute-bound CPU verifying a 4-bit trunk), ``max_depth`` is 0 and the decoder runs the
    plain lane only, with no head upkeep at all.

    Each step is priced at the row's context length (:meth:`StepCosts.at`): attention's share of a
    pass grows with the context, and a verify pass reads the context once for all its tokens
    while AR reads it once per token, so on a memory-bound device deeper depths pay more as the
    context grows (and on a CPU, where attention is compute, they may pay less). ``max_depth``
    covers every depth that could pay at some context up to ``max_context``; at a given context
    only those that could pay there are chosen or probed.

    Every input of :meth:`choose` (step counter, context length, past accept counts, costs
    measured before the generation) is decided before the step draws anything, so the output
    law stays AR's.
    """

    ALPHA = 0.125
    PROBE_BUDGET = 0.03
    PROBE_MIN = 4
    PROBE_MAX = 32
    # From the plain lane, probes may be this many times further apart: where no depth pays
    # (the common case on a CPU), they are the only price auto pays over plain AR.
    PLAIN_PROBE_SPAN = 4
    CONTEXT_BUCKET = 256  # tokens of context between two re-pricings

    def __init__(self, costs: StepCosts, prior: float | Sequence[float], max_depth: int,
                 max_context: int = 0):
        self.base = costs
        deepest = min(max_depth, costs.max_depth)
        # Costs are linear in the context, so whether a depth can pay is decided at the two ends.
        ends = {costs.at(0), costs.at(max_context)}
        self.max_depth = max((d for c in ends for d in c.winning() if d <= deepest), default=0)
        priors = [prior] * self.max_depth if isinstance(prior, (int, float)) else list(prior)
        # Deeper positions without a prior of their own start at the last one given.
        priors = (priors + priors[-1:] * self.max_depth)[: self.max_depth] if priors else [0.5] * self.max_depth
        self.acceptance = [min(max(float(a), 0.0), 1.0) for a in priors]
        self._since_probe = 0
        self._bucket = -1
        self._price(0)

    def _price(self, context: int) -> None:
        """Costs at ``context`` (recomputed once per ``CONTEXT_BUCKET`` tokens), and the deepest
        depth that could pay there."""
        bucket = context // self.CONTEXT_BUCKET if self.base.grows else 0
        if bucket != self._bucket:
            self._bucket = bucket
            self.costs = self.base.at(bucket * self.CONTEXT_BUCKET)
            self.limit = max((d for d in self.costs.winning() if d <= self.max_depth), default=0)

    def rate(self, depth: int) -> float:
        """Expected tokens per unit of time at ``depth`` with the current estimate (depth 0:
        the plain lane)."""
        if depth == 0:
            return 1.0 / self.costs.ar
        return expected_tokens(self.acceptance, depth) / self.costs.step(depth)

    def best(self) -> int:
        return max(range(self.limit + 1), key=lambda d: (self.rate(d), -d))

    def probe_interval(self, depth: int) -> int:
        """Steps at ``depth`` between two probes one position deeper."""
        c = self.costs
        loss = c.step(depth + 1) - expected_tokens(self.acceptance, depth + 1) / self.rate(depth)
        here, longest = c.step(depth), self.PROBE_MAX
        if depth == 0:  # a plain-lane step; leaving the lane waits for its token in flight
            here, longest = c.ar, self.PROBE_MAX * self.PLAIN_PROBE_SPAN
            loss += c.ar
        wanted = math.ceil(max(loss, 0.0) / (self.PROBE_BUDGET * here))
        return min(max(wanted, self.PROBE_MIN), longest)

    def choose(self, context: int = 0) -> int:
        self._price(context)
        depth = self.best()
        if depth < self.limit:
            self._since_probe += 1
            if self._since_probe > self.probe_interval(depth):
                self._since_probe = 0
                depth += 1
        return depth

    def observe(self, drafted: int, accepted: int) -> None:
        for k in range(drafted):
            hit = 1.0 if k < accepted else 0.0
            self.acceptance[k] += self.ALPHA * (hit - self.acceptance[k])
            if not hit:  # positions past the first rejection were not tried
                break

    def __repr__(self) -> str:
        acc = ", ".join(f"{a:.2f}" for a in self.acceptance)
        return f"AutoDepth(max_depth={self.max_depth}, acceptance=[{acc}])"
