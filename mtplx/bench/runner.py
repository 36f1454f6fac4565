"""`mtplx bench`: AR and every depth on the same prompts and seeds, interleaved in one process.

Each round runs every (prompt, depth) pair once, in an order that rotates between rounds so
that no depth always runs first (caches, allocator, thermal state). The report gives decode
tokens/s (median and spread), speedup over AR, acceptance per draft position, tokens per
verify step, the time split, the cost model, the analytic bound and the share of it reached.

Depth "auto" is a column like any depth (a fresh policy per generation, the step costs measured
or read once before the runs); its row adds the mix of depths it chose.

With a strict-greedy margin (greedy only), every MTP (prompt, depth) run is followed at once by
the same run with strict greedy (mtplx/engine/strict.py), so both are measured under the same
conditions: the report adds its tok/s against the plain run's, the recomputes per 100 tokens,
and whether the tokens are the same.
"""

from __future__ import annotations

import platform
import statistics
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Union


from mtplx.core import knobs
from mtplx._version import __version__
from mtplx.engine.cost_model import CostModel, measure
from mtplx.core.device import device_name
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.engine.stats import PHASES, AcceptanceTally, DecodeStats
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import MTPModel
from mtplx.generation.speculation import depth_policy

Depth = Union[int, str]  # a fixed depth or "auto"


def depth_order(depth: Depth) -> tuple[int, int]:
    """Fixed depths first, ascending, then auto."""
    return (1, 0) if isinstance(depth, str) else (0, depth)


@dataclass
class DepthResult:
    depth: Depth
    runs: list[DecodeStats] = field(default_factory=list)

    @property
    def depth_mix(self) -> list[float]:
        """The share of decode steps at each depth, pooled over the runs."""
        counts: list[int] = []
        for r in self.runs:
            counts = [a + b for a, b in zip(counts + [0] * len(r.depth_steps), r.depth_steps + [0] * len(counts))]
        total = sum(counts)
        return [c / total for c in counts] if total else []

    @property
    def mix_text(self) -> str:
        return " ".join(f"d{d} {100 * s:.0f}%" for d, s in enumerate(self.depth_mix) if s)

    @property
    def tps(self) -> list[float]:
        return [r.tokens_per_second for r in self.runs]

    @property
    def median_tps(self) -> float:
        return statistics.median(self.tps) if self.runs else 0.0

    @property
    def tokens_per_step(self) -> float:
        steps = sum(r.steps for r in self.runs)
        return sum(r.generated for r in self.runs) / steps if steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        tally = AcceptanceTally()
        for r in self.runs:
            tally.add(r)
        return tally.rates

    @property
    def phase_share(self) -> dict[str, float]:
        totals = {p: sum(r.seconds[p] for r in self.runs) for p in PHASES if p != "prefill"}
        whole = sum(totals.values()) or 1.0
        return {p: v / whole for p, v in totals.items()}


