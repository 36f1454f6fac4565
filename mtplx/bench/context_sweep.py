"""`mtplx bench --context 1k,8k,32k`: decode speed and acceptance as the context grows.

At each context length the context is prefilled once into a prompt cache: the shipped agent
trace's texts (a coding agent's system prompt, tool definitions, file contents and test output)
then the bundled probe text, repeated to length, ending with a short code prompt that every
length shares, so each length decodes the same task after more context. Each depth (AR, each
fixed depth, auto) then decodes -n tokens from its own copy of that cache, interleaved in one
process (each round in an order rotated by one), and reports tok/s, tokens per step and
acceptance by draft position (P(draft k accepted) over the steps that drafted k, the MTP head's
drafts only; auto's mix of depths too, and the share of tokens that came from drafts copied out
of the context, which the engine makes by default: see mtplx.engine.lookup).

With ``--shape`` (real shapes, random weights) the components of a step are timed at each
context through ``mtplx.bench.shape_bench``, the context prefilled rather than generated;
acceptance there is the one given (or the demo head's), not measured: random weights accept
nothing worth reporting.

A length over what the model's config allows (``max_position_embeddings``, less the tokens
decoded) is dropped, and the report says so; the longest length that fits is measured instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx.bench.runner import depth_order, noise_note
from mtplx.core import knobs
from mtplx.errors import MtplxError

TAIL = "\n\ndef parse_amount(text, where):\n    \"\"\"An amount as written in an export, as a Decimal.\"\"\"\n"
MAX_LENGTH = 1 << 20


def parse_lengths(text: str) -> list[int]:
    """'1k,8k,32k' -> [1024, 8192, 32768] (k is 1024 tokens); plain integers are tokens."""
    out = []
    for item in text.split(","):
        s = item.strip().lower()
        try:
            n = int(s[:-1]) * 1024 if s.endswith("k") else int(s)
        except ValueError:
            n = 0
        if not 16 <= n <= MAX_LENGTH:
            raise MtplxError(f"--context {text!r}: {item.strip()!r} is not a context length",
                             fix=f"give token counts from 16 to {MAX_LENGTH} separated by commas, e.g. 1k,8k,32k "
                                 "(k = 1024 tokens) or 2000,4000")
        out.append(n)
    return sorted(set(out))


def cap_lengths(lengths: list[int], max_context: int, reserve: int) -> tuple[list[int], list[str]]:
    """Lengths that leave ``reserve`` tokens of the context free; each one over that is dropped
    (a note says so) and the longest length that fits is measured in its place."""
    limit = max_context - reserve
    if limit < 16:
        raise MtplxError(f"the model's context of {max_context} tokens leaves no room for a context after the "
                         f"{reserve} tokens the decode needs", fix="pass a smaller -n")
    kept = [n for n in lengths if n <= limit]
    dropped = [n for n in lengths if n > limit]
    notes = []
    if dropped:
        if limit not in kept:
            kept.append(limit)
        notes.append(f"{', '.join(map(str, dropped))} dropped: over the model's context of {max_context} tokens "
                     f"(max_position_embeddings in its config) less the {reserve} tokens decoded; measured at "
                     f"{limit} instead")
    return sorted(kept), notes


def context_text() -> str:
    """The text contexts are made of: the sample agent trace's last request, then the probe."""
    import json

    from mtplx.artifact.probe import default_probe_text
    from mtplx.bench.agent_trace import SAMPLE, load_trace

    last = load_trace(SAMPLE).requests[-1]
    parts = [json.dumps(last.tools, indent=1)] if last.tools else []
    for m in last.messages:
        parts.append(m["content"])
        parts += [json.dumps(c["function"]["arguments"], indent=1) for c in m.get("tool_calls", [])]
    return "\n\n".join(p for p in parts if p) + "\n\n" + default_probe_text()


