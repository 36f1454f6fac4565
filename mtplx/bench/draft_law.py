"""Which draft temperature accepts most, for a given target temperature, on this head.

Drafting by argmax and accepting on an exact match (what match-only runtimes do) is rejection
sampling with a one-hot q: draft temperature 0. Drafting at the target's own temperature is
the textbook choice. Which accepts more is an empirical question for each head, so `mtplx
tune` measures tokens per step for draft temperatures {0, T/2, T} at target temperatures 0.6
and 1.0 and saves the best per target (mtplx.generation.speculation.draft_params applies it); `mtplx
bench --draft-temperature sweep` prints the same table. Tokens per step, not tok/s: the draft
temperature does not change a step's cost, only how many tokens it yields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine

TARGETS = (0.6, 1.0)
FRACTIONS = (0.0, 0.5, 1.0)


@dataclass
class DraftLawReport:
    depth: int
    # target temperature -> draft temperature -> tokens per step (pooled over prompts)
    tokens_per_step: dict[float, dict[float, float]] = field(default_factory=dict)

    def best(self) -> dict[float, float]:
        """The draft temperature with the most tokens per step, per target (ties: the target's own)."""
        return {t: max(row, key=lambda dt: (row[dt], dt == t)) for t, row in self.tokens_per_step.items()}

    def table(self) -> str:
        head = f"{'target T':>8}  " + "  ".join(f"{f'draft {f:g}T':>10}" for f in FRACTIONS) + "  best draft T  vs draft=T"
        lines = [f"tokens per step at depth {self.depth}, by draft temperature", head, "-" * len(head)]
        for t, row in self.tokens_per_step.items():
            cells = "  ".join(f"{row[f * t]:>10.3f}" for f in FRACTIONS)
            best = self.best()[t]
            lines.append(f"{t:>8g}  {cells}  {best:>12g}  {row[best] / row[t]:>8.3f}x")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth,
                "tokens_per_step": {f"{t:g}": {f"{dt:g}": round(v, 4) for dt, v in row.items()}
                                    for t, row in self.tokens_per_step.items()},
                "best": {f"{t:g}": dt for t, dt in self.best().items()}}


def measure_draft_law(model: Any, encoded: list[list[int]], depth: int, max_tokens: int, top_p: float, top_k: int,
                      seed: int = 0, progress: Callable[[str], None] | None = None) -> DraftLawReport:
    """Tokens per step at a fixed ``depth`` for each (target, draft) temperature pair, the same
    prompts and seeds for every pair."""
    report = DraftLawReport(depth)
    for t in TARGETS:
        params = SamplingParams(temperature=t, top_p=top_p, top_k=top_k)
        row = {}
        for f in FRACTIONS:
            draft = SamplingParams(temperature=f * t, top_p=top_p, top_k=top_k)
            generated = steps = 0
            for i, ids in enumerate(encoded):
                engine = Engine(model, depth, params, draft, seed + i)
                for _ in engine.generate(ids, max_tokens):
                    pass
                generated += engine.stats.generated - 1  # the first token is the prefill's
                steps += engine.stats.steps - 1
            row[f * t] = generated / steps if steps else 1.0
            if progress:
                progress(f"draft law: target {t:g}, draft {f * t:g}: {row[f * t]:.3f} tokens/step")
        report.tokens_per_step[t] = row
    return report
