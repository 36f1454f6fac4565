"""What a speculative step costs on this machine, and the speedup that implies.

A step at depth D costs one verify pass over D+1 tokens plus D draft steps and yields
E = 1 + sum_k P(draft k accepted) tokens. In units of one AR step, the bound is

    speedup(D) <= E / (c_verify(D+1) + D * c_draft)

GPUs decode memory-bound, so c_verify(T) stays near 1 for small T; MLX's CPU backend runs
4-bit matmuls compute-bound, so c_verify(T) grows about linearly and MTP cannot win there.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx

from mtplx.engine.policy import StepCosts
from mtplx.engine.sampling import Rng, SamplingParams, sample_logits
from mtplx.model.mtp_model import MTPModel
from mtplx.engine import steps
from mtplx.model import kv_quant

# The long context step costs are also timed at (tokens, or what the model allows).
CONTEXT_PROBE = 4096
# The two loops (AR, depth 1) are timed only where some depth beats AR by this much at full
# acceptance: their overhead only adds cost, and on a CPU, where a verify of 2 costs about two
# of 1, depth 1 sits at 0.95x within the timings' noise, which spent 19 s of a 4-bit demo's
# first run on loops whose answer was known (AR).
LOOP_MARGIN = 1.05
# Each loop's step: the fastest of LOOP_RUNS runs of LOOP_TOKENS tokens. On the bf16 graft 12 x 3
# spread as 24 x 3 did (AR 13.3-16.7 ms against 13.9-18.3 over five measurements) at half the time.
LOOP_TOKENS, LOOP_RUNS = 12, 3


@dataclass
class CostModel:
    ar_step_ms: float
    verify_ms: dict[int, float]
    draft_ms: float
    # A plain trunk pass over T tokens (nothing kept for a rollback): what a checkpoint + replay
    # rollback would pay again on every rejected step, and the baseline of the verify pass's
    # rollback bookkeeping.
    plain_ms: dict[int, float] = field(default_factory=dict)

    def verify_ratio(self, tokens: int) -> float:
        return self.verify_ms[tokens] / self.ar_step_ms

    @property
    def draft_ratio(self) -> float:
        return self.draft_ms / self.ar_step_ms

    def bound(self, depth: int, tokens_per_step: float) -> float:
        """Upper bound on speedup over AR for a depth with the measured tokens per step."""
        if depth == 0:
            return 1.0
        return tokens_per_step / (self.verify_ratio(depth + 1) + depth * self.draft_ratio)

    def as_dict(self) -> dict:
        return {"ar_step_ms": round(self.ar_step_ms, 3),
                "verify_ms": {str(t): round(v, 3) for t, v in self.verify_ms.items()},
                "plain_pass_ms": {str(t): round(v, 3) for t, v in self.plain_ms.items()},
                "verify_ratio": {str(t): round(self.verify_ratio(t), 3) for t in self.verify_ms},
                "draft_ms": round(self.draft_ms, 3), "draft_ratio": round(self.draft_ratio, 3)}


def median_ms(run: Callable[..., None], repeats: int, setup: Callable[[], object] | None = None,
              warmup: bool = True) -> float:
    """Median wall time of ``run(setup())`` (or ``run()``) over ``repeats`` calls, after one
    untimed warm-up call (first calls compile kernels and allocate); the setup (a fork, an
    untimed verify) is never timed."""
    times = []
    for i in range(repeats + int(warmup)):
        arg = setup() if setup else None
        t = time.perf_counter()
        run(arg) if setup else run()
        if i or not warmup:
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def pipelined_ar_ms(model: MTPModel, prompt: list[int], tokens: int = 24,
                    params: SamplingParams | None = None) -> float:
    """One AR step as the AR engine runs it: pipelined (the next forward is queued before the
    current token is read), so graph building overlaps compute. Timing a lone synchronous
    step instead would inflate the unit and overstate every ratio's bound."""
    from mtplx.engine.speculative import Engine

    engine = Engine(model, 0, params or SamplingParams(), seed=0)
    for _ in engine.generate(prompt, tokens):
        pass
    return 1000 * engine.stats.decode_seconds / max(engine.stats.generated - 1, 1)


