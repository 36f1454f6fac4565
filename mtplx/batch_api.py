"""``mtplx.batch_generate``: several prompts decoded together, one result per prompt, in order.

The prompts decode as rows of one :class:`~mtplx.engine.batch.BatchDecoder` (at most
``max_batch`` at a time; the rest join as rows finish). Each prompt's text depends only on its
own prompt, settings and seed, never on the other prompts: ``batch_generate(m, t, ps,
seed=s)[i].text == generate(m, t, ps[i], seed=s)`` for a fixed depth (with one ``seed`` for
all, identical prompts give identical texts: pass a list of seeds for independent samples).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from mtplx import api
from mtplx.api import GenerationResponse
from mtplx.core import knobs
from mtplx.engine.batch import BatchDecoder, Row
from mtplx.engine.logprobs import TokenLogprob
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.stats import DecodeStats
from mtplx.generation.row_text import RowText
from mtplx.errors import MtplxError

# Settings that may be given per prompt (a list or tuple, one value per prompt).
PER_PROMPT = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "depth", "draft_temperature", "seed", "stop",
              "enable_thinking", "response_format", "logprobs", "strict_greedy", "lookup", "kv_bits")


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


def _per_prompt(name: str, value: Any, n: int) -> list[Any]:
    """A setting for every prompt: a list/tuple (one value each) or one value for all. For
    ``stop`` a list of strings is one value (the same stops for all); a list of lists (or None)
    is per prompt; a list that mixes the two could mean either, and is refused."""
    if name == "stop":
        per_item = [isinstance(v, (list, tuple)) or v is None for v in value] if isinstance(value, (list, tuple)) else []
        per = any(per_item)
        if per and not all(per_item):
            raise MtplxError(f"stop mixes strings and lists: {value!r}",
                             fix="pass a list of strings (the same stops for every prompt) or a list with one list "
                                 "of strings (or None) per prompt, e.g. [['a'], ['b']]")
    else:
        per = isinstance(value, (list, tuple))
    if not per:
        return [value] * n
    if len(value) != n:
        raise MtplxError(f"{name} has {len(value)} values for {n} prompts",
                         fix=f"pass one {name} for all prompts or exactly one per prompt")
    return list(value)


def _count(name: str, value: Any) -> int:
    """A positive integer argument, checked here rather than deep inside the decoder (where
    "2" raised a TypeError and 1.5 passed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MtplxError(f"{name} must be an integer >= 1, got {value!r}", fix=f"pass {name}=1 or more")
    return int(value)


def _prompt_caches(prompt_cache: Any, n: int) -> list[PromptCache | None]:
    """``prompt_cache``: None, or one cache (or None) per prompt; a cache serves one
    conversation, so one cache is never shared by all prompts."""
    if prompt_cache is None:
        return [None] * n
    if not isinstance(prompt_cache, (list, tuple)):
        raise MtplxError(f"prompt_cache takes a list with one cache (or None) per prompt, got {type(prompt_cache).__name__}",
                         fix="pass [mtplx.make_prompt_cache(model) for _ in prompts], or None")
    if len(prompt_cache) != n:
        raise MtplxError(f"prompt_cache has {len(prompt_cache)} values for {n} prompts",
                         fix="pass exactly one cache (or None) per prompt")
    return list(prompt_cache)


def batch_generate(model: Any, tokenizer: Any, prompts: Sequence[api.Prompt], *, max_tokens: Any = None,
                   temperature: Any = None, top_p: Any = None, top_k: Any = None, min_p: Any = None, depth: Any = None,
                   draft_temperature: Any = None, seed: Any = None, stop: Any = None, enable_thinking: Any = None,
                   response_format: Any = None, logprobs: Any = None, strict_greedy: Any = False,
                   lookup: Any = knobs.AUTO, kv_bits: Any = None, kv_group_size: int = 64,
                   prompt_cache: Sequence[PromptCache | None] | None = None, max_batch: int = 8,
                   prefill_chunk: int = knobs.PREFILL_CHUNK, verbose: bool = False) -> list[BatchResponse]:
    """Complete every prompt (text, chat messages or token ids, as for
    :func:`mtplx.stream_generate`); returns one :class:`BatchResponse` per prompt, in order.

    Every setting takes one value for all prompts or a list with one per prompt (``stop``: a
    list of strings for all, or a list of such lists). ``prompt_cache``: None, or a list with
    one cache (from :func:`mtplx.make_prompt_cache`, or None) per prompt, used as
    :func:`mtplx.generate` uses its own. ``kv_bits`` (None, 8 or 4; per prompt too) stores each
    row's attention KV quantized, as for :func:`mtplx.stream_generate`; a row's text equals its
    solo text with the same ``kv_bits``. ``max_batch`` rows decode at once; ``prefill_chunk``
    bounds the prompt tokens a joining row feeds per step. Every argument is checked before the
    model runs."""
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or not prompts:
        raise MtplxError("batch_generate takes a non-empty list of prompts",
                         fix="pass [prompt, ...] (use mtplx.generate for one prompt)")
    n = len(prompts)
    max_batch, prefill_chunk = _count("max_batch", max_batch), _count("prefill_chunk", prefill_chunk)
    caches = _prompt_caches(prompt_cache, n)
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "depth": depth, "draft_temperature": draft_temperature, "seed": seed, "stop": stop,
             "enable_thinking": enable_thinking, "response_format": response_format, "logprobs": logprobs,
             "strict_greedy": strict_greedy, "lookup": lookup, "kv_bits": kv_bits}
    settings = {name: _per_prompt(name, value, n) for name, value in given.items()}
    specs = []
    for i, prompt in enumerate(prompts):
        specs.append(api.row_spec(model, tokenizer, prompt, prompt_cache=caches[i], kv_group_size=kv_group_size,
                                  **{name: settings[name][i] for name in PER_PROMPT}))
    decoder = BatchDecoder(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
    rows: list[Row] = [decoder.add(spec) for spec in specs]
    # The same per-step text path as stream_generate and the server: a row's own detokenizer,
    # stop scanner and finish reason.
    texts = {row.id: RowText(tokenizer, spec) for row, spec in zip(rows, specs)}
    parts: dict[int, list[GenerationResponse]] = {row.id: [] for row in rows}
    while len(decoder):
        for row, step in decoder.step():
            text = texts[row.id]
            parts[row.id].append(text.feed(step.tokens, row.stats, step.logprobs))
            if text.finish is not None and not row.done:
                decoder.remove(row)  # a stop string: the row leaves now
        if verbose:
            print(f"\r{sum(len(r.tokens) for p in parts.values() for r in p)} tokens, {len(decoder)} rows", end="",
                  flush=True)
    if verbose:
        print()
    out = []
    for row, spec in zip(rows, specs):
        text, got = texts[row.id], parts[row.id]
        if text.finish is None:  # the row left without a finish of its own (the context ran out)
            got.append(text.end(row.stats))
        logprobs = [lp for r in got for lp in (r.logprobs or [])] if spec.logprobs is not None else None
        out.append(BatchResponse("".join(r.text for r in got), [t for r in got for t in r.tokens], text.finish,
                                 text.scanner.matched, row.stats, logprobs))
    return out