@dataclass
class BenchReport:
    model: str
    params: SamplingParams
    max_tokens: int
    prompts: int
    rounds: int
    results: dict[Depth, DepthResult]
    cost: CostModel | None
    mlx_lm_tps: float | None
    device: str
    # mlx_lm.generate's tok/s per prompt (the median of which is mlx_lm_tps), to pair with AR's runs.
    mlx_lm_runs: list[float] = field(default_factory=list)
    # `mtplx doctor --exactness`'s saved verdict for this artifact on this machine, if it ran.
    exactness: dict[str, Any] | None = None
    # Strict greedy's runs by depth (MTP depths only), its margin, and per depth whether every
    # strict run emitted the plain run's tokens.
    strict: dict[Depth, DepthResult] = field(default_factory=dict)
    strict_margin: float | None = None
    strict_same: dict[Depth, bool] = field(default_factory=dict)
    # Drafts copied from the context in every timed run (0 off, N, "auto"; engine/lookup.py).
    lookup: int | str = 0

    @property
    def depths(self) -> list[Depth]:
        return sorted(self.results, key=depth_order)

    def speedup(self, depth: Depth) -> float:
        ar = self.results.get(0)
        return self.results[depth].median_tps / ar.median_tps if ar and ar.median_tps else float("nan")

    def best_fixed(self) -> int | None:
        """The fastest fixed depth of this run (AR included)."""
        fixed = [d for d in self.results if isinstance(d, int)]
        return max(fixed, key=lambda d: self.results[d].median_tps) if fixed else None

    def ratios(self, a: Depth, b: Depth) -> list[float]:
        """``a``'s tok/s over ``b``'s, run by run: the same prompt, round and seed (runs are
        recorded in the same order for every depth), so the prompt's own speed cancels and what
        is left is the difference plus the machine's noise."""
        return [x / y for x, y in zip(self.results[a].tps, self.results[b].tps) if y > 0]

    def beats(self, a: Depth, b: Depth) -> bool:
        """Whether ``a`` is faster than ``b`` in every paired run (two runs at least): a gap the
        runs' spread does not cover. One run has no spread to judge noise by."""
        r = self.ratios(a, b)
        return len(r) >= 2 and min(r) > 1.0

    def bound(self, depth: Depth) -> float | None:
        if self.cost is None or not isinstance(depth, int) or depth + 1 not in self.cost.verify_ms:
            return None
        return self.cost.bound(depth, self.results[depth].tokens_per_step)

    def verdicts(self) -> list[str]:
        lines = []
        if self.cost is not None:
            ratios = ", ".join(f"T={t}: {self.cost.verify_ratio(t):.2f}x" for t in sorted(self.cost.verify_ms))
            draft = f"; one draft step: {self.cost.draft_ratio:.2f}x" if self.cost.draft_ms else ""
            lines.append(f"Verify cost relative to one AR step ({self.cost.ar_step_ms:.1f} ms): {ratios}{draft}.")
            top = max(self.cost.verify_ms)
            if top > 1 and self.cost.plain_ms.get(top):  # a 1-token verify has nothing to roll back
                lines.append(f"Rollback's bookkeeping (the verify pass keeps its block's recurrence inputs) costs "
                             f"{self.cost.verify_ms[top] / self.cost.plain_ms[top] - 1:+.1%} "
                             f"on a {top}-token verify; a checkpoint + replay rollback would instead re-run up to "
                             f"{top - 1} tokens ({self.cost.plain_ms.get(top - 1, 0):.1f} ms) on every rejected step.")
            for d in self.depths:
                b = self.bound(d)
                if d and b is not None and b <= 1.0:
                    lines.append(f"Depth {d} cannot beat AR on this machine: even with its measured acceptance "
                                 f"({self.results[d].tokens_per_step:.2f} tokens/step) the bound is {b:.2f}x, because "
                                 f"verifying {d + 1} tokens costs {self.cost.verify_ratio(d + 1):.2f} AR steps.")
        auto, best = self.results.get("auto"), self.best_fixed()
        if auto is not None and best is not None and self.results[best].median_tps:
            vs_best = auto.median_tps / self.results[best].median_tps
            vs_ar = f"{self.speedup('auto'):.2f}x AR, " if 0 in self.results else ""
            lines.append(f"Depth auto chose {auto.mix_text or '-'}: {vs_ar}{vs_best:.2f}x the best fixed depth of "
                         f"this run ({'AR' if best == 0 else f'depth {best}'})"
                         + "".join(f"; {n}" for n in (self._noise("auto", 0, "AR") if 0 in self.results else None,
                                                     self._noise("auto", best, "the best fixed depth")
                                                     if best != 0 else None) if n) + ".")
        if self.results.get(0) and self.mlx_lm_tps:
            ar = self.results[0]
            ratio = ar.median_tps / self.mlx_lm_tps
            per_run = [t / ref for t, ref in zip(ar.tps, self.mlx_lm_runs * self.rounds) if ref > 0]
            noise = noise_note(per_run, "mlx_lm.generate")
            lines.append(f"mtplx AR runs at {ratio:.3f}x mlx_lm.generate ({self.mlx_lm_tps:.2f} tok/s) on the same "
                         f"trunk and sampler" + (f"; {noise}" if noise else "") + ".")
        return lines

    def _noise(self, a: Depth, b: Depth, name: str) -> str | None:
        return noise_note(self.ratios(a, b), name)

    def table(self) -> str:
        head = (f"{'depth':>5} {'tok/s':>8} {'spread':>13} {'vs AR':>6} {'tok/step':>8} {'bound':>6} {'reached':>7}  "
                f"{'acceptance by position':<24} {'draft/verify/sample/rollback %':<30}")
        rows = [head, "-" * len(head)]
        for d in self.depths:
            r = self.results[d]
            tps = r.tps
            spread = f"{min(tps):.2f}-{max(tps):.2f}" if tps else "-"
            b = self.bound(d)
            reached = self.speedup(d) / b if b else float("nan")
            acc = " ".join(f"{a:.2f}" for a in r.acceptance) or "-"
            share = r.phase_share
            split = "/".join(f"{100 * share[p]:.0f}" for p in ("draft", "verify", "sample", "rollback"))
            rows.append(f"{d:>5} {r.median_tps:>8.2f} {spread:>13} {self.speedup(d):>5.2f}x {r.tokens_per_step:>8.2f} "
                        f"{(f'{b:.2f}x' if b else '-'):>6} {(f'{100 * reached:.0f}%' if b else '-'):>7}  {acc:<24} {split:<30}"
                + (f"  {r.mix_text}" if isinstance(d, str) else ""))
        return "\n".join(rows)

    def strict_ratio(self, depth: Depth) -> float:
        plain = self.results[depth].median_tps
        return self.strict[depth].median_tps / plain if plain else float("nan")

    def recomputed_per_100(self, depth: Depth) -> float:
        runs = self.strict[depth].runs
        generated = sum(r.generated for r in runs)
        return 100 * sum(r.recomputed for r in runs) / generated if generated else 0.0

    def strict_table(self) -> str:
        head = f"{'depth':>5} {'strict tok/s':>12} {'vs plain':>8} {'recomputed/100 tok':>18} {'same tokens':>11}"
        rows = [f"strict greedy (margin {self.strict_margin:g}), each run right after the plain one:", head,
                "-" * len(head)]
        for d in sorted(self.strict, key=depth_order):
            rows.append(f"{d:>5} {self.strict[d].median_tps:>12.2f} {self.strict_ratio(d):>7.3f}x "
                        f"{self.recomputed_per_100(d):>18.2f} {('yes' if self.strict_same[d] else 'NO'):>11}")
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mtplx_version": __version__,
            "model": self.model,
            "device": self.device,
            "platform": platform.platform(),
            "sampler": vars(self.params),
            "max_tokens": self.max_tokens,
            "prompts": self.prompts,
            "rounds": self.rounds,
            "lookup": self.lookup,
            "mlx_lm_generate_tps": self.mlx_lm_tps,
            "mlx_lm_generate_tps_per_prompt": [round(x, 3) for x in self.mlx_lm_runs],
            "cost_model": self.cost.as_dict() if self.cost else None,
            "depths": {
                str(d): {
                    "median_tps": round(r.median_tps, 3),
                    "tps": [round(x, 3) for x in r.tps],
                    "speedup_vs_ar": round(self.speedup(d), 4),
                    "tokens_per_step": round(r.tokens_per_step, 4),
                    "acceptance": [round(a, 4) for a in r.acceptance],
                    "phase_share": {k: round(v, 4) for k, v in r.phase_share.items()},
                    "bound": round(self.bound(d), 4) if self.bound(d) else None,
                    "share_of_bound": round(self.speedup(d) / self.bound(d), 4) if self.bound(d) else None,
                    "depth_mix": {str(k): round(s, 4) for k, s in enumerate(r.depth_mix)},
                    # Per run: accepted copies, accepted MTP drafts, target samples.
                    "tokens_from": [x.as_dict()["tokens_from"] for x in r.runs],
                }
                for d, r in ((d, self.results[d]) for d in self.depths)
            },
            "best_fixed_depth": self.best_fixed(),
            "auto_vs_best_fixed": (round(self.results["auto"].median_tps / self.results[self.best_fixed()].median_tps, 4)
                                   if "auto" in self.results and self.best_fixed() is not None
                                   and self.results[self.best_fixed()].median_tps else None),
            "verdicts": self.verdicts(),
            "exactness": self.exactness,
            "strict_greedy": None if self.strict_margin is None else {
                "margin": self.strict_margin,
                "depths": {str(d): {"median_tps": round(self.strict[d].median_tps, 3),
                                    "tps": [round(x, 3) for x in self.strict[d].tps],
                                    "vs_plain": round(self.strict_ratio(d), 4),
                                    "recomputed_per_100_tokens": round(self.recomputed_per_100(d), 3),
                                    "same_tokens": self.strict_same[d]}
                           for d in sorted(self.strict, key=depth_order)},
            },
        }