def _prefilled(model: MTPModel, prompt: list[int]):
    cache = model.make_cache()
    _, hidden = steps.prefill(model, prompt, cache, head=model.has_mtp)
    mx.eval(hidden, cache.arrays())
    return cache, hidden


def _verify_call(model: MTPModel, cache, token: int, t: int) -> Callable[[], None]:
    """One verify pass over ``t`` tokens on a fork of ``cache`` (so every call starts alike)."""
    block = mx.array([[token] * t])

    def run():
        v_logits, v_hidden, _ = steps.verify(model, cache.fork(), block)
        mx.eval(v_logits, v_hidden)
    return run


def _draft_call(model: MTPModel, cache, hidden: mx.array, token: int) -> Callable[[], None]:
    """One draft step (head + lm_head + sampling) on a fork of ``cache``."""
    h, tok, params, rng = hidden[:, -1:], mx.array([[token]]), SamplingParams(), Rng(0)

    def run():
        d_logits, _ = steps.draft(model, cache.fork(), h, tok)
        y, _ = sample_logits(d_logits[0, -1:], params, rng)
        mx.eval(y)
    return run


def measure(model: MTPModel, prompt: list[int], max_tokens: int, repeats: int = 5) -> CostModel:
    """Time an AR step (pipelined, as the AR engine runs), a verify pass over T = 1..max_tokens
    and one draft step, each on a cache prefilled with ``prompt`` and rolled back after every
    timed call."""
    cache, hidden = _prefilled(model, prompt)

    def plain(t: int):
        block = mx.array([[prompt[-1]] * t])

        def run():
            mx.eval(model.trunk.logits(block, cache.fork().trunk))
        return run

    ar_ms = pipelined_ar_ms(model, prompt)
    verify_ms = {t: median_ms(_verify_call(model, cache, prompt[-1], t), repeats) for t in range(1, max_tokens + 1)}
    plain_ms = {t: median_ms(plain(t), repeats) for t in range(1, max_tokens + 1)}
    draft_ms = median_ms(_draft_call(model, cache, hidden, prompt[-1]), repeats) if model.has_mtp else 0.0
    return CostModel(ar_step_ms=ar_ms, verify_ms=verify_ms, draft_ms=draft_ms, plain_ms=plain_ms)


def _padded(cache, extra: int):
    """A fork of a prefilled ``cache`` whose attention layers (trunk and head) then hold
    ``extra`` more rows of zeros: what a pass reads at a long context, without prefilling one
    (a pass's cost does not depend on what the rows hold; Gated-DeltaNet states have one size at
    every context). ``cache`` itself is left as it was: rows past a KV buffer's capacity go to
    a new buffer, and ``extra`` is far past the prompt's."""
    cache = cache.fork()
    for c in [c for c in cache.trunk if kv_quant.is_kv(c)] + list(cache.head):
        if c.keys is None:
            continue
        _, heads, _, dim = c.keys.shape
        zeros = mx.zeros((1, heads, extra, dim), dtype=c.keys.dtype)
        c.update_and_fetch(zeros, zeros)
    mx.eval(cache.arrays())
    return cache


def _fastest(calls: list[Callable[[], None]], rounds: int) -> list[float]:
    """Each call's fastest time over ``rounds`` rounds that interleave them (see
    measure_step_costs)."""
    calls[0]()  # the first pass of a process (or at a new shape) loads what later ones share
    best = [median_ms(call, 1, warmup=False) for call in calls]
    for _ in range(rounds - 1):
        best = [min(b, median_ms(call, 1, warmup=False)) for b, call in zip(best, calls)]
    return best


def _step_calls(model: MTPModel, cache, hidden: mx.array, token: int, max_depth: int) -> list[Callable[[], None]]:
    calls = [_verify_call(model, cache, token, t) for t in range(1, max_depth + 2)]
    if model.has_mtp and max_depth:
        calls.append(_draft_call(model, cache, hidden, token))
    return calls


