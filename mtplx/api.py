"""The Python API, in mlx-lm's style::

    import mtplx
    model, tokenizer = mtplx.load("demo")
    text = mtplx.generate(model, tokenizer, "def fib(n):", max_tokens=64)
    for r in mtplx.stream_generate(model, tokenizer, [{"role": "user", "content": "hi"}]):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

from mtplx import knobs
from mtplx.artifact.loader import LoadReport
from mtplx.artifact.loader import load as load_artifact
from mtplx.engine.constraints import Constraint
from mtplx.engine.logprobs import TokenLogprob
from mtplx.engine.prompt_cache import PromptCache, common_prefix, make_prompt_cache
from mtplx.engine.prompt_cache_file import load_prompt_cache, save_prompt_cache
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.engine.stats import DecodeStats
from mtplx.errors import ContextOverflowError, MtplxError
from mtplx.model.mtp_model import MTPModel
from mtplx.prompts import EncodedPrompt, check_prompt, check_stop
from mtplx.rows import RowSpec, RowText, StopScanner, response

Prompt = Union[str, Sequence[int], Sequence[dict[str, Any]], "EncodedPrompt"]

DEFAULT_MAX_TOKENS = 256


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


def load(ref: str | os.PathLike[str], *, mtp: bool = True, force: bool = False, revision: str | None = None,
         draft_vocab: bool = True) -> tuple[MTPModel, Any]:
    """Load an artifact (``"demo"``, a directory or a Hugging Face repo id).

    Returns ``(model, tokenizer)``; ``model.load_report`` says what was checked. With
    ``mtp=False`` any MLX Qwen3.5 checkpoint loads for plain AR decoding. ``force=True``
    loads an artifact whose hashes do not match its contract, with a warning.
    ``draft_vocab=False`` drafts over the full vocabulary even where the artifact stores a
    reduced draft vocabulary (to compare the two).
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise MtplxError(f"the model reference is {ref!r}",
                         fix="pass 'demo', an artifact directory or a Hugging Face repo id (org/name)")
    model, tokenizer, report = load_artifact(ref, mtp=mtp, force=force, revision=revision, draft_vocab=draft_vocab)
    model.load_report = report
    return model, tokenizer