def _announce(model: MTPModel, ids: list[int], params: SamplingParams, draft_params: SamplingParams | None,
              seed: int, depth: Depth, runs: int, max_tokens: int, reference_runs: int,
              progress: Callable[[str], None] | None) -> Any:
    """Say up front how long the timed runs will take, and return a tqdm bar over them (None
    without ``progress``: the API stays silent). The estimate times 8 tokens at the first depth
    once warm; other depths run faster or slower, so it is a scale, not a promise."""
    if progress is None:
        return None
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    for _ in Engine(model, depth_policy(model, depth, params), params, draft_params, seed).generate(ids, 8):
        pass
    per_token = (time.perf_counter() - t0) / 8
    total = (runs + reference_runs) * max_tokens * per_token
    reference = f" and {reference_runs} of mlx_lm.generate" if reference_runs else ""
    progress(f"{runs} timed runs of {max_tokens} tokens{reference}: about {_duration(total)} on this machine "
             f"(from 8 tokens at depth {depth}; the cost model adds a few seconds)")
    # disable=None: no bar where standard error is not a terminal (a log keeps its one line per run).
    return tqdm(total=runs, desc="bench", unit="run", file=sys.stderr, disable=None, leave=False)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def noise_note(ratios: list[float], name: str) -> str | None:
    """What a speed ratio against ``name`` may be read as, from its run-by-run ratios: None when
    every run agrees on the side of 1.0 (a verdict), else that the difference is within the
    runs' noise, with their range, so a loaded machine's numbers do not read as a verdict."""
    if not ratios:
        return None
    if len(ratios) < 2:
        return f"one run against {name}, no spread to tell a difference from noise (add --rounds)"
    lo, hi = min(ratios), max(ratios)
    if lo <= 1.0 <= hi:
        return (f"within noise: run by run it ranged {lo:.2f}-{hi:.2f}x {name}, "
                f"on both sides of 1.00x, so this is no verdict")
    return None


