"""`mtplx bench --model M --concurrency 1,2,4,8`: B streams at once, batched against one at a time.

For every depth and every B, B requests arrive together (prompts cycled from the bench's set,
seeds ``seed + i``) and are decoded twice in the same process:

- batched: one :class:`~mtplx.engine.batch.BatchDecoder` with ``max_batch=B``, every row joining
  at the first step (what ``mtplx serve`` does with B simultaneous requests);
- one at a time: the single-sequence engine, the B requests in arrival order (``--max-batch 1``):
  request i waits for the i before it, which its time to first token includes.

Figures per (B, depth): aggregate tokens/s (all tokens over the wall time until the last stream
ends), per-stream tokens/s (each stream's tokens over the time from its first token to its last,
averaged), and time to first token (mean over the streams, from the common arrival). A warm-up
of each depth precedes the measurements. ``identical``: every stream's tokens are the same both
ways (a row's output depends on its own prompt, settings and seed only).

``join_cost``: with the largest B less one rows decoding (at the largest depth), a prompt of
``join_tokens`` (4096, less where the model's context is shorter) joins; the running rows' step
time before it and while its prompt is prefilled in their steps (``prefill_chunk`` tokens per step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine


@dataclass
class Streams:
    """B streams decoded one way: per stream its tokens, first-token and last-token times."""

    tokens: list[list[int]] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    wall: float = 0.0

    @property
    def aggregate_tps(self) -> float:
        return sum(map(len, self.tokens)) / self.wall if self.wall > 0 else 0.0

    @property
    def per_stream_tps(self) -> float:
        rates = [(len(t) - 1) / (b - a) for t, a, b in zip(self.tokens, self.first, self.last) if len(t) > 1 and b > a]
        return statistics.mean(rates) if rates else 0.0

    @property
    def ttft(self) -> float:
        return statistics.mean(self.first) if self.first else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"aggregate_tokens_per_s": round(self.aggregate_tps, 3), "per_stream_tokens_per_s": round(self.per_stream_tps, 3),
                "ttft_s": round(self.ttft, 4), "ttft_max_s": round(max(self.first, default=0.0), 4),
                "wall_s": round(self.wall, 4), "tokens": sum(map(len, self.tokens))}


def _requests(model: Any, tokenizer: Any, prompts: list[str], b: int, depth: int, max_tokens: int,
              params: SamplingParams, draft: SamplingParams | None, seed: int) -> list[Any]:
    from mtplx.api import encode_prompt
    from mtplx.engine.batch import RowRequest

    eos = frozenset(getattr(tokenizer, "eos_token_ids", None) or [])
    return [RowRequest(prompt=encode_prompt(tokenizer, prompts[i % len(prompts)]), max_tokens=max_tokens,
                       params=params, depth=depth, draft_params=draft, seed=seed + i, eos=eos) for i in range(b)]


def batched(model: Any, requests: list[Any]) -> Streams:
    from mtplx.engine.batch import BatchDecoder

    decoder = BatchDecoder(model, max_batch=len(requests))
    out = Streams(tokens=[[] for _ in requests], first=[0.0] * len(requests), last=[0.0] * len(requests))
    t0 = time.perf_counter()
    rows = [decoder.add(r) for r in requests]
    index = {id(r): i for i, r in enumerate(rows)}
    while len(decoder):
        for row, emitted in decoder.step():
            if emitted.tokens:
                i, now = index[id(row)], time.perf_counter() - t0
                if not out.tokens[i]:
                    out.first[i] = now
                out.tokens[i] += emitted.tokens
                out.last[i] = now
    out.wall = time.perf_counter() - t0
    return out


def one_at_a_time(model: Any, requests: list[Any]) -> Streams:
    out = Streams()
    t0 = time.perf_counter()
    for r in requests:
        engine = Engine(model, r.depth, r.params, r.draft_params, r.seed)
        tokens: list[int] = []
        for step in engine.generate(r.prompt, r.max_tokens, r.eos):
            now = time.perf_counter() - t0
            if not tokens and step.tokens:
                out.first.append(now)
            tokens += step.tokens
        out.tokens.append(tokens)
        out.last.append(time.perf_counter() - t0)
    out.wall = time.perf_counter() - t0
    return out


def join_cost(model: Any, requests: list[Any], prompt_tokens: int, steps: int = 6) -> dict[str, Any]:
    """What a long prompt joining costs the rows already decoding: their step time (ms) before it
    joins and while its prompt is prefilled, chunk by chunk, in their steps (``requests`` decode;
    the joining prompt repeats the first one's tokens to ``prompt_tokens``)."""
    from dataclasses import replace

    from mtplx.engine.batch import BatchDecoder

    decoder = BatchDecoder(model, max_batch=len(requests) + 1)
    for r in requests:
        decoder.add(replace(r, max_tokens=10**6))
    while any(row.prefilling for row in decoder.rows):
        decoder.step()

    def timed() -> float:
        t = time.perf_counter()
        decoder.step()
        return 1000 * (time.perf_counter() - t)

    before = [timed() for _ in range(steps)]
    first = requests[0].prompt
    long_prompt = (first * (prompt_tokens // len(first) + 1))[:prompt_tokens]
    joining = decoder.add(replace(requests[0], prompt=long_prompt, max_tokens=4))
    during = []
    while joining.prefilling or not during:
        during.append(timed())
    return {"running_rows": len(requests), "prompt_tokens": prompt_tokens, "prefill_chunk": decoder.prefill_chunk,
            "step_ms_before": round(statistics.median(before), 2), "step_ms_while_joining": round(statistics.mean(during), 2),
            "steps_while_joining": len(during)}


def run_concurrency(model: Any, tokenizer: Any, prompts: list[str], streams: list[int], depths: list[int],
                    max_tokens: int, params: SamplingParams, draft: SamplingParams | None = None, seed: int = 0,
                    progress: Callable[[str], None] | None = None, join_tokens: int = 4096) -> dict[str, Any]:
    """{"streams": {B: {depth: {"batched": ..., "one_at_a_time": ..., "speedup": ..., "identical": ...}}}}."""
    say = progress or (lambda _: None)
    for d in depths:  # warm-up: first calls compile kernels and allocate
        batched(model, _requests(model, tokenizer, prompts, min(2, max(streams)), d, 8, params, draft, seed))
        one_at_a_time(model, _requests(model, tokenizer, prompts, 1, d, 8, params, draft, seed))
    out: dict[str, Any] = {}
    for b in streams:
        for d in depths:
            reqs = _requests(model, tokenizer, prompts, b, d, max_tokens, params, draft, seed)
            together = batched(model, reqs)
            alone = one_at_a_time(model, reqs)
            cell = {"batched": together.as_dict(), "one_at_a_time": alone.as_dict(),
                    "speedup": round(together.aggregate_tps / alone.aggregate_tps, 4) if alone.aggregate_tps else None,
                    "identical": together.tokens == alone.tokens}
            out.setdefault(str(b), {})[str(d)] = cell
            say(f"{b} streams, depth {d}: {together.aggregate_tps:.1f} tok/s batched, "
                f"{alone.aggregate_tps:.1f} one at a time ({cell['speedup']}x)")
    join = None
    n = min(join_tokens, model.max_context - 64)  # the context must hold it and a few tokens more
    if n > 0 and max(streams) > 1:
        b = max(streams) - 1
        join = join_cost(model, _requests(model, tokenizer, prompts, b, max(depths), max_tokens, params, draft, seed), n)
        say(f"a {n}-token prompt joining {b} rows: {join['step_ms_before']:.1f} ms per step before, "
            f"{join['step_ms_while_joining']:.1f} ms over the {join['steps_while_joining']} steps of its prefill")
    return {"streams": out, "join_cost": join, "max_tokens": max_tokens, "prompts": len(prompts),
            "how": "B requests arrive together; batched = one BatchDecoder (max_batch B); one at a time = the "
                   "single-sequence engine in arrival order (mtplx serve --max-batch 1)"}


def table(report: dict[str, Any]) -> str:
    head = (f"{'streams':>7} {'depth':>5} {'aggregate tok/s':>16} {'(1 at a time)':>14} {'speedup':>8} "
            f"{'per-stream tok/s':>17} {'(1 at a time)':>14} {'TTFT s':>7} {'(1 at a time)':>14} {'same':>5}")
    lines = [head, "-" * len(head)]
    for b, row in report["streams"].items():
        for d, c in row.items():
            x, y = c["batched"], c["one_at_a_time"]
            lines.append(f"{b:>7} {d:>5} {x['aggregate_tokens_per_s']:>16.1f} {y['aggregate_tokens_per_s']:>14.1f} "
                         f"{(c['speedup'] or 0):>7.2f}x {x['per_stream_tokens_per_s']:>17.1f} "
                         f"{y['per_stream_tokens_per_s']:>14.1f} {x['ttft_s']:>7.2f} {y['ttft_s']:>14.2f} "
                         f"{'yes' if c['identical'] else 'NO':>5}")
    j = report.get("join_cost")
    if j:
        lines.append(f"a {j['prompt_tokens']}-token prompt joining {j['running_rows']} decoding rows: their step takes "
                     f"{j['step_ms_while_joining']:.1f} ms for {j['steps_while_joining']} steps ({j['prefill_chunk']} "
                     f"prompt tokens per step) against {j['step_ms_before']:.1f} ms before")
    return "\n".join(lines)
