"""``mtplx.batch_generate``: several prompts decoded together, one result per prompt, in order.

The prompts decode as rows of one :class:`~mtplx.engine.batch.BatchDecoder` (at most
``max_batch`` at a time; the rest join as rows finish). Each prompt's text depends only on its
own prompt, settings and seed, never on the other prompts: ``batch_generate(m, t, ps,
seed=s)[i].text == generate(m, t, ps[i], seed=s)`` for a fixed depth (with one ``seed`` for
all, identical prompts give identical texts: pass a list of seeds for independent samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mtplx import api
from mtplx.engine.batch import BatchDecoder, Row, RowRequest
from mtplx.engine.logprobs import TokenLogprob
from mtplx.engine.speculative import Emitted
from mtplx.engine.stats import DecodeStats
from mtplx.errors import MtplxError

# Settings that may be given per prompt (a list or tuple, one value per prompt).
PER_PROMPT = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "depth", "draft_temperature", "seed", "stop",
              "enable_thinking", "response_format", "logprobs")


@dataclass
class BatchResponse:
    """One prompt's completion: its text, tokens, why it ended and its statistics."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence or a stop string) or "length"
    stop_sequence: str | None = None
    stats: DecodeStats = field(default_factory=DecodeStats, repr=False)
    logprobs: list[TokenLogprob] | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)

    @property
    def generation_tps(self) -> float:
        return self.stats.tokens_per_second

    @property
    def acceptance(self) -> list[float]:
        return self.stats.acceptance


class _Follower:
    """One row's text as it decodes: detokenized, scanned for stop strings (api's scanner)."""

    def __init__(self, tokenizer: Any, stop: list[str], eos: set[int], max_tokens: int, logprobs: int | None):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.scanner = api._StopScanner(stop)
        self.eos, self.max_tokens = eos, max_tokens
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs is not None else None
        self.finish: str | None = None

    def feed(self, step: Emitted, generated: int) -> None:
        """As stream_generate does per step: EOS ends with "stop", a stop string too, the
        token budget with "length"."""
        self.tokens += step.tokens
        if self.logprobs is not None and step.logprobs:
            self.logprobs += step.logprobs
        for t in step.tokens:
            if t not in self.eos:
                self.detok.add_token(t)
        if step.tokens and step.tokens[-1] in self.eos:
            self.finish = "stop"
            self.detok.finalize()
        segment, stopped = self.scanner.feed(self.detok.last_segment, final=self.finish is not None)
        if stopped:
            self.finish = "stop"
        elif self.finish is None and generated >= self.max_tokens:
            self.finish = "length"
            self.detok.finalize()
            tail, _ = self.scanner.feed(self.detok.last_segment, final=True)
            segment += tail
        self.text.append(segment)

    def close(self) -> None:
        """The row left without a finish of its own (the context ran out): "length"."""
        if self.finish is None:
            self.detok.finalize()
            tail, _ = self.scanner.feed(self.detok.last_segment, final=True)
            self.text.append(tail)
            self.finish = "length"


def _per_prompt(name: str, value: Any, n: int) -> list[Any]:
    """A setting for every prompt: a list/tuple (one value each) or one value for all. For
    ``stop`` a list of strings is one value (the same stops for all); a list of lists is per prompt."""
    if name == "stop":
        per = isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) or v is None for v in value)
    else:
        per = isinstance(value, (list, tuple))
    if not per:
        return [value] * n
    if len(value) != n:
        raise MtplxError(f"{name} has {len(value)} values for {n} prompts",
                         fix=f"pass one {name} for all prompts or exactly one per prompt")
    return list(value)


def batch_generate(model: Any, tokenizer: Any, prompts: Sequence[api.Prompt], *, max_tokens: Any = None,
                   temperature: Any = None, top_p: Any = None, top_k: Any = None, min_p: Any = None, depth: Any = None,
                   draft_temperature: Any = None, seed: Any = None, stop: Any = None, enable_thinking: Any = None,
                   response_format: Any = None, logprobs: Any = None, max_batch: int = 8,
                   prefill_chunk: int = 512, verbose: bool = False) -> list[BatchResponse]:
    """Complete every prompt (text, chat messages or token ids, as for
    :func:`mtplx.stream_generate`); returns one :class:`BatchResponse` per prompt, in order.

    Every setting takes one value for all prompts or a list with one per prompt (``stop``: a
    list of strings for all, or a list of such lists). ``max_batch`` rows decode at once;
    ``prefill_chunk`` bounds the prompt tokens a joining row feeds per step. Every argument is
    checked before the model runs."""
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or not prompts:
        raise MtplxError("batch_generate takes a non-empty list of prompts",
                         fix="pass [prompt, ...] (use mtplx.generate for one prompt)")
    n = len(prompts)
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "depth": depth, "draft_temperature": draft_temperature, "seed": seed, "stop": stop,
             "enable_thinking": enable_thinking, "response_format": response_format, "logprobs": logprobs}
    settings = {name: _per_prompt(name, value, n) for name, value in given.items()}
    prepared, requests = [], []
    for i, prompt in enumerate(prompts):
        s = {name: settings[name][i] for name in PER_PROMPT}
        lp = s.pop("logprobs")
        r = api._prepare(model, tokenizer, prompt, cached=False, **s)
        prepared.append(r)
        requests.append(RowRequest(prompt=r.ids, max_tokens=r.max_tokens, params=r.params, depth=r.depth,
                                   draft_params=r.draft_params, seed=r.seed, eos=frozenset(r.eos),
                                   constraint=r.constraint, logprobs=lp))
    decoder = BatchDecoder(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
    rows: list[Row] = [decoder.add(req) for req in requests]
    follow = {row.id: _Follower(tokenizer, r.stop, r.eos, r.max_tokens, req.logprobs)
              for row, r, req in zip(rows, prepared, requests)}
    while len(decoder):
        for row, step in decoder.step():
            f = follow[row.id]
            f.feed(step, row.stats.generated)
            if f.finish is not None and not row.done:
                decoder.remove(row)  # a stop string: the row leaves now
        if verbose:
            print(f"\r{sum(len(f.tokens) for f in follow.values())} tokens, {len(decoder)} rows", end="", flush=True)
    if verbose:
        print()
    out = []
    for row in rows:
        f = follow[row.id]
        f.close()
        out.append(BatchResponse("".join(f.text), f.tokens, f.finish or "length", f.scanner.matched, row.stats,
                                 f.logprobs))
    return out