def context_ids(tokenizer: Any, length: int, body: list[int] | None = None) -> list[int]:
    """``length`` token ids: the context text, repeated as needed, then :data:`TAIL`."""
    body = body if body is not None else list(tokenizer.encode(context_text(), verbose=False))
    tail = list(tokenizer.encode(TAIL))
    n = length - len(tail)
    return (body * (n // len(body) + 1))[:n] + tail


def _depth_key(d: int | str) -> str:
    return "AR" if d == 0 else str(d)


@dataclass
class ContextPoint:
    context: int
    prefill_s: float = 0.0
    depths: dict[str, dict[str, Any]] = field(default_factory=dict)  # "AR", "1", .., "auto"

    def auto_vs_best(self) -> tuple[str, float] | None:
        """(the fastest fixed depth, auto's tok/s over its), where both were run."""
        fixed = {k: r for k, r in self.depths.items() if k != knobs.AUTO}
        if knobs.AUTO not in self.depths or not fixed:
            return None
        best = max(fixed, key=lambda k: fixed[k]["tps"])
        return best, self.depths[knobs.AUTO]["tps"] / fixed[best]["tps"] if fixed[best]["tps"] else 0.0

    def auto_ratios(self) -> list[float]:
        """Auto's tok/s over the best fixed depth's, round by round: each round runs every depth
        back to back on the same cache and seed, so a round's ratio is the difference plus the
        machine's noise, and their range is what a verdict must clear."""
        verdict = self.auto_vs_best()
        if verdict is None:
            return []
        auto, best = (self.depths[k].get("round_tps", []) for k in (knobs.AUTO, verdict[0]))
        return [a / b for a, b in zip(auto, best) if b > 0]

    def as_dict(self) -> dict[str, Any]:
        verdict = self.auto_vs_best()
        return {"context": self.context, "prefill_s": round(self.prefill_s, 4),
                "prefill_tps": round(self.context / self.prefill_s, 2) if self.prefill_s > 0 else None,
                "depths": self.depths} | (
                    {"best_fixed": verdict[0], "auto_vs_best_fixed": round(verdict[1], 4),
                     "auto_vs_best_fixed_by_round": [round(r, 4) for r in self.auto_ratios()]} if verdict else {})


@dataclass
class ContextReport:
    model: str
    device: str
    max_context: int
    max_tokens: int
    temperature: float
    points: list[ContextPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: str = "decoded"  # "decoded": a model run end to end; "projected": --shape components

    def table(self) -> str:
        head = f"{'context':>7} {'depth':>5} {'tok/s':>9} {'vs AR':>6} {'tok/step':>8}  acceptance by position"
        lines = [head, "-" * len(head)]
        for p in self.points:
            for key, r in p.depths.items():
                acc = " ".join(f"{a:.2f}" for a in r.get("acceptance", [])) or "-"
                notes = ([r["mix"]] if r.get("mix") else []) + (
                    [f"{100 * r['copied_share']:.0f}% copied from the context"] if r.get("copied_share") else [])
                mix = f"  ({'; '.join(notes)})" if notes else ""
                lines.append(f"{p.context:>7} {key:>5} {r['tps']:>9.2f} {r['speedup']:>5.2f}x "
                             f"{r['tokens_per_step']:>8.2f}  {acc}{mix}")
            if p.prefill_s:
                lines.append(f"{p.context:>7} prefill {p.prefill_s:.2f} s ({p.context / p.prefill_s:.0f} tok/s)")
            verdict = p.auto_vs_best()
            if verdict:
                ratios = p.auto_ratios()
                spread = f", {min(ratios):.3f}-{max(ratios):.3f}x round by round" if len(ratios) > 1 else ""
                lines.append(f"{p.context:>7} auto runs at {verdict[1]:.3f}x the best fixed depth ({verdict[0]}){spread}")
                note = noise_note(ratios, f"the best fixed depth ({verdict[0]})")
                if note:
                    lines.append(f"{p.context:>7}   {note}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "max_context": self.max_context,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "measured": self.measured,
                "points": [p.as_dict() for p in self.points], "notes": self.notes}


def _summary(runs: list[Any], ar_tps: float | None) -> dict[str, Any]:
    """Totals over a depth's runs (one per round): tokens over decode seconds, drafts accepted
    over drafts made per position."""
    generated = sum(s.generated for s in runs)
    seconds = sum(s.decode_seconds for s in runs)
    steps = sum(s.steps for s in runs)
    depth = max(s.depth for s in runs)
    drafted = [sum(s.drafted[k] for s in runs if k < len(s.drafted)) for k in range(depth)]
    accepted = [sum(s.accepted[k] for s in runs if k < len(s.accepted)) for k in range(depth)]
    tps = generated / seconds if seconds > 0 else 0.0
    out = {"tps": round(tps, 3), "speedup": round(tps / ar_tps, 4) if ar_tps else 1.0,
           "round_tps": [round(s.tokens_per_second, 3) for s in runs],
           "tokens_per_step": round(generated / steps, 4) if steps else 0.0, "generated": generated,
           "acceptance": [round(a / d, 4) if d else 0.0 for a, d in zip(accepted, drafted)]}
    if runs[0].adaptive:
        out["mix"] = runs[-1].mode.removeprefix("MTP auto").strip(" ()")
    # Tokens from drafts copied out of the context (engine/lookup.py, on by default): they count
    # in tok/s, not in the head's acceptance by position.
    copied = sum(getattr(s, "from_lookup", 0) for s in runs)
    if copied:
        out["copied_share"] = round(copied / generated, 4)
    return out


def run_context_sweep(model: Any, tokenizer: Any, lengths: list[int], depths: list[int | str], *,
                      max_tokens: int = 128, temperature: float = 0.0, seed: int = 0, rounds: int = 1,
                      model_name: str = "", progress: Callable[[str], None] | None = None) -> ContextReport:
    """Prefill each context length once, then decode ``max_tokens`` at each depth from a copy of
    that cache (AR first: the speedups are against it)."""
    import mtplx
    from mtplx.core.device import device_name

    say = progress or (lambda _: None)
    depths = sorted(set(depths) | {0}, key=depth_order)
    fixed = [d for d in depths if isinstance(d, int)]
    deepest = max([*fixed, knobs.AUTO_MAX_DEPTH if knobs.AUTO in depths else 0])
    kept, notes = cap_lengths(lengths, model.max_context, max_tokens + deepest + 1)
    report = ContextReport(model_name, device_name(), model.max_context, max_tokens, temperature, notes=notes)
    body = list(tokenizer.encode(context_text(), verbose=False))
    for length in kept:
        ids = context_ids(tokenizer, length, body)
        base = mtplx.make_prompt_cache(model)
        say(f"context {length}: prefilling")
        # One token: the cache keeps the whole prompt and its end-of-prompt snapshot, the head's
        # cache included where the model has a head.
        for first in mtplx.stream_generate(model, tokenizer, ids, max_tokens=1, temperature=0.0,
                                           depth=1 if model.has_mtp else 0, prompt_cache=base):
            pass
        point = ContextPoint(length, prefill_s=first.stats.seconds["prefill"])
        reuse = base.reusable(ids)
        runs: dict[str, list[Any]] = {_depth_key(d): [] for d in depths}
        for r in range(rounds):
            # Each round starts one depth later, so none always runs first or just after the
            # deepest (a run's speed depends on what ran before it: 0.93x against 0.99x for the
            # same two loops at 4K on this CPU, by order alone).
            for d in depths[r % len(depths):] + depths[: r % len(depths)]:
                cache = base.copy_prefix(reuse)
                for last in mtplx.stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                                                  temperature=temperature, depth=d, seed=seed + r, prompt_cache=cache):
                    pass
                runs[_depth_key(d)].append(last.stats)
                say(f"context {length}, depth {d}, round {r + 1}: {last.stats.tokens_per_second:.1f} tok/s")
        ar = _summary(runs["AR"], None)["tps"]
        point.depths = {k: _summary(v, ar) for k, v in runs.items()}
        report.points.append(point)
    return report


def run_shape_context_sweep(shape_ref: str, lengths: list[int], *, trunk_bits: int = 4, layers: int | None = None,
                            acceptance: list[float] | None = None, max_depth: int | None = None,
                            draft_vocab: int | None = None, bandwidth_gbs: float = 400.0, repeats: int = 3,
                            seed: int = 0, progress: Callable[[str], None] | None = None) -> ContextReport:
    """``--shape``: the step's components timed at each context (prefilled), composed to the full
    depth; tok/s per depth projected from them with the given acceptance."""
    from mtplx.bench.shape_bench import auto_choice, run_shape_bench
    from mtplx.bench.shape_models import load_shape
    from mtplx.model.shapes import tokens_per_step

    shape = load_shape(shape_ref)
    max_context = int(shape.text_config.get("max_position_embeddings", MAX_LENGTH))
    kept, notes = cap_lengths(lengths, max_context, 1)
    report = None
    for length in kept:
        r = run_shape_bench(shape_ref, trunk_bits=trunk_bits, layers=layers, prompt_tokens=length,
                            acceptance=acceptance, max_depth=max_depth, draft_vocab=draft_vocab,
                            bandwidth_gbs=bandwidth_gbs, repeats=repeats, seed=seed, progress=progress)
        if report is None:
            report = ContextReport(shape.name, r.device, max_context, 0, 0.0, notes=notes, measured="projected")
            report.notes.append(f"--shape: random weights; acceptance {', '.join(f'{a:g}' for a in r.acceptance)} is "
                                f"{r.acceptance_source}, not measured; tok/s are the composed step costs' projection")
        composed = r.composed()
        ar_tps = 1000.0 / composed["ar_step"]
        proj = r.projection()
        point = ContextPoint(length, prefill_s=composed["prefill"]["with_head"] / 1000.0)
        point.depths["AR"] = {"tps": round(ar_tps, 3), "speedup": 1.0, "tokens_per_step": 1.0, "acceptance": [],
                              "ar_step_ms": round(composed["ar_step"], 3)}
        for d, x in proj.items():
            point.depths[d] = {"tps": round(ar_tps * x, 3), "speedup": x,
                               "tokens_per_step": round(tokens_per_step(r.acceptance, int(d)), 4),
                               "acceptance": r.acceptance[: int(d)]}
        auto = auto_choice(r.acceptance, proj)
        point.depths["auto"] = {**(point.depths[str(auto)] if auto else point.depths["AR"]), "mix": f"d{auto}"}
        report.points.append(point)
    assert report is not None  # cap_lengths keeps at least one length
    return report