def _chat_ids(tokenizer: Any, messages: list[dict], enable_thinking: bool | None, generation_prompt: bool,
              **template_kwargs: Any) -> list[int]:
    from jinja2 import TemplateError

    kwargs = dict(template_kwargs)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                            tokenizer_kwargs={"verbose": False}, **kwargs)
    except TemplateError as e:
        raise MtplxError(f"the model's chat template refused these messages: {e}",
                         fix="check the roles and the order of the messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def _encode(tokenizer: Any, checked: str | list[Any], enable_thinking: bool | None) -> list[int]:
    """A prompt :func:`check_prompt` has passed, as token ids."""
    # verbose=False: transformers would print a warning of its own for a text longer than the
    # tokenizer's model_max_length; the context is checked right after, with one clear error.
    if isinstance(checked, str):
        return list(tokenizer.encode(checked, verbose=False))
    if _is_chat(checked):
        return _chat_ids(tokenizer, checked, enable_thinking, generation_prompt=True)
    return checked


def encode_prompt(tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """Text is tokenized as is; a list of chat messages goes through the chat template."""
    return _encode(tokenizer, check_prompt(prompt), enable_thinking)


def prompt_ids(model: MTPModel, tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """The prompt as token ids that are safe to feed the model: each id inside the embedding
    table (an id past it reads memory beyond the table: a crash on some backends, garbage on
    others) and the whole leaving room for one new token in the context."""
    checked = check_prompt(prompt)
    tokenized = isinstance(checked, str) or _is_chat(checked)
    ids = _encode(tokenizer, checked, enable_thinking)
    try:
        ids = knobs.check_token_ids(ids, model.vocab_size)
    except knobs.KnobError as e:
        if not tokenized:
            raise
        raise MtplxError(f"the tokenizer produced a token id outside the model's vocabulary ({e})",
                         fix="load the model and its tokenizer from the same artifact") from None
    if len(ids) >= model.max_context:
        raise ContextOverflowError(len(ids), model.max_context)
    return ids


def reuse_boundaries(tokenizer: Any, prompt: Prompt, ids: list[int], enable_thinking: bool | None = None,
                     **template_kwargs: Any) -> tuple[int, ...]:
    """Where the next prompt of this conversation may start to differ from ``ids``: a prompt
    cache snapshots its state there.

    Chat templates often render a past assistant turn differently from the generation prompt
    that preceded the reply (Qwen's drop the ``<think>`` block), so the next turn's tokens leave
    this prompt's before its end. Rendering the conversation with a stand-in reply shows where:
    at the end of the common prefix of that rendering and this prompt. Text and token prompts
    have no such place (the prompt's own end is always snapshotted). ``template_kwargs`` (tools,
    ...) are those the prompt was rendered with."""
    if isinstance(prompt, EncodedPrompt):
        return prompt.boundaries
    if not _is_chat(prompt):  # text, token ids (a list or an array): no such place
        return ()
    try:
        history = _chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": "x"}], enable_thinking,
                            generation_prompt=False, **template_kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses this shape: no boundary, no harm
        return ()
    # One token back: the reply's first characters may merge with the last token before them
    # (a reply opening with "\n" turns "assistant\n" + "\n" into one "\n\n" token).
    return (max(common_prefix(history, ids) - 1, 0),)


def sampling_from(model: MTPModel, temperature: float | None, top_p: float | None, top_k: int | None,
                  min_p: float | None) -> SamplingParams:
    d = model.contract.defaults if model.contract else {}
    return SamplingParams(
        temperature=d.get("temperature", 0.6) if temperature is None else temperature,
        top_p=d.get("top_p", 0.95) if top_p is None else top_p,
        top_k=d.get("top_k", 20) if top_k is None else top_k,
        min_p=d.get("min_p", 0.0) if min_p is None else min_p,
    )


def default_depth(model: MTPModel) -> int:
    if not model.has_mtp:
        return 0
    from mtplx.config import tuned_depth

    tuned = tuned_depth(model)
    if tuned is not None:
        return tuned
    return model.contract.defaults.get("depth", 2) if model.contract else 2


_StopScanner = StopScanner  # its old name here


def row_spec(model: MTPModel, tokenizer: Any, prompt: Prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             min_p: float | None = None, depth: int | None = None, draft_temperature: float | None = None,
             seed: int | None = None, stop: Sequence[str] | None = None, enable_thinking: bool | None = None,
             prompt_cache: PromptCache | None = None, response_format: dict[str, Any] | None = None,
             logprobs: int | None = None) -> RowSpec:
    """A generation request checked and resolved for the engine (arguments as for
    :func:`stream_generate`, which documents them and the errors raised): :func:`_prepare`'s
    checks, with what a row of the engine also takes (logprobs, the prompt cache)."""
    r = _prepare(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                 min_p=min_p, depth=depth, draft_temperature=draft_temperature, seed=seed, stop=stop,
                 enable_thinking=enable_thinking, response_format=response_format, cached=prompt_cache is not None)
    return RowSpec(r.ids, r.max_tokens, r.params, r.depth, r.draft_params, r.seed, frozenset(r.eos), r.constraint,
                   logprobs, prompt_cache, tuple(r.boundaries), list(r.stop))


@dataclass
class _Prepared:
    """One request's checked settings, as the engine takes them (stream_generate and
    batch_generate share the checks)."""

    ids: list[int]
    params: SamplingParams
    draft_params: SamplingParams
    depth: int
    seed: int | None
    eos: set[int]
    constraint: Constraint | None
    stop: list[str]
    boundaries: tuple[int, ...]
    max_tokens: int


def _prepare(model: MTPModel, tokenizer: Any, prompt: Prompt, *, max_tokens: int | None, temperature: float | None,
             top_p: float | None, top_k: int | None, min_p: float | None, depth: int | None,
             draft_temperature: float | None, seed: int | None, stop: Sequence[str] | None,
             enable_thinking: bool | None, response_format: dict[str, Any] | None, cached: bool) -> _Prepared:
    """Check every argument of one request before the model runs (see :func:`stream_generate`)."""
    k = knobs.check_all(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        depth=depth, draft_temperature=draft_temperature, seed=seed)
    max_tokens = DEFAULT_MAX_TOKENS if k["max_tokens"] is None else k["max_tokens"]
    temperature, top_p, top_k, min_p = k["temperature"], k["top_p"], k["top_k"], k["min_p"]
    depth, draft_temperature, seed = k["depth"], k["draft_temperature"], k["seed"]
    stop = check_stop(stop)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    constraint = Constraint.from_response_format(response_format, tokenizer, model.vocab_size, eos)
    if constraint is not None:
        if enable_thinking:
            raise MtplxError("enable_thinking=True cannot be combined with response_format: the grammar applies "
                             "from the first generated token, so the model could not think first",
                             fix="drop enable_thinking or response_format")
        enable_thinking = False
    ids = prompt_ids(model, tokenizer, prompt, enable_thinking)
    boundaries = reuse_boundaries(tokenizer, prompt, ids, enable_thinking) if cached else ()
    params = sampling_from(model, temperature, top_p, top_k, min_p)
    defaults = model.contract.defaults if model.contract else {}
    dt = draft_temperature if draft_temperature is not None else defaults.get("draft_temperature", params.temperature)
    draft = SamplingParams(temperature=dt, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p)
    return _Prepared(ids=ids, params=params, draft_params=draft, depth=default_depth(model) if depth is None else depth,
                     seed=seed, eos=eos, constraint=constraint, stop=stop, boundaries=boundaries, max_tokens=max_tokens)


def stream_generate(
    model: MTPModel,
    tokenizer: Any,
    prompt: Prompt,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    depth: int | None = None,
    draft_temperature: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    enable_thinking: bool | None = None,
    prompt_cache: PromptCache | None = None,
    response_format: dict[str, Any] | None = None,
    logprobs: int | None = None,
) -> Iterator[GenerationResponse]:
    """Stream a completion. ``depth=0`` is plain AR; ``None`` takes the tuned depth for this
    model if `mtplx tune` saved one, else the contract's default.

    ``logprobs=k`` attaches to each response the log-probability of each of its tokens and the k
    likeliest alternatives (log-softmax of the trunk's raw logits; see mtplx.engine.logprobs).

    ``prompt_cache`` (from :func:`make_prompt_cache`) makes a call whose prompt extends the
    cached tokens prefill only the new suffix, and leaves the cache holding prompt + reply;
    ``response.cached_tokens`` says how many prompt tokens it served.

    ``response_format`` takes OpenAI's shapes: ``{"type": "text"}`` (no constraint),
    ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}``. Decoding is then constrained by the
    grammar at every depth, exactly (see :mod:`mtplx.engine.constraints`); once the JSON is
    complete only end-of-sequence can follow. A completion cut by ``max_tokens`` (finish_reason
    "length") or a stop string need not parse. The grammar applies from the first generated
    token, so a chat prompt is rendered with thinking off, and ``enable_thinking=True`` with a
    response_format is refused. A malformed format or schema raises :class:`MtplxError`.

    Every argument is checked before the model runs (a bad one raises :class:`MtplxError`, a
    knob out of range :class:`~mtplx.knobs.KnobError`, a prompt over the context
    :class:`~mtplx.errors.ContextOverflowError`), when the first response is asked for."""
    spec = row_spec(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, min_p=min_p, depth=depth, draft_temperature=draft_temperature, seed=seed, stop=stop,
                    enable_thinking=enable_thinking, prompt_cache=prompt_cache, response_format=response_format,
                    logprobs=logprobs)
    engine = Engine(model, spec.depth, spec.params, spec.draft_params, spec.seed, spec.constraint,
                    logprobs=spec.logprobs)
    text = RowText(tokenizer, spec)
    stats = engine.stats
    for step in engine.generate(spec.prompt, spec.max_tokens, spec.eos, prompt_cache=prompt_cache,
                                snapshot_at=spec.snapshot_at):
        stats = engine.stats
        yield text.feed(step.tokens, stats, step.logprobs)
        if text.finish:
            return
    yield text.end(stats)


def generate(model: MTPModel, tokenizer: Any, prompt: Prompt, *, verbose: bool = False, **kwargs: Any) -> str:
    """The whole completion as a string (``kwargs`` as for :func:`stream_generate`)."""
    text = []
    last = None
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
        last = r
    if verbose and last is not None:
        print(f"\n{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, "
              f"acceptance {[round(a, 2) for a in last.acceptance]}, {last.tokens_per_step:.2f} tokens/step")
    return "".join(text)


__all__ = ["EncodedPrompt", "GenerationResponse", "LoadReport", "PromptCache", "default_depth", "encode_prompt",
           "generate", "load", "load_prompt_cache", "make_prompt_cache", "prompt_ids", "reuse_boundaries", "row_spec",
           "save_prompt_cache", "stream_generate"]
