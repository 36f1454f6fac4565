"""`mtplx bench --distributed`: where a step's time goes when the trunk is split across ranks.

The ranks of one sequence never compute at the same time: a pass goes rank size-1, size-2,
.., 0, and rank 0 then drafts and samples. So a step's time on rank 0 splits exactly into

- rank 0's own compute (its layers, lm_head, drafting, acceptance, sampling, commit),
- each other rank's compute on the pass (its layers, measured on that rank),
- communication: what remains of rank 0's wait for the pipeline, i.e. every hop's latency
  and transfer, and the ranks' handling of the messages.

Counters are read from every rank around each measured generation, for the "step" passes
(verify blocks and AR steps; prefill chunks are left out), and memory is each rank's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from mtplx.bench.runner import BenchReport
from mtplx.distributed.stage import LeaderStage, RankStats
from mtplx.model.mtp_model import MTPModel


@dataclass
class DepthSplit:
    passes: int = 0  # step passes counted on the ranks
    leader_wait: float = 0.0  # seconds rank 0 waited for the other ranks on those passes
    compute: dict[int, float] = field(default_factory=dict)  # other ranks' compute on those passes, by rank


class PipelineTimer:
    """``around_run`` for :func:`mtplx.bench.runner.run_bench`: the ranks' counters by depth."""

    def __init__(self, model: MTPModel):
        self.stage: LeaderStage = model.trunk.stage
        self.depths: dict[int, DepthSplit] = {}
        self.ranks: list[RankStats] = self.stage.gather_stats()

    @contextmanager
    def __call__(self, depth: int) -> Iterator[None]:
        before = self.stage.gather_stats()
        yield
        after = self.stage.gather_stats()
        split = self.depths.setdefault(depth, DepthSplit())
        split.passes += after[0].counters.passes["step"] - before[0].counters.passes["step"]
        split.leader_wait += after[0].counters.wait["step"] - before[0].counters.wait["step"]
        for b, a in zip(before[1:], after[1:]):
            split.compute[a.rank] = split.compute.get(a.rank, 0.0) + a.counters.compute["step"] - b.counters.compute["step"]
        self.ranks = after

    def rows(self, report: BenchReport) -> dict[int, dict[str, Any]]:
        """Per depth, milliseconds per step: total, rank 0's compute, each other rank's compute,
        communication; and communication per generated token."""
        out = {}
        for depth, split in sorted(self.depths.items()):
            runs = report.results[depth].runs
            # The engine's decode time covers every step but the first (prefill and first token).
            steps = sum(r.steps - 1 for r in runs)
            if not steps or not split.passes:
                continue
            step_ms = 1000 * sum(r.decode_seconds for r in runs) / steps
            wait_ms = 1000 * split.leader_wait / split.passes
            others = {rank: 1000 * s / split.passes for rank, s in sorted(split.compute.items())}
            comm_ms = max(wait_ms - sum(others.values()), 0.0)
            tokens_per_step = report.results[depth].tokens_per_step
            out[depth] = {"tokens_per_second": report.results[depth].median_tps, "tokens_per_step": tokens_per_step,
                          "step_ms": step_ms, "rank0_compute_ms": step_ms - wait_ms,
                          "compute_ms": {str(rank): ms for rank, ms in others.items()}, "communication_ms": comm_ms,
                          "communication_ms_per_token": comm_ms / tokens_per_step if tokens_per_step else None}
        return out

    def table(self, report: BenchReport) -> str:
        rows = self.rows(report)
        others = [s.rank for s in self.ranks[1:]]
        head = (f"{'depth':>5} {'tok/s':>8} {'tok/step':>8} {'ms/step':>8} {'rank 0':>8} "
                + " ".join(f"{f'rank {r}':>8}" for r in others) + f" {'comm':>8} {'comm/tok':>8}")
        lines = ["time per step (ms): each rank's compute, and communication", head, "-" * len(head)]
        for depth, r in rows.items():
            lines.append(f"{depth:>5} {r['tokens_per_second']:>8.2f} {r['tokens_per_step']:>8.2f} {r['step_ms']:>8.1f} "
                         f"{r['rank0_compute_ms']:>8.1f} " + " ".join(f"{r['compute_ms'][str(k)]:>8.1f}" for k in others)
                         + f" {r['communication_ms']:>8.2f} {r['communication_ms_per_token']:>8.2f}")
        lines += ["", "memory per rank (MiB)", f"{'rank':>4} {'layers':>8} {'weights':>9} {'active':>9} {'peak':>9}"]
        for s in self.ranks:
            lines.append(f"{s.rank:>4} {f'{s.layers[0]}-{s.layers[1] - 1}':>8} {s.weights_mib:>9.1f} "
                         f"{s.active_mib:>9.1f} {s.peak_mib:>9.1f}")
        return "\n".join(lines)

    def as_dict(self, report: BenchReport) -> dict[str, Any]:
        return {"ranks": [{"rank": s.rank, "layers": list(s.layers), "weights_mib": round(s.weights_mib, 2),
                           "active_mib": round(s.active_mib, 2), "peak_mib": round(s.peak_mib, 2)} for s in self.ranks],
                "depths": {str(d): _rounded(r) for d, r in self.rows(report).items()}}


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value
