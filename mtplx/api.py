"""The Python API, in mlx-lm's style::

    import mtplx
    model, tokenizer = mtplx.load("demo")
    text = mtplx.generate(model, tokenizer, "def fib(n):", max_tokens=64)
    for r in mtplx.stream_generate(model, tokenizer, [{"role": "user", "content": "hi"}]):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

from mtplx.artifact.loader import LoadReport
from mtplx.artifact.loader import load as load_artifact
from mtplx.engine.prompt_cache import PromptCache, common_prefix, make_prompt_cache
from mtplx.engine.prompt_cache_file import load_prompt_cache, save_prompt_cache
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.engine.stats import DecodeStats
from mtplx.model.mtp_model import MTPModel

Prompt = Union[str, Sequence[int], Sequence[dict[str, Any]], "EncodedPrompt"]


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
    stats: DecodeStats = field(default_factory=DecodeStats, repr=False)

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None


def load(ref: str, *, mtp: bool = True, force: bool = False, revision: str | None = None) -> tuple[MTPModel, Any]:
    """Load an artifact (``"demo"``, a directory or a Hugging Face repo id).

    Returns ``(model, tokenizer)``; ``model.load_report`` says what was checked. With
    ``mtp=False`` any MLX Qwen3.5 checkpoint loads for plain AR decoding. ``force=True``
    loads an artifact whose hashes do not match its contract, with a warning.
    """
    model, tokenizer, report = load_artifact(ref, mtp=mtp, force=force, revision=revision)
    model.load_report = report
    return model, tokenizer


def _chat_ids(tokenizer: Any, messages: list[dict], enable_thinking: bool | None, generation_prompt: bool) -> list[int]:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode_prompt(tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> list[int]:
    """Text is tokenized as is; a list of chat messages goes through the chat template."""
    if isinstance(prompt, EncodedPrompt):
        return list(prompt.ids)
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return _chat_ids(tokenizer, prompt, enable_thinking, generation_prompt=True)
    return [int(t) for t in prompt]


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's token ids, and the positions where the next prompt of the same conversation
    may start to differ from them: a prompt cache snapshots its state there."""

    ids: list[int]
    boundaries: tuple[int, ...] = ()


def encode_for_cache(tokenizer: Any, prompt: Prompt, enable_thinking: bool | None = None) -> EncodedPrompt:
    """:func:`encode_prompt`, plus, for chat messages, where the next turn will re-render this one.

    Chat templates often render a past assistant turn differently from the generation prompt
    that preceded the reply (Qwen's drop the ``<think>`` block), so the next turn's tokens leave
    this prompt's before its end. Rendering the conversation with a stand-in reply shows where:
    at the end of the common prefix of that rendering and this prompt."""
    if isinstance(prompt, EncodedPrompt):
        return prompt
    ids = encode_prompt(tokenizer, prompt, enable_thinking)
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], dict):
        return EncodedPrompt(ids)
    try:
        history = _chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": "x"}], enable_thinking,
                            generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses this shape: no boundary, no harm
        return EncodedPrompt(ids)
    # One token back: the reply's first characters may merge with the last token before them
    # (a reply opening with "\n" turns "assistant\n" + "\n" into one "\n\n" token).
    return EncodedPrompt(ids, (max(common_prefix(history, ids) - 1, 0),))


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


class _StopScanner:
    """Finds stop strings across chunk boundaries and holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, segment: str, final: bool = False) -> tuple[str, bool]:
        self.text += segment
        for s in self.stops:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                out = self.text[self.sent : at]
                self.sent = at
                return out, True
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out, False


def stream_generate(
    model: MTPModel,
    tokenizer: Any,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
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
) -> Iterator[GenerationResponse]:
    """Stream a completion. ``depth=0`` is plain AR; ``None`` takes the tuned depth for this
    model if `mtplx tune` saved one, else the contract's default.

    ``prompt_cache`` (from :func:`make_prompt_cache`) makes a call whose prompt extends the
    cached tokens prefill only the new suffix, and leaves the cache holding prompt + reply;
    ``response.cached_tokens`` says how many prompt tokens it served."""
    encoded = encode_for_cache(tokenizer, prompt, enable_thinking) if prompt_cache is not None else None
    ids = encoded.ids if encoded is not None else encode_prompt(tokenizer, prompt, enable_thinking)
    params = sampling_from(model, temperature, top_p, top_k, min_p)
    defaults = model.contract.defaults if model.contract else {}
    dt = draft_temperature if draft_temperature is not None else defaults.get("draft_temperature", params.temperature)
    draft = SamplingParams(temperature=dt, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p)
    engine = Engine(model, default_depth(model) if depth is None else depth, params, draft, seed)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    detok = tokenizer.detokenizer
    detok.reset()
    scanner = _StopScanner(stop or [])
    stats = engine.stats
    finish = None
    boundaries = encoded.boundaries if encoded is not None else ()
    for step in engine.generate(ids, max_tokens, eos, prompt_cache=prompt_cache, snapshot_at=boundaries):
        stats = engine.stats
        text_tokens = [t for t in step.tokens if t not in eos]
        for t in text_tokens:
            detok.add_token(t)
        if step.tokens and step.tokens[-1] in eos:
            finish = "stop"
            detok.finalize()
        segment, stopped = scanner.feed(detok.last_segment, final=finish is not None)
        if stopped:
            finish = "stop"
        elif finish is None and stats.generated >= max_tokens:
            finish = "length"
            detok.finalize()
            tail, stopped = scanner.feed(detok.last_segment, final=True)
            segment += tail
        yield _response(segment, step.tokens, stats, finish)
        if finish:
            return
    if finish is None:
        detok.finalize()
        tail, _ = scanner.feed(detok.last_segment, final=True)
        yield _response(tail, [], stats, "length")


def _response(text: str, tokens: list[int], stats: DecodeStats, finish: str | None) -> GenerationResponse:
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
        stats=stats,
    )


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


__all__ = ["EncodedPrompt", "GenerationResponse", "LoadReport", "PromptCache", "encode_for_cache", "default_depth", "encode_prompt", "generate", "load",
           "load_prompt_cache", "make_prompt_cache", "save_prompt_cache", "stream_generate"]