def mlx_lm_reference(model: MTPModel, tokenizer: Any, prompts: list[list[int]], params: SamplingParams,
                     max_tokens: int, kv_bits: int | None = None, kv_group_size: int = 64) -> list[float]:
    """mlx_lm.stream_generate's own generation tok/s on the same trunk, per prompt (with
    ``kv_bits``, its own quantized KV from the first token, as mtplx's runs store theirs).

    Its sampler filters in another order, which changes the law, not the cost: speed only."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, top_k=params.top_k)
    rates = []
    for ids in prompts:
        last = None
        kv = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "quantized_kv_start": 0}
        for last in stream_generate(model.trunk.model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler, **kv):
            pass
        if last is not None:
            rates.append(last.generation_tps)
    return rates


def run_bench(
    model: MTPModel,
    tokenizer: Any,
    prompts: list[str],
    depths: list[Depth],
    max_tokens: int,
    params: SamplingParams,
    draft_params: SamplingParams | None = None,
    rounds: int = 1,
    seed: int = 0,
    cost_model: bool = True,
    reference: bool = True,
    progress: Callable[[str], None] | None = None,
    model_name: str = "",
    around_run: Callable[[int], ContextManager[Any]] | None = None,
    strict_margin: float | None = None,
    lookup: int | str = 0,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> BenchReport:
    """``around_run(depth)``, if given, wraps every measured generation (a distributed bench
    reads the ranks' counters around each). ``strict_margin``: also run every MTP depth with
    strict greedy at that margin (greedy ``params`` only), right after its plain run. ``lookup``:
    drafts copied from the context in every run (``mtplx bench --lookup``). ``kv_bits``: every run
    (and mlx-lm's reference) stores its attention KV quantized (``mtplx bench --kv-bits``)."""
    from mtplx.api import encode_prompt

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if strict_margin is not None and not params.greedy:
        raise MtplxError("strict greedy changes nothing at temperature > 0, so there is nothing to measure",
                         fix="bench it at temperature 0 (-t 0)")
    results = {d: DepthResult(d) for d in depths}
    strict = {d: DepthResult(d) for d in depths if d != 0} if strict_margin is not None else {}
    same = {d: True for d in strict}
    # Each (depth, strict margin) a run is made with: strict right after plain.
    variants = {d: [None] + ([strict_margin] if d in strict else []) for d in depths}
    # Warm-up on the first prompt at every depth so no measured run pays first-call costs (and
    # auto's step costs are measured, or read, before any timed run).
    for d in depths:
        for margin in variants[d]:
            for _ in Engine(model, depth_policy(model, d, params), params, draft_params, seed,
                            strict_greedy=margin, lookup=lookup, kv_bits=kv_bits,
                            kv_group_size=kv_group_size).generate(encoded[0], 8):
                pass
    order = list(depths)
    runs = rounds * len(encoded) * sum(len(v) for v in variants.values())
    bar = _announce(model, encoded[0], params, draft_params, seed, depths[0], runs, max_tokens,
                    len(encoded) if reference and 0 in depths else 0, progress)
    say = progress if bar is None or bar.disable else (lambda text: bar.write(text, file=sys.stderr))
    for r in range(rounds):
        for i, ids in enumerate(encoded):
            for d in order:
                plain_tokens = None
                for margin in variants[d]:
                    engine = Engine(model, depth_policy(model, d, params), params, draft_params, seed + 1000 * r + i,
                                    strict_greedy=margin, lookup=lookup, kv_bits=kv_bits, kv_group_size=kv_group_size)
                    with around_run(d) if around_run is not None else nullcontext():
                        tokens = [t for step in engine.generate(ids, max_tokens) for t in step.tokens]
                    if margin is None:
                        results[d].runs.append(engine.stats)
                        plain_tokens = tokens
                    else:
                        strict[d].runs.append(engine.stats)
                        same[d] = same[d] and tokens == plain_tokens
                    if progress:
                        label = "" if margin is None else " strict"
                        say(f"round {r + 1}/{rounds} prompt {i + 1}/{len(encoded)} depth {d}{label}: "
                            f"{engine.stats.tokens_per_second:.2f} tok/s")
                    if bar is not None:
                        bar.update(1)
            order = order[1:] + order[:1]
    if bar is not None:
        bar.close()
    cost = None
    if cost_model:
        deepest = max(knobs.AUTO_MAX_DEPTH if d == knobs.AUTO else d for d in depths)
        cost = measure(model, encoded[0], deepest + 1)
    ref_runs = (mlx_lm_reference(model, tokenizer, encoded, params, max_tokens, kv_bits, kv_group_size)
                if reference and 0 in depths else [])
    ref = statistics.median(ref_runs) if ref_runs else None
    from mtplx.core.config import exactness_verdict

    return BenchReport(model=model_name, params=params, max_tokens=max_tokens, prompts=len(encoded), rounds=rounds,
                       results=results, cost=cost, mlx_lm_tps=ref, mlx_lm_runs=ref_runs, device=device_name(),
                       exactness=exactness_verdict(model), strict=strict, strict_margin=strict_margin,
                       strict_same=same, lookup=lookup)

