"""`mtplx bench --prefill 4k,16k`: prompt processing against mlx-lm's, on the same weights.

An agent's first turn is 10-30K tokens, prefilled cold, so its time to first token is prompt
processing. At each length the same ids (the context sweep's: an agent's system prompt, tools
and files, repeated to length) go to the first token four ways, in interleaved rounds on one
machine, and each way reports its median:

- ``mtplx``: the engine's decoder at its prefill chunk, for a request that may draft (depth 1),
  so the head's KV cache is filled over the whole prompt too: what the issue calls "with the
  head's cache included";
- ``mtplx_no_head``: the same for a plain request (depth 0), which never reads the head's cache
  and so never fills it (where depth auto finds that no depth pays, a request runs so);
- ``mlx_lm``: ``mlx_lm.generate.generate_step`` at its own default ``prefill_step_size``, on the
  trunk's mlx-lm model: what ``mlx_lm.generate`` does before its first token;
- ``mlx_lm_same_chunk``: the same at mtplx's chunk, so a difference from the chunk size alone
  shows apart from one in the work done.

Each way starts from an empty cache and ends when its first token is on the host (both sample
greedily from the last position's logits). Ratios are tok/s of mtplx over mlx-lm's, so above 1
is faster; a ratio whose rounds straddle 1 is reported as within noise.

mtplx gives the head rows for the prompt's last ``knobs.head_window()`` positions only (the
head needs the trunk's last layer at every row it keeps). What that window costs the head is
:func:`window_agreement`: teacher-forced on the same text, the head's greedy agreement with the
trunk over the positions after the prompt, with the head's cache started at each window.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx.bench.context_sweep import cap_lengths, context_ids, context_text
from mtplx.bench.runner import noise_note

AGREEMENT_SPAN = 256  # positions after the "prompt" a window's agreement is measured over
WAYS = ("mtplx", "mtplx_no_head", "mlx_lm", "mlx_lm_same_chunk")
MLX_LM_DEFAULT_STEP = 2048  # mlx_lm.generate.generate_step's prefill_step_size


@dataclass
class PrefillPoint:
    tokens: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WAYS})
    agreement: dict[int, float] = field(default_factory=dict)  # head window -> greedy agreement

    def tps(self, way: str) -> float:
        return self.tokens / statistics.median(self.seconds[way])

    def ratio(self, way: str, against: str) -> float:
        return self.tps(way) / self.tps(against)

    def ratios(self, way: str, against: str) -> list[float]:
        return [b / a for a, b in zip(self.seconds[way], self.seconds[against])]

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens,
                "tps": {w: round(self.tps(w), 2) for w in WAYS},
                "seconds": {w: [round(s, 4) for s in v] for w, v in self.seconds.items()},
                "mtplx_vs_mlx_lm": round(self.ratio("mtplx", "mlx_lm"), 4),
                "mtplx_vs_mlx_lm_same_chunk": round(self.ratio("mtplx", "mlx_lm_same_chunk"), 4),
                "head_share": round(1 - self.ratio("mtplx", "mtplx_no_head"), 4),
                "head_window_agreement": {str(w): round(a, 4) for w, a in self.agreement.items()}}


@dataclass
class PrefillReport:
    model: str
    device: str
    chunk: int
    rounds: int
    window: int
    points: list[PrefillPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = (f"{'tokens':>7} {'mtplx':>9} {'no head':>9} {'mlx-lm':>9} {'same chunk':>10} "
                f"{'vs mlx-lm':>9} {'vs same chunk':>13}")
        lines = [f"tok/s to the first token, median of {self.rounds} round(s); mtplx chunk {self.chunk}, "
                 f"mlx-lm's default chunk {MLX_LM_DEFAULT_STEP}", head, "-" * len(head)]
        for p in self.points:
            lines.append(f"{p.tokens:>7} {p.tps('mtplx'):>9.1f} {p.tps('mtplx_no_head'):>9.1f} {p.tps('mlx_lm'):>9.1f} "
                         f"{p.tps('mlx_lm_same_chunk'):>10.1f} {p.ratio('mtplx', 'mlx_lm'):>8.3f}x "
                         f"{p.ratio('mtplx', 'mlx_lm_same_chunk'):>12.3f}x")
        for p in self.points:
            for against in ("mlx_lm", "mlx_lm_same_chunk"):
                note = noise_note(p.ratios("mtplx", against), f"{against} at {p.tokens} tokens")
                if note:
                    lines.append(f"note: {note}")
            lines.append(f"note: at {p.tokens} tokens the head's cache (window {self.window or 'all'}) costs "
                         f"{100 * (1 - p.ratio('mtplx', 'mtplx_no_head')):.1f}% of mtplx's prefill speed")
            if p.agreement:
                cells = ", ".join(f"{w or 'all'}: {a:.3f}" for w, a in p.agreement.items())
                lines.append(f"head window against its greedy agreement over the last {AGREEMENT_SPAN} tokens of "
                             f"{p.tokens} (depth 1's acceptance at temperature 0): {cells}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "chunk": self.chunk, "rounds": self.rounds,
                "head_window": self.window,
                "mlx_lm_prefill_step_size": MLX_LM_DEFAULT_STEP, "points": [p.as_dict() for p in self.points],
                "notes": self.notes}


def _mtplx_seconds(model: Any, ids: list[int], depth: int, chunk: int) -> float:
    from mtplx.engine.batch import BatchDecoder, RowRequest
    from mtplx.engine.sampling import SamplingParams

    decoder = BatchDecoder(model, max_batch=1, prefill_chunk=chunk)
    t0 = time.perf_counter()
    row = decoder.add(RowRequest(prompt=ids, max_tokens=1, params=SamplingParams(temperature=0.0), depth=depth,
                                 lookup=0))
    while not row.emitted:
        decoder.step()
    return time.perf_counter() - t0


def _mlx_lm_seconds(model: Any, ids: list[int], step: int) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    token, _ = next(generate_step(mx.array(ids), model.trunk.model, max_tokens=1, prefill_step_size=step))
    int(token)
    return time.perf_counter() - t0


def run_prefill(model: Any, tokenizer: Any, lengths: list[int], *, rounds: int = 2, chunk: int | None = None,
                windows: list[int] | None = None, model_name: str = "",
                progress: Callable[[str], None] | None = None) -> PrefillReport:
    """Time the four ways (module docstring) at each length, ``rounds`` times, interleaved; with
    ``windows``, each head window's greedy agreement at each length (:func:`window_agreement`)."""
    from mtplx.core import knobs
    from mtplx.core.device import device_name

    say = progress or (lambda _: None)
    chunk = chunk or knobs.PREFILL_CHUNK
    kept, notes = cap_lengths(lengths, model.max_context, 1)
    report = PrefillReport(model_name, device_name(), chunk, rounds, knobs.head_window(), notes=notes)
    if not model.has_mtp:
        report.notes.append("this model has no MTP head: 'mtplx' and 'no head' are the same work")
    body = list(tokenizer.encode(context_text(), verbose=False))
    ways: dict[str, Callable[[list[int]], float]] = {
        "mtplx": lambda ids: _mtplx_seconds(model, ids, 1 if model.has_mtp else 0, chunk),
        "mtplx_no_head": lambda ids: _mtplx_seconds(model, ids, 0, chunk),
        "mlx_lm": lambda ids: _mlx_lm_seconds(model, ids, MLX_LM_DEFAULT_STEP),
        "mlx_lm_same_chunk": lambda ids: _mlx_lm_seconds(model, ids, chunk),
    }
    warm = context_ids(tokenizer, min(64, kept[0]), body)
    for run in ways.values():  # first calls compile and allocate
        run(warm)
    for length in kept:
        ids = context_ids(tokenizer, length, body)
        point = PrefillPoint(length)
        for r in range(rounds):
            # Alternate the order each round, so a slow spell of the machine hits every way alike.
            for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
                seconds = ways[way](ids)
                point.seconds[way].append(seconds)
                say(f"prefill {length} tokens, {way}, round {r + 1}: {length / seconds:.1f} tok/s")
        if windows and model.has_mtp and length > 2 * AGREEMENT_SPAN:
            say(f"prefill {length} tokens: the head's agreement at windows {windows}")
            point.agreement = window_agreement(model, ids, length - AGREEMENT_SPAN, windows)
        report.points.append(point)
    return report


