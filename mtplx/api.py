"""The Python API, in mlx-lm's style (what "exact" promises: see :mod:`mtplx.bench.exactness`)::

    import mtplx
    model, tokenizer = mtplx.load("demo")
    text = mtplx.generate(model, tokenizer, "def fib(n):", max_tokens=64)
    for r in mtplx.stream_generate(model, tokenizer, [{"role": "user", "content": "hi"}]):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence, Union

from mtplx.core import knobs
from mtplx.artifact.loader import LoadReport
from mtplx.artifact.loader import load as load_artifact
from mtplx.generation.chat_template import chat_ids, is_chat, reuse_boundaries
from mtplx.engine.constraints import Constraint
from mtplx.engine.prompt_cache import PromptCache, check_prompt_cache, make_prompt_cache
from mtplx.engine.prompt_cache_file import load_prompt_cache, save_prompt_cache
from mtplx.engine.sampling import SamplingParams
from mtplx.engine import strict
from mtplx.engine.speculative import Engine
from mtplx.errors import ContextOverflowError, MtplxError
from mtplx.model.mtp_model import MTPModel
from mtplx.generation.prompts import EncodedPrompt, check_prompt
from mtplx.generation.row_text import GenerationResponse, RowSpec, RowText
from mtplx.generation.speculation import default_depth, depth_policy, draft_params
from mtplx.generation.stops import check_stop

Prompt = Union[str, Sequence[int], Sequence[dict[str, Any]], "EncodedPrompt"]

DEFAULT_MAX_TOKENS = 256


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


def _encode(tokenizer: Any, checked: str | list[Any], enable_thinking: bool | None) -> list[int]:
    """A prompt :func:`check_prompt` has passed, as token ids."""
    # verbose=False: transformers would print a warning of its own for a text longer than the
    # tokenizer's model_max_length; the context is checked right after, with one clear error.
    if isinstance(checked, str):
        return list(tokenizer.encode(checked, verbose=False))
    if is_chat(checked):
        return chat_ids(tokenizer, checked, enable_thinking, generation_prompt=True)
    return checked


def encode_prompt(tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """Text is tokenized as is; a list of chat messages goes through the chat template."""
    return _encode(tokenizer, check_prompt(prompt), enable_thinking)


def prompt_ids(model: MTPModel, tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """The prompt as token ids that are safe to feed the model: each id inside the embedding
    table (an id past it reads memory beyond the table: a crash on some backends, garbage on
    others) and the whole leaving room for one new token in the context."""
    checked = check_prompt(prompt)
    tokenized = isinstance(checked, str) or is_chat(checked)
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


def sampling_from(model: MTPModel, temperature: float | None, top_p: float | None, top_k: int | None,
                  min_p: float | None) -> SamplingParams:
    d = {**knobs.DEFAULTS, **(model.contract.defaults if model.contract else {})}
    return SamplingParams(
        temperature=d["temperature"] if temperature is None else temperature,
        top_p=d["top_p"] if top_p is None else top_p,
        top_k=d["top_k"] if top_k is None else top_k,
        min_p=d["min_p"] if min_p is None else min_p,
    )


def row_spec(model: MTPModel, tokenizer: Any, prompt: Prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             min_p: float | None = None, depth: int | str | None = None, draft_temperature: float | None = None,
             seed: int | None = None, stop: Sequence[str] | None = None, enable_thinking: bool | None = None,
             prompt_cache: PromptCache | None = None, response_format: dict[str, Any] | None = None,
             logprobs: int | None = None, strict_greedy: bool | float = False,
             lookup: int | str | None = knobs.AUTO, kv_bits: int | None = None,
             kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE) -> RowSpec:
    """A generation request checked and resolved for the engine (arguments as for
    :func:`stream_generate`, which documents them and the errors raised)."""
    k = knobs.check_all(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        depth=depth, draft_temperature=draft_temperature, seed=seed, lookup=lookup)
    max_tokens = DEFAULT_MAX_TOKENS if k["max_tokens"] is None else k["max_tokens"]
    temperature, top_p, top_k, min_p = k["temperature"], k["top_p"], k["top_k"], k["min_p"]
    depth, draft_temperature, seed = k["depth"], k["draft_temperature"], k["seed"]
    stop = check_stop(stop)
    margin = strict.check(strict_greedy, model)
    kv_bits, kv_group_size = model.trunk.check_kv(kv_bits, kv_group_size)
    if prompt_cache is not None:
        check_prompt_cache(prompt_cache)
        prompt_cache.check_kv(kv_bits, kv_group_size)
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise MtplxError(f"enable_thinking must be None, True or False, got {enable_thinking!r}",
                         fix="pass a bool (None keeps the chat template's default)")
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    constraint = Constraint.from_response_format(response_format, tokenizer, model.vocab_size, eos)
    if constraint is not None:
        if enable_thinking:
            raise MtplxError("enable_thinking=True cannot be combined with response_format: the grammar applies "
                             "from the first generated token, so the model could not think first",
                             fix="drop enable_thinking or response_format")
        enable_thinking = False
    ids = prompt_ids(model, tokenizer, prompt, enable_thinking)
    boundaries = reuse_boundaries(tokenizer, prompt, ids, enable_thinking) if prompt_cache is not None else ()
    params = sampling_from(model, temperature, top_p, top_k, min_p)
    draft = draft_params(model, params, draft_temperature)
    # Each row gets a policy of its own: depth auto learns from this row's acceptance only.
    policy = depth_policy(model, default_depth(model) if depth is None else depth, params)
    return RowSpec(ids, max_tokens, params, policy, draft, seed, frozenset(eos), constraint, logprobs, prompt_cache,
                   tuple(boundaries), strict_greedy=margin, stop=list(stop),
                   lookup=knobs.AUTO if k["lookup"] is None else k["lookup"], kv_bits=kv_bits,
                   kv_group_size=kv_group_size)


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
    depth: int | str | None = None,
    draft_temperature: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    enable_thinking: bool | None = None,
    prompt_cache: PromptCache | None = None,
    response_format: dict[str, Any] | None = None,
    logprobs: int | None = None,
    strict_greedy: bool | float = False,
    lookup: int | str | None = knobs.AUTO,
    kv_bits: int | None = None,
    kv_group_size: int = knobs.DEFAULT_KV_GROUP_SIZE,
) -> Iterator[GenerationResponse]:
    """Stream a completion. ``depth=0`` is plain AR, ``depth=N`` drafts exactly N tokens every
    step, ``depth="auto"`` chooses each step's depth from this machine's measured step costs and
    the acceptance seen so far (see :mod:`mtplx.generation.speculation`); ``None`` takes the depth `mtplx
    tune` saved for this model, else "auto". The draft follows the target's law unless
    ``draft_temperature`` is given (or `mtplx tune` found a better one).

    ``logprobs=k`` attaches to each response the log-probability of each of its tokens and the k
    likeliest alternatives (log-softmax of the trunk's raw logits; see mtplx.engine.logprobs).

    ``strict_greedy=True``: at temperature 0, a token a multi-row verify pass decided with a
    top-2 logit margin at or under ``mtplx.engine.strict.NEAR_TIE`` (0.05) is decided again by a
    one-row pass, a plain AR step's arithmetic; a number sets that margin. It makes greedy MTP
    equal greedy AR on a backend whose verify rows round differently from decode steps (what
    `mtplx doctor --exactness` measures), at the cost of one one-row pass per near-tie; see
    :mod:`mtplx.engine.strict` for what it does not cover. No effect at temperature > 0.

    ``lookup``: drafts copied from the context (prompt and reply so far; see
    :mod:`mtplx.engine.lookup`), exact at any temperature: ``0`` never, ``N`` up to N copied
    tokens whenever the context has a match, ``"auto"`` (the default) where the step's cost
    model and the copies' running acceptance say a copy beats the head; "auto" copies only in a
    row that speculates (on a machine where depth auto runs plain AR, pass an integer).

    ``prompt_cache`` (from :func:`make_prompt_cache`) makes a call whose prompt extends the
    cached tokens prefill only the new suffix, and leaves the cache holding prompt + reply;
    ``response.cached_tokens`` says how many prompt tokens it served.

    ``kv_bits=8`` or ``4`` stores the trunk's attention KV quantized in groups of
    ``kv_group_size`` (32, 64 or 128) with mlx-lm's quantized attention: less memory per token
    of context, a slightly different target (see :mod:`mtplx.model.kv_quant`). MTP output stays
    exact relative to AR with the same ``kv_bits``. A ``prompt_cache`` must have been made with
    the same setting (``make_prompt_cache(model, kv_bits=8)``).

    ``response_format`` takes OpenAI's shapes: ``{"type": "text"}`` (no constraint),
    ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}``. Decoding is then constrained by the
    grammar at every depth, exactly (see :mod:`mtplx.engine.constraints`); once the JSON is
    complete only end-of-sequence can follow. A completion cut by ``max_tokens`` (finish_reason
    "length") or a stop string need not parse. The grammar applies from the first generated
    token, so a chat prompt is rendered with thinking off, and ``enable_thinking=True`` with a
    response_format is refused. A malformed format or schema raises :class:`MtplxError`.

    Every argument is checked before the model runs (a bad one raises :class:`MtplxError`, a
    knob out of range :class:`~mtplx.core.knobs.KnobError`, a prompt over the context
    :class:`~mtplx.errors.ContextOverflowError`), when the first response is asked for."""
    spec = row_spec(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, min_p=min_p, depth=depth, draft_temperature=draft_temperature, seed=seed, stop=stop,
                    enable_thinking=enable_thinking, prompt_cache=prompt_cache, response_format=response_format,
                    logprobs=logprobs, strict_greedy=strict_greedy, lookup=lookup, kv_bits=kv_bits,
                    kv_group_size=kv_group_size)
    engine = Engine(model, spec.depth, spec.params, spec.draft_params, spec.seed, spec.constraint,
                    logprobs=spec.logprobs, strict_greedy=spec.strict_greedy, lookup=spec.lookup,
                    kv_bits=spec.kv_bits, kv_group_size=spec.kv_group_size)
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
