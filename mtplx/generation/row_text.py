"""One generation as a row: what it asks the engine for (:class:`RowSpec`), how its tokens
become text (:class:`RowText`), and the chunks that text is streamed in
(:class:`GenerationResponse`, which ``mtplx.GenerationResponse`` names).

``stream_generate`` drives one row through the single-sequence engine; the server drives many
through a decoder that steps them together (``mtplx.server.decoders``). Both turn each step's
tokens into text the same way, here: a detokenizer of the row's own, the stop-string scanner,
and the finish reason ("stop" at an end-of-sequence token or a stop string, "length" at
max_tokens or the context's end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtplx.engine.batch import RowRequest
from mtplx.engine.stats import DecodeStats
from mtplx.generation.stops import StopScanner

if TYPE_CHECKING:
    from mtplx.engine.logprobs import TokenLogprob


@dataclass
class GenerationResponse:
    """One streamed chunk: the text it adds and the running statistics."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    generation_tps: float
    prompt_tps: float
    acceptance: list[float]
    tokens_per_step: float
    finish_reason: str | None = None
    # The stop string that ended the generation, on the chunk that ends it ("stop" by a stop
    # string rather than by an end-of-sequence token).
    stop_sequence: str | None = None
    stats: DecodeStats = field(default_factory=DecodeStats, repr=False)
    # With stream_generate(..., logprobs=k): one entry per token of ``tokens``.
    logprobs: list[TokenLogprob] | None = None

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None


@dataclass
class RowSpec(RowRequest):
    """A checked generation request: the batched decoder's :class:`RowRequest` plus the stop
    strings, which are text-level and stay with :class:`RowText`."""

    stop: list[str] = field(default_factory=list)


class RowText:
    """A row's text: feed it each step's tokens, it answers the step's response; ``finish`` is
    set once the row is over (the caller then stops stepping it)."""

    def __init__(self, tokenizer: Any, spec: RowSpec):
        # mlx-lm's wrapper hands every caller its own copy, so rows never share detokenizer state.
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.scanner = StopScanner(spec.stop)
        self.eos = spec.eos
        self.max_tokens = spec.max_tokens
        self.logprobs = spec.logprobs
        self.finish: str | None = None

    def feed(self, tokens: list[int], stats: DecodeStats,
             logprobs: list[TokenLogprob] | None = None) -> GenerationResponse:
        for t in tokens:
            if t not in self.eos:
                self.detok.add_token(t)
        if tokens and tokens[-1] in self.eos:
            self.finish = "stop"
            self.detok.finalize()
        segment, stopped = self.scanner.feed(self.detok.last_segment, final=self.finish is not None)
        if stopped:
            self.finish = "stop"
        elif self.finish is None and stats.generated >= self.max_tokens:
            self.finish = "length"
            self.detok.finalize()
            tail, _ = self.scanner.feed(self.detok.last_segment, final=True)
            segment += tail
        return response(segment, tokens, stats, self.finish, logprobs, self.scanner.matched)

    def end(self, stats: DecodeStats) -> GenerationResponse:
        """The last response of a row the engine ended without a finish of its own (the context
        is full): the held-back text, finish "length"."""
        self.detok.finalize()
        tail, _ = self.scanner.feed(self.detok.last_segment, final=True)
        self.finish = "length"
        return response(tail, [], stats, "length", [] if self.logprobs is not None else None)


def response(text: str, tokens: list[int], stats: DecodeStats, finish: str | None,
             logprobs: list[TokenLogprob] | None = None, stop_sequence: str | None = None) -> GenerationResponse:
    return GenerationResponse(
        text=text,
        tokens=list(tokens),
        prompt_tokens=stats.prompt_tokens,
        cached_tokens=stats.cached_tokens,
        generation_tokens=stats.generated,
        generation_tps=stats.tokens_per_second,
        prompt_tps=stats.prefill_tokens_per_second,
        acceptance=stats.acceptance,
        tokens_per_step=stats.tokens_per_step,
        finish_reason=finish,
        stop_sequence=stop_sequence,
        stats=stats,
        logprobs=logprobs,
    )