def measure_step_costs(model: MTPModel, max_depth: int, rounds: int = 3, prompt: list[int] | None = None) -> StepCosts:
    """What depth "auto" needs, quickly (about 5 s for the 4-bit demo on an idle 2-core CPU):
    ``rounds`` rounds of one verify pass at every T = 1..max_depth+1 and one draft step, keeping
    each one's fastest time. Rounds interleave the sizes, so a slow spell on a shared machine
    hits them alike, and the minimum drops first calls and calls another process interrupted
    (both only ever add time).

    The same calls are then timed at a long context (``CONTEXT_PROBE`` tokens, or what the
    model allows; its attention rows are zeros, see _padded), which gives each cost's growth
    per 1,000 tokens of context (StepCosts.at).

    Where some depth could beat a 1-token verify by ``LOOP_MARGIN`` at full acceptance at either
    context, the two loops are then timed as the engine runs them (``LOOP_TOKENS`` each, the
    fastest of ``LOOP_RUNS`` runs):
    the pipelined AR step, and a depth-1 step, whose excess over a verify of 2 and a draft is
    the speculative loop's own overhead. Where none could (a 4-bit trunk on a CPU), auto runs
    plain AR and neither is needed."""
    prompt = prompt or [(7 * i + 1) % model.vocab_size for i in range(16)]
    cache, hidden = _prefilled(model, prompt)
    best = _fastest(_step_calls(model, cache, hidden, prompt[-1], max_depth), rounds)
    verify_ms = tuple(best[: max_depth + 1])
    draft_ms = best[max_depth + 1] if len(best) > max_depth + 1 else 0.0
    costs = StepCosts(verify_ms, draft_ms, context=len(prompt))
    extra = min(CONTEXT_PROBE, model.max_context - len(prompt) - max_depth - 2)
    if extra >= CONTEXT_PROBE // 4:
        # The short prompt's prefill serves again (on a 4-bit trunk on a CPU it was a seventh of
        # the whole measurement).
        long_cache = _padded(cache, extra)
        far = _fastest(_step_calls(model, long_cache, hidden, prompt[-1], max_depth), rounds)
        per_k = [(f - b) * 1000 / extra for f, b in zip(far, best)]
        costs = replace(costs, verify_per_k=_linear_in_tokens(per_k[: max_depth + 1]),
                        draft_per_k=max(per_k[max_depth + 1], 0.0) if len(per_k) > max_depth + 1 else 0.0)
        del long_cache
    if not (costs.winning(LOOP_MARGIN) or costs.at(model.max_context).winning(LOOP_MARGIN)):
        return costs
    # The pipelined AR step overlaps its host work with the next pass, so it costs no more than a
    # synchronous 1-token verify; a timing above that is a slow spell of the machine, and taking
    # it would make every depth look cheaper than it is (auto then drafts where AR is faster).
    ar_ms = min(min(pipelined_ar_ms(model, prompt, tokens=LOOP_TOKENS) for _ in range(LOOP_RUNS)), verify_ms[0])
    step_ms = min(_loop_step_ms(model, prompt, depth=1, tokens=LOOP_TOKENS) for _ in range(LOOP_RUNS))
    return replace(costs, overhead_ms=max(step_ms - verify_ms[1] - draft_ms, 0.0), ar_ms=ar_ms)


def _linear_in_tokens(growth: list[float]) -> tuple[float, ...]:
    """The growth of a verify pass over t = 1..n tokens as a + b (t - 1), a, b >= 0, fitted by
    least squares: a pass reads the context once (a: what a memory-bound device pays) and
    attends to it once per token (b: what compute pays). Two noisy timings per size give
    noisy differences; the fit shares them across sizes."""
    n = len(growth)
    if n == 1:
        return (max(growth[0], 0.0),)
    mean_t, mean_g = (n - 1) / 2, sum(growth) / n
    b = sum((t - mean_t) * (g - mean_g) for t, g in enumerate(growth)) / sum((t - mean_t) ** 2 for t in range(n))
    b = max(b, 0.0)
    a = max(mean_g - b * mean_t, 0.0)
    return tuple(a + b * t for t in range(n))


def _loop_step_ms(model: MTPModel, prompt: list[int], depth: int, tokens: int) -> float:
    """One step of the speculative loop at a fixed ``depth``, as the engine runs it."""
    from mtplx.engine.speculative import Engine

    engine = Engine(model, depth, SamplingParams(), seed=0)
    for _ in engine.generate(prompt, tokens):
        pass
    return 1000 * engine.stats.decode_seconds / max(engine.stats.steps - 1, 1)
