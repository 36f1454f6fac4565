"""Depth policies: which draft depth the next speculative step uses.

The decoder (batch.py, for one row or many) asks a row's policy once before each step
(:meth:`DepthPolicy.choose`) and tells it what the step drafted and accepted afterwards
(:meth:`DepthPolicy.observe`). A policy may only read what is already decided (past
acceptance, costs measured before the step): the depth of a step then never depends on the
step's own random draws, so the output law stays AR's whatever it picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


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


@dataclass(frozen=True)
class StepCosts:
    """What a step costs on this machine for one artifact: ``verify_ms[t - 1]`` is a verify pass
    over t tokens (t = 1 .. max depth + 1), ``draft_ms`` one draft step, ``overhead_ms`` what a
    real step of the speculative loop costs beyond those (sampling, acceptance, commit, host
    syncs), ``ar_ms`` a step of the pipelined AR loop (None: unknown, taken as a 1-token verify).
    Only ratios matter."""

    verify_ms: tuple[float, ...]
    draft_ms: float
    overhead_ms: float = 0.0
    ar_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.verify_ms or not all(math.isfinite(v) and v > 0 for v in self.verify_ms):
            raise ValueError(f"verify costs must be positive, got {self.verify_ms}")
        for name in ("draft_ms", "overhead_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ar_ms is not None and not (math.isfinite(self.ar_ms) and self.ar_ms > 0):
            raise ValueError(f"ar_ms must be positive, got {self.ar_ms}")

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

    def as_dict(self) -> dict:
        out = {"verify_ms": [round(v, 4) for v in self.verify_ms], "draft_ms": round(self.draft_ms, 4),
               "overhead_ms": round(self.overhead_ms, 4)}
        return out | ({"ar_ms": round(self.ar_ms, 4)} if self.ar_ms is not None else {})

    @classmethod
    def from_dict(cls, data: dict) -> "StepCosts":
        ar = data.get("ar_ms")
        return cls(tuple(float(v) for v in data["verify_ms"]), float(data["draft_ms"]),
                   float(data.get("overhead_ms", 0.0)), None if ar is None else float(ar))


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

    Every input of :meth:`choose` (step counter, past accept counts, costs measured before the
    generation) is decided before the step draws anything, so the output law stays AR's.
    """

    ALPHA = 0.125
    PROBE_BUDGET = 0.03
    PROBE_MIN = 4
    PROBE_MAX = 32
    # From the plain lane, probes may be this many times further apart: where no depth pays
    # (the common case on a CPU), they are the only price auto pays over plain AR.
    PLAIN_PROBE_SPAN = 4

    def __init__(self, costs: StepCosts, prior: float | Sequence[float], max_depth: int):
        self.costs = costs
        deepest = min(max_depth, costs.max_depth)
        can_win = [d for d in range(1, deepest + 1) if (d + 1) / costs.step(d) > 1 / costs.ar]
        self.max_depth = max(can_win, default=0)
        priors = [prior] * self.max_depth if isinstance(prior, (int, float)) else list(prior)
        # Deeper positions without a prior of their own start at the last one given.
        priors = (priors + priors[-1:] * self.max_depth)[: self.max_depth] if priors else [0.5] * self.max_depth
        self.acceptance = [min(max(float(a), 0.0), 1.0) for a in priors]
        self._since_probe = 0

    def rate(self, depth: int) -> float:
        """Expected tokens per unit of time at ``depth`` with the current estimate (depth 0:
        the plain lane)."""
        if depth == 0:
            return 1.0 / self.costs.ar
        return expected_tokens(self.acceptance, depth) / self.costs.step(depth)

    def best(self) -> int:
        return max(range(self.max_depth + 1), key=lambda d: (self.rate(d), -d))

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

    def choose(self) -> int:
        depth = self.best()
        if depth < self.max_depth:
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
