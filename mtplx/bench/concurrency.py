"""`mtplx bench --model M --concurrency 1,2,4,8`: B streams at once, batched against one at a time.

For every depth and every B (``--rounds`` times, the ways interleaved, the median run of each
way reported), B requests arrive together (prompts cycled from the bench's set,
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

``mlx_lm``: at depth 0, the same B prompts through ``mlx_lm.batch_generate`` on the same trunk
(its own batching: one padded batch, one attention call per layer), timed the same way;
``vs_mlx_lm`` is the batched aggregate tok/s over its, and at temperature 0 ``same_as_mlx_lm``
says whether every stream's tokens are its tokens. Its sampler filters in another order, which
changes the law at temperature, not the cost: speed only there.

``join_cost``: with the largest B less one rows decoding (at the largest depth), a prompt of
``join_tokens`` (4096, less where the model's context is shorter) joins, once per prefill chunk
(the prompt tokens one step feeds, ``--prefill-chunk``): the running rows' step time before it
and while it prefills (their worst gap between two emissions), and the joining prompt's time to
its first token against the same prompt prefilled alone with the same chunk.
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


def _median(runs: list[Streams]) -> Streams:
    """The run of median aggregate tok/s (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r.aggregate_tps)[(len(runs) - 1) // 2]


def mlx_lm_batched(model: Any, tokenizer: Any, requests: list[Any]) -> Streams:
    """The same requests through mlx-lm's own batching (``mlx_lm.batch_generate``) on the trunk."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    p = requests[0].params
    sampler = make_sampler(temp=p.temperature, top_p=p.top_p, top_k=p.top_k)
    t0 = time.perf_counter()
    result = batch_generate(model.trunk.model, tokenizer, [r.prompt for r in requests],
                            max_tokens=[r.max_tokens for r in requests], sampler=sampler, return_token_ids=True)
    wall = time.perf_counter() - t0
    tokens = [list(t) for t in result.token_ids]
    # batch_generate reports no per-stream times; its streams end together here (equal max_tokens)
    return Streams(tokens=tokens, first=[0.0] * len(tokens), last=[wall] * len(tokens), wall=wall)


def _solo_prefill_s(model: Any, request: Any, chunk: int) -> float:
    """Seconds from arrival to the first token for ``request`` alone."""
    from mtplx.engine.batch import BatchDecoder

    decoder = BatchDecoder(model, max_batch=1, prefill_chunk=chunk)
    t0 = time.perf_counter()
    row = decoder.add(request)
    while not row.emitted:
        decoder.step()
    return time.perf_counter() - t0


def join_cost(model: Any, requests: list[Any], prompt_tokens: int, chunk: int, steps: int = 6) -> dict[str, Any]:
    """What a long prompt joining costs the rows already decoding, and what they cost it, with
    ``chunk`` prompt tokens fed per step: the running rows' step time (ms) before it joins and
    while it prefills (the worst: their longest wait between two tokens), and its time to first
    token against the same prompt alone (``requests`` decode; the joining prompt repeats the first
    one's tokens to ``prompt_tokens``)."""
    from dataclasses import replace

    from mtplx.engine.batch import BatchDecoder

    first = requests[0].prompt
    long_prompt = (first * (prompt_tokens // len(first) + 1))[:prompt_tokens]
    joiner = replace(requests[0], prompt=long_prompt, max_tokens=4)
    solo = _solo_prefill_s(model, replace(joiner), chunk)
    decoder = BatchDecoder(model, max_batch=len(requests) + 1, prefill_chunk=chunk)
    for r in requests:
        decoder.add(replace(r, max_tokens=10**6))
    while any(row.prefilling for row in decoder.rows):
        decoder.step()

    def timed() -> float:
        t = time.perf_counter()
        decoder.step()
        return 1000 * (time.perf_counter() - t)

    before = [timed() for _ in range(steps)]
    t0 = time.perf_counter()
    joining = decoder.add(replace(joiner))
    during = []
    while not joining.emitted:
        during.append(timed())
    joined = time.perf_counter() - t0
    return {"running_rows": len(requests), "prompt_tokens": prompt_tokens, "prefill_chunk": chunk,
            "step_ms_before": round(statistics.median(before), 2), "step_ms_while_joining": round(statistics.mean(during), 2),
            "worst_gap_s": round(max(during) / 1000, 4), "steps_while_joining": len(during),
            "prefill_s": round(joined, 4), "solo_prefill_s": round(solo, 4),
            "prefill_vs_solo": round(joined / solo, 3) if solo > 0 else None}


def run_concurrency(model: Any, tokenizer: Any, prompts: list[str], streams: list[int], depths: list[int],
                    max_tokens: int, params: SamplingParams, draft: SamplingParams | None = None, seed: int = 0,
                    progress: Callable[[str], None] | None = None, join_tokens: int = 4096,
                    prefill_chunks: list[int] | None = None, reference: bool = True, rounds: int = 1) -> dict[str, Any]:
    """{"streams": {B: {depth: {"batched": ..., "one_at_a_time": ..., "speedup": ..., "identical": ...,
    at depth 0 "mlx_lm": ..., "vs_mlx_lm": ...}}}, "join_cost": [one per prefill chunk]}."""
    from mtplx.core import knobs

    say = progress or (lambda _: None)
    for d in depths:  # warm-up: first calls compile kernels and allocate
        batched(model, _requests(model, tokenizer, prompts, min(2, max(streams)), d, 8, params, draft, seed))
        one_at_a_time(model, _requests(model, tokenizer, prompts, 1, d, 8, params, draft, seed))
    if reference and 0 in depths:
        mlx_lm_batched(model, tokenizer, _requests(model, tokenizer, prompts, min(2, max(streams)), 0, 8, params, draft, seed))
    out: dict[str, Any] = {}
    for b in streams:
        for d in depths:
            reqs = _requests(model, tokenizer, prompts, b, d, max_tokens, params, draft, seed)
            ways: dict[str, list[Streams]] = {"batched": [], "alone": [], "mlx_lm": []}
            for _ in range(rounds):  # the ways interleaved, so a load change hits each alike
                ways["batched"].append(batched(model, reqs))
                ways["alone"].append(one_at_a_time(model, reqs))
                if reference and d == 0:
                    ways["mlx_lm"].append(mlx_lm_batched(model, tokenizer, reqs))
            together, alone = _median(ways["batched"]), _median(ways["alone"])
            cell = {"batched": together.as_dict(), "one_at_a_time": alone.as_dict(),
                    "speedup": round(together.aggregate_tps / alone.aggregate_tps, 4) if alone.aggregate_tps else None,
                    "identical": together.tokens == alone.tokens}
            line = (f"{b} streams, depth {d}: {together.aggregate_tps:.1f} tok/s batched, "
                    f"{alone.aggregate_tps:.1f} one at a time ({cell['speedup']}x)")
            if ways["mlx_lm"]:
                theirs = _median(ways["mlx_lm"])
                cell["mlx_lm"] = theirs.as_dict()
                cell["vs_mlx_lm"] = round(together.aggregate_tps / theirs.aggregate_tps, 4) if theirs.aggregate_tps else None
                cell["vs_mlx_lm_by_round"] = [round(a.aggregate_tps / t.aggregate_tps, 4)
                                              for a, t in zip(ways["batched"], ways["mlx_lm"]) if t.aggregate_tps]
                if params.temperature == 0:
                    cell["same_as_mlx_lm"] = together.tokens == theirs.tokens
                line += f"; mlx_lm.batch_generate {theirs.aggregate_tps:.1f} ({cell['vs_mlx_lm']}x)"
            out.setdefault(str(b), {})[str(d)] = cell
            say(line)
    join = []
    n = min(join_tokens, model.max_context - 64)  # the context must hold it and a few tokens more
    if n > 0 and max(streams) > 1:
        b = max(streams) - 1
        for chunk in prefill_chunks or [knobs.PREFILL_CHUNK]:
            j = join_cost(model, _requests(model, tokenizer, prompts, b, max(depths), max_tokens, params, draft, seed),
                          n, chunk)
            join.append(j)
            say(f"a {n}-token prompt joining {b} rows, {chunk} prompt tokens per step: their worst gap "
                f"{j['worst_gap_s']:.2f} s ({j['step_ms_before']:.1f} ms per step before); its prefill "
                f"{j['prefill_s']:.2f} s, {j['prefill_vs_solo']}x alone")
    return {"streams": out, "join_cost": join, "max_tokens": max_tokens, "prompts": len(prompts), "rounds": rounds,
            "how": "B requests arrive together; batched = one BatchDecoder (max_batch B); one at a time = the "
                   "single-sequence engine in arrival order (mtplx serve --max-batch 1); mlx_lm = "
                   "mlx_lm.batch_generate on the same trunk (depth 0)"}


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
    refs = [(b, c) for b, row in report["streams"].items() for d, c in row.items() if "mlx_lm" in c]
    for b, c in refs:
        same = c.get("same_as_mlx_lm")
        lines.append(f"{b} streams, depth 0: {c['batched']['aggregate_tokens_per_s']:.1f} tok/s batched against "
                     f"{c['mlx_lm']['aggregate_tokens_per_s']:.1f} for mlx_lm.batch_generate ({c['vs_mlx_lm']:.3f}x)"
                     + ("" if same is None else f", {'the same tokens' if same else 'OTHER tokens'}"))
    joins = report.get("join_cost") or []
    if joins:
        j = joins[0]
        lines.append(f"a {j['prompt_tokens']}-token prompt joining {j['running_rows']} decoding rows "
                     f"(their step: {j['step_ms_before']:.1f} ms before it joins):")
        head = f"{'chunk':>7} {'worst gap s':>12} {'steps':>6} {'its prefill s':>14} {'alone s':>8} {'x alone':>8}"
        lines += [head, "-" * len(head)]
        for j in joins:
            lines.append(f"{j['prefill_chunk']:>7} {j['worst_gap_s']:>12.2f} {j['steps_while_joining']:>6} "
                         f"{j['prefill_s']:>14.2f} {j['solo_prefill_s']:>8.2f} {j['prefill_vs_solo']:>8.2f}")
    return "\n".join(lines)
