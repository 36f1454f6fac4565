"""Running statistics of one generation: throughput, acceptance per draft position, phases."""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("prefill", "draft", "verify", "sample", "rollback")


@dataclass
class DecodeStats:
    depth: int = 0  # the deepest depth a step may draft (the pinned depth, or auto's maximum)
    adaptive: bool = False  # depth "auto": each step's depth chosen by the policy
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a prompt cache already held (not prefilled)
    generated: int = 0
    steps: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    # Steps per drafted depth 0..depth; the first token (sampled from the prefill, not a
    # decode step) is left out.
    depth_steps: list[int] = field(default_factory=list)
    # Strict greedy (engine/strict.py): tokens decided again by a one-row pass at a near-tie.
    recomputed: int = 0
    # Where the emitted tokens came from: accepted drafts copied from the context (lookup.py),
    # accepted MTP drafts, and tokens sampled by the target (the first, bonus and residual ones).
    from_lookup: int = 0
    from_mtp: int = 0
    from_sampled: int = 0
    # Copy steps, and copied tokens verified and accepted (the copy source's acceptance).
    lookup_steps: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * self.depth
        self.accepted = self.accepted or [0] * self.depth
        self.depth_steps = self.depth_steps or [0] * (self.depth + 1)

    def record_step(self, drafted: int, accepted: int, emitted: int, copied: bool = False) -> None:
        """One step: ``drafted`` drafts (by the head, or copied from the context when
        ``copied``), ``accepted`` of them kept, ``emitted`` tokens out."""
        self.steps += 1
        self.generated += emitted
        kept = min(accepted, emitted)
        self.from_sampled += emitted - kept
        if copied:
            self.lookup_steps += 1
            self.lookup_drafted += drafted
            self.lookup_accepted += accepted
            self.from_lookup += kept
            return
        self.from_mtp += kept
        if self.steps > 1:
            self.depth_steps[drafted] += 1
        for k in range(drafted):
            self.drafted[k] += 1
            if k < accepted:
                self.accepted[k] += 1

    @property
    def acceptance(self) -> list[float]:
        """P(draft k accepted) for k = 1..depth: accepted at k over steps that drafted k."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def lookup_acceptance(self) -> float:
        """Copied tokens accepted over copied tokens verified (0 when nothing was copied)."""
        return self.lookup_accepted / self.lookup_drafted if self.lookup_drafted else 0.0

    @property
    def depth_mix(self) -> list[float]:
        """The share of decode steps at each depth 0..depth."""
        total = sum(self.depth_steps)
        return [n / total if total else 0.0 for n in self.depth_steps]

    @property
    def mode(self) -> str:
        """``AR``, ``MTP d2``, or ``MTP auto (d0 12% d1 30% d2 58%)`` (depths never used left out)."""
        if self.adaptive:
            mix = " ".join(f"d{d} {100 * s:.0f}%" for d, s in enumerate(self.depth_mix) if self.depth_steps[d])
            return f"MTP auto ({mix})" if mix else "MTP auto"
        return f"MTP d{self.depth}" if self.depth else "AR"

    @property
    def tokens_per_step(self) -> float:
        return self.generated / self.steps if self.steps else 0.0

    @property
    def decode_seconds(self) -> float:
        return sum(v for k, v in self.seconds.items() if k != "prefill")

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: generated tokens over decode time (prefill excluded)."""
        return self.generated / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens actually prefilled (not those a prompt cache held) per second."""
        s = self.seconds["prefill"]
        return (self.prompt_tokens - self.cached_tokens) / s if s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "depth": "auto" if self.adaptive else self.depth,
            "max_depth": self.depth,
            "depth_histogram": {str(d): n for d, n in enumerate(self.depth_steps)},
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated": self.generated,
            "steps": self.steps,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 3),
            "tokens_per_step": round(self.tokens_per_step, 4),
            "acceptance": [round(a, 4) for a in self.acceptance],
            "recomputed": self.recomputed,
            "tokens_from": {"lookup": self.from_lookup, "mtp": self.from_mtp, "sampled": self.from_sampled},
            "lookup": {"steps": self.lookup_steps, "drafted": self.lookup_drafted,
                       "accepted": self.lookup_accepted, "acceptance": round(self.lookup_acceptance, 4)},
            "seconds": {k: round(v, 5) for k, v in self.seconds.items()},
        }


@dataclass
class AcceptanceTally:
    """Draft and accept counts per draft position, pooled over generations of any depth, so
    each position is weighted by how often it was drafted."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, stats: DecodeStats) -> None:
        for k, (d, a) in enumerate(zip(stats.drafted, stats.accepted)):
            if k >= len(self.drafted):
                self.drafted.append(0)
                self.accepted.append(0)
            self.drafted[k] += d
            self.accepted[k] += a

    @property
    def rates(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]