def window_agreement(model: Any, ids: list[int], prompt_len: int, windows: list[int],
                     chunk: int = 512) -> dict[int, float]:
    """Per head window W (0: the whole prompt): the share of positions i >= ``prompt_len`` where
    the head's argmax at row i (trunk hidden at i, token i+1) is the trunk's greedy token at i+2,
    with the head's rows starting at ``prompt_len - W``: depth 1's greedy acceptance on this text
    as a decode after a cold prefill with that window would see it (rows after the prompt all
    kept, as the engine keeps them)."""
    import mlx.core as mx

    cache = model.make_cache()
    hiddens, greedy = [], []
    for s in range(0, len(ids), chunk):
        logits, hidden = model.trunk_forward(mx.array([ids[s : s + chunk]]), cache)
        hiddens.append(hidden)
        greedy.append(mx.argmax(logits[0], axis=-1))
        mx.eval(hiddens[-1], greedy[-1])
    hidden, target = mx.concatenate(hiddens, axis=1), mx.concatenate(greedy)  # target[i]: the token after i
    tokens = mx.array([ids])
    out = {}
    for w in windows:
        start = 0 if not w else max(prompt_len - w, 0)
        head, picks = model.make_cache(), []
        rows, successors = hidden[:, start:-1], tokens[:, start + 1 :]
        for s in range(0, rows.shape[1], chunk):  # in pieces, as a prefill fills it: bounded memory
            logits, _ = model.draft(rows[:, s : s + chunk], successors[:, s : s + chunk], head)
            picks.append(mx.argmax(logits[0], axis=-1))
            mx.eval(picks[-1])
        drafted = mx.concatenate(picks)[prompt_len - start :]
        ids_of = model.draft_vocab.token_ids(drafted) if model.draft_vocab is not None else drafted
        wanted = target[prompt_len + 1 :]
        n = min(ids_of.shape[0], wanted.shape[0])
        out[w] = float(mx.mean(ids_of[:n] == wanted[:n]).item())
    return out
