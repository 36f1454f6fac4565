"""The request core every API dialect shares: prompt encoding, response_format compiling, the
queue and the engine. The OpenAI routes (:mod:`mtplx.server.openai`) and the Anthropic routes
(:mod:`mtplx.server.anthropic`) each turn their request into a :class:`Generation` and their
answer out of :class:`GenerationResponse` objects; everything between is here, once. Nothing
here knows a dialect: errors are :class:`~mtplx.server.http_errors.APIError`, shaped per dialect by
:mod:`mtplx.server.http_errors`, and each dialect writes its own usage.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import jinja2
from fastapi import Request
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from mtplx.core import knobs
from mtplx._version import __version__
from mtplx.api import GenerationResponse, default_depth, reuse_boundaries, sampling_from
from mtplx.engine import strict
from mtplx.engine.constraints import Grammar, ResponseFormatError, compile_format
from mtplx.generation.speculation import step_costs
from mtplx.engine.prompt_cache import PromptCacheLRU, cache_identity
from mtplx.engine.prompt_cache_disk import PromptCacheDisk, default_max_bytes
from mtplx.errors import MtplxError
from mtplx.core.knobs import KnobError
from mtplx.server import http_errors as errors
from mtplx.server.capacity import Capacity
from mtplx.server.http_errors import APIError, knob
from mtplx.server.metrics import Metrics
from mtplx.server.queue import Job, QueueFull, Scheduler, ShuttingDown, until_disconnect

log = logging.getLogger("mtplx.server")

RETRY_AFTER_S = 1
# A stream that has sent nothing for this long (a long prefill, a slow step) sends its dialect's
# keep-alive, so a client's idle timeout does not fire while the server works.
KEEPALIVE_S = 5.0
FINGERPRINT = f"mtplx-{__version__}"

# -- request bodies ----------------------------------------------------------------------------

def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON value a string holds a lone UTF-16 surrogate (JSON's ``"\\ud800"``
    decodes to one), as a field path (``messages[0].content``); None when there is none. Such a
    string is no Unicode text: the tokenizer, the log and even an error message that quotes it
    fail on it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and lone_surrogate(k) is not None:
                return path  # the object whose key it is ("": the body's own keys)
            if (hit := lone_surrogate(v, f"{path}.{k}" if path else str(k))) is not None:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (hit := lone_surrogate(v, f"{path}[{i}]")) is not None:
                return hit
    return None


class StrictModel(BaseModel):
    """Base of every request body. strict=True: a string where a number belongs is a 400, not
    silently coerced; extra="forbid": a field mtplx does not know is a 400, not silently
    dropped (OpenAI answers unknown fields the same way). Any string anywhere in the body with a
    lone UTF-16 surrogate is a 400 naming its field (``lone_surrogate``), for every dialect."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        # Checked on the raw body, before any field: free-form fields (metadata, tool schemas,
        # extra settings) are covered too. The outermost model answers first, so the path is the
        # whole one from the body; the nested models' own checks then find nothing.
        where = lone_surrogate(data)
        if where is not None:  # worded by mtplx.server.http_errors.validation_error, which has the path
            raise PydanticCustomError("lone_surrogate", "a string holds a lone UTF-16 surrogate", {"param": where})
        return data


# -- generations -------------------------------------------------------------------------------

@dataclass
class Generation:
    """What one request asks the engine for, in mtplx's terms (every dialect maps onto it)."""

    ids: list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    depth: int | str | None = None  # a fixed depth or "auto"
    stop: list[str] = field(default_factory=list)
    boundaries: tuple[int, ...] = ()  # where the next turn may diverge (prompt-cache snapshots)
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    grammar: Grammar | None = None  # a compiled response_format (Core.compile_format); None = free text
    # Strict greedy (mtplx.engine.strict): True, False or a margin, checked; None = the server's default.
    strict_greedy: bool | float | None = None
    # Drafts copied from the context (mtplx.engine.lookup): 0, N or "auto"; None = the server's default.
    lookup: int | str | None = None


# Stop strings one request may give (OpenAI's API allows 4, Anthropic's more; the scanner's
# cost grows with each).
MAX_STOPS = 16


def checked_generation(*, max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, min_p: Any, seed: Any,
                       depth: Any, max_tokens_param: str = "max_tokens", strict_greedy: Any = None,
                       lookup: Any = None, **rest: Any) -> Generation:
    """A :class:`Generation` with each decoding knob checked by :func:`knob` (ids are filled in
    later); ``rest`` (stop, logprobs) is taken as given. ``strict_greedy``: absent (None) takes
    the server's default; false turns it off for this request."""
    try:
        strict.check(strict_greedy)
    except KnobError as e:
        raise APIError(400, str(e), param="strict_greedy", code="invalid_value") from None
    return Generation([], max_tokens=knob("max_tokens", max_tokens, max_tokens_param),
                      temperature=knob("temperature", temperature), top_p=knob("top_p", top_p),
                      top_k=knob("top_k", top_k), min_p=knob("min_p", min_p), seed=knob("seed", seed),
                      depth=knob("depth", depth), strict_greedy=strict_greedy, lookup=knob("lookup", lookup),
                      **rest)


class SystemContext:
    """System text of a conversation placed where Qwen's templates take it: they accept one system
    message, first. Text before any turn joins that system prompt; text a client puts later (Claude
    Code's environment notes, a Responses developer message) goes, unchanged, at the front of the
    next user turn, or stands as a user turn of its own at the end: the model reads it where the
    client put it. Each dialect builds its template messages and hands this the system pieces."""

    def __init__(self, *prompt: str | None):
        self.system = [p for p in prompt if p]
        self.pending: list[str] = []  # system text waiting for the next user turn

    def add(self, text: str, messages: list[dict[str, Any]]) -> None:
        """System text met after ``messages`` (the template messages so far)."""
        (self.pending if messages else self.system).append(text)

    def take(self) -> list[str]:
        """The waiting system text, for the front of the user turn being built."""
        pending, self.pending = self.pending, []
        return pending

    def close(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the system prompt first and any text still waiting as a last user turn."""
        if self.pending:
            messages.append({"role": "user", "content": "\n".join(self.take())})
        if self.system:
            messages.insert(0, {"role": "system", "content": "\n".join(self.system)})
        return messages


@dataclass
class Outcome:
    """A whole generation: its text and every engine step (the last one carries the totals)."""

    text: str
    steps: list[GenerationResponse]

    @property
    def last(self) -> GenerationResponse:
        return self.steps[-1]


def _chars(value: Any) -> int:
    """Characters of text in a JSON-like value: a lower bound on what the template renders."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_chars(v) for v in value)
    return 0


def mtplx_stats(r: GenerationResponse, job: Job) -> dict[str, Any]:
    """The ``mtplx`` field of a response: how the speculation went (``depth_histogram`` counts
    decode steps by the depth the head drafted: depth auto's mix; ``lookup_steps`` the steps that
    verified drafts copied from the context instead), and the token budget the
    generation ran under (``max_tokens``: the request's, capped at the context left);
    ``strict_greedy``: whether it ran strict greedy (false at temperature > 0, where it does
    nothing), ``recomputed``: its near-ties re-decided."""
    return {"tokens_per_second": round(r.generation_tps, 3), "prompt_tokens_per_second": round(r.prompt_tps, 3),
            "acceptance": [round(a, 4) for a in r.acceptance], "tokens_per_step": round(r.tokens_per_step, 4),
            "depth": job.kwargs["depth"], "depth_histogram": {str(d): n for d, n in enumerate(r.stats.depth_steps)},
            "max_tokens": job.kwargs["max_tokens"], "recomputed": r.stats.recomputed,
            "lookup": job.kwargs.get("lookup"), "lookup_steps": getattr(r.stats, "lookup_steps", 0),
            # Where the emitted tokens came from: copied drafts, MTP drafts, or sampled from the trunk.
            "tokens_from": {"lookup": getattr(r.stats, "from_lookup", 0), "mtp": getattr(r.stats, "from_mtp", 0),
                            "sampled": getattr(r.stats, "from_sampled", 0)},
            "strict_greedy": strict.check(job.kwargs.get("strict_greedy")) is not None}


def engine_error(exc: BaseException) -> APIError:
    """An exception raised while generating -> the error the client sees (a server fault is
    logged, see :func:`mtplx.server.http_errors.from_exception`)."""
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), type_="server_error", code="unavailable")
    return errors.from_exception(exc)


class Core:
    """One model behind a queue: encodes prompts, submits generations and hands back their steps."""

    def __init__(self, model: Any, tokenizer: Any, *, served_model_names: Sequence[str] = ("mtplx",),
                 depth: int | str | None = None, queue_size: int = 8, max_tokens_default: int | None = 512,
                 prompt_cache_bytes: int = 0, max_batch: int | None = None, strict_greedy: bool | float = False,
                 prefill_chunk: int | None = None, prompt_cache_dir: str | Path | None = None,
                 prompt_cache_disk_bytes: int | None = None, lookup: int | str = knobs.AUTO,
                 capacity: Capacity | None = None, kv_bits: int | None = None, kv_group_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        # How every request's attention KV is stored (mtplx.model.kv_quant; no per-request field):
        # the prompt caches, their disk folder and the capacity's byte model follow it.
        self.kv = dict(zip(("kv_bits", "kv_group_size"), model.trunk.check_kv(kv_bits, kv_group_size)))
        # Strict greedy for requests that do not say (a request's "strict_greedy" overrides it).
        strict.check(strict_greedy, model)
        self.strict_greedy = strict_greedy
        self.served_model_names = list(dict.fromkeys(n for n in served_model_names if n))
        if not self.served_model_names:
            raise MtplxError("the server needs at least one model name to answer to",
                             fix="pass --served-model-name NAME")
        # Patterns (claude-*) answer to names; what is reported and listed are the plain names.
        self.listed_names = [n for n in self.served_model_names if not _is_pattern(n)]
        if not self.listed_names:
            raise MtplxError(f"every served model name is a pattern ({', '.join(self.served_model_names)}); "
                             "responses need one plain name to report", fix="add --served-model-name NAME")
        self.model_id = self.listed_names[0]
        self.max_tokens_default = max_tokens_default
        self.keepalive_s = KEEPALIVE_S
        self.lookup = knobs.check("lookup", lookup)  # for requests that do not set "lookup"
        self._advised: set[str] = set()
        self.metrics = Metrics()
        # Prompt caches of recent conversations, bounded in bytes; 0 turns them off.
        # With a folder, also on disk (mtplx.engine.prompt_cache_disk): a restart keeps them.
        disk = None
        if prompt_cache_bytes > 0 and prompt_cache_dir is not None:
            disk = PromptCacheDisk(prompt_cache_dir, cache_identity(model, **self.kv),
                                   default_max_bytes(Path(prompt_cache_dir)) if prompt_cache_disk_bytes is None
                                   else prompt_cache_disk_bytes, **self.kv)
        self.prompt_caches = (PromptCacheLRU(model, prompt_cache_bytes, disk=disk, **self.kv) if prompt_cache_bytes > 0
                              else None)
        self.metrics.prompt_caches = self.prompt_caches
        # Rows decoding together: --max-batch, by default as many as the memory left for their
        # caches holds (capacity.py); rows wait while the batch's caches would not fit.
        capacity = Capacity.of_machine(model, prompt_cache_bytes, **self.kv) if capacity is None else capacity
        if (fit := capacity.max_tokens()) < model.max_context:  # said once here, not only in each 400
            log.warning("mtplx: this machine's memory holds the caches of %d tokens per request, less than the model's "
                        "context of %d; longer requests (prompt + max_tokens) get 400 (docs/server.md, Memory)",
                        fit, model.max_context)
        self.max_batch = capacity.default_max_batch() if max_batch is None else max_batch
        self.scheduler = Scheduler(model, tokenizer, self.metrics, max_queue=queue_size,
                                   prompt_caches=self.prompt_caches, max_batch=self.max_batch, capacity=capacity,
                                   prefill_chunk=knobs.check("prefill_chunk", prefill_chunk))
        self.depth = default_depth(model) if depth is None else depth
        if self.depth != 0 and not model.has_mtp:
            raise MtplxError(f"depth {self.depth} needs an MTP head and this model has none",
                             fix="use --depth 0 or --no-mtp")
        if self.depth == "auto":  # its step costs: measured (or read) now, not in the first request
            step_costs(model)
        elif getattr(model, "has_mtp", False) and getattr(getattr(model, "trunk", None), "stage", None) is None:
            # A request may ask for depth auto whatever the default, so its costs are measured now,
            # never by the engine thread inside a running batch's step. A model whose passes fail
            # still starts: each request will say so.
            try:
                step_costs(model)
            except Exception as e:  # noqa: BLE001
                log.warning("mtplx: measuring step costs for depth auto failed (%s: %s); requests that ask "
                            "for depth auto will fail", type(e).__name__, e)
        # No token decodes to more than `longest` characters, so a text of n characters has at
        # least n / longest tokens; Unicode normalization may merge up to a few code points
        # into one before tokenizing, hence the factor. Beyond this a prompt cannot fit, and
        # is refused before the tokenizer spends seconds and gigabytes on it.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = model.max_context * max(longest, 1) * 4
        # Chat templates and BPE run on their own thread: a long prompt must not stall the event
        # loop, and one thread means the tokenizer is never used concurrently.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtplx-tokenize")
        # transformers warns on every prompt longer than the tokenizer's model_max_length; the
        # context check above is the model's own, so that warning is noise in the server's log.
        hf = getattr(tokenizer, "_tokenizer", None)
        if hf is not None and hasattr(hf, "model_max_length"):
            hf.model_max_length = max(hf.model_max_length, model.max_context)

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's ``model`` selects (reported in the answer): the first plain
        name, for an absent name, a served name, or one a served pattern matches (``claude-*``:
        coding agents ask for their own model names). Another name is a 404 ``model_not_found``,
        as OpenAI answers, naming the settings that fix it."""
        if name is None or name in self.served_model_names or any(
                fnmatch.fnmatchcase(name, p) for p in self.served_model_names if _is_pattern(p)):
            return self.model_id
        served = ", ".join(repr(n) for n in self.served_model_names)
        fix = ("ask for one of those names (Claude Code: ANTHROPIC_MODEL and ANTHROPIC_SMALL_FAST_MODEL; Codex: "
               "model in config.toml; Qwen Code: OPENAI_MODEL), or start the server with --served-model-name "
               "adding this name or a pattern such as 'claude-*'")
        raise APIError(404, f"The model {name!r} does not exist; this server serves {served}. "
                            f"Fix: {fix}.", param="model", code="model_not_found")

    def note_advisory(self, fields: Sequence[str], reasons: dict[str, str]) -> None:
        """Log, once per field and server, that a request's advisory field changes nothing here."""
        for f in fields:
            if f not in self._advised:
                self._advised.add(f)
                log.info("mtplx: accepting '%s' without effect (%s); logged once", f, reasons.get(f, "advisory"))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self.prompt_caches is not None:
            self.prompt_caches.close()  # the disk tier's queued writes finish
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # -- prompts -------------------------------------------------------------------------------

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_prompt_chars:
            raise APIError(400, f"The prompt has {n_chars} characters, more than this model's context of "
                                f"{self.model.max_context} tokens can hold.", param=param,
                           code="context_length_exceeded")

    def check_ids(self, ids: list[Any], param: str) -> list[int]:
        """Token ids from the request, checked against the vocabulary before anything touches
        the model (an id past the embedding table reads memory beyond it)."""
        if len(ids) >= self.model.max_context:
            raise self._too_long(len(ids))
        try:
            return knobs.check_token_ids(ids, self.model.vocab_size, param=param)
        except KnobError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    async def _tokenize(self, fn: Callable[[], Any], param: str) -> list[int]:
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn)
        except (jinja2.TemplateError, MtplxError) as e:  # a chat template that rejects the conversation
            raise APIError(400, f"Could not build the prompt: {e}", param=param) from e
        except Exception as e:  # noqa: BLE001 - anything else is the server's fault: logged, 500
            raise errors.from_exception(e, "Building the prompt") from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    async def compile_format(self, response_format: dict[str, Any] | None) -> Grammar | None:
        """A request's response_format checked and compiled, once, while the request is
        validated (on the tokenizer's thread: a large schema must not stall the event loop);
        the engine thread gets the result and only builds the matcher."""
        if response_format is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tok_pool, compile_format, response_format)
        except ResponseFormatError as e:
            raise APIError(400, f"Invalid value for '{e.param}': {e}", param=e.param, code="invalid_value") from None

    async def encode_text(self, text: str, param: str) -> list[int]:
        self.check_prompt_chars(len(text), param)
        return await self._tokenize(lambda: self.tokenizer.encode(text), param)

    async def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          param: str = "messages") -> tuple[list[int], tuple[int, ...]]:
        """Messages (and tools) through the model's chat template, with the generation prompt;
        returns the ids and, with prompt caches on, where the next turn may diverge from them.
        ``template_kwargs`` reach the template as variables (``enable_thinking``, ...)."""
        self.check_prompt_chars(sum(_chars(m) for m in messages) + _chars(tools), param)
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        ids = await self._tokenize(lambda: self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **kwargs), param)
        if self.prompt_caches is None:
            return ids, ()
        boundaries = await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, lambda: reuse_boundaries(self.tokenizer, messages, ids, **kwargs))
        return ids, boundaries

    def _too_long(self, n: int) -> APIError:
        return APIError(400, f"The prompt has {n} tokens, at or over the model's context of "
                             f"{self.model.max_context}.", code="context_length_exceeded")

    # -- generations ---------------------------------------------------------------------------

    def submit(self, g: Generation) -> Job:
        """Queue ``g``. ``job.kwargs`` holds what it runs with: ``depth`` (an integer or "auto"),
        and ``max_tokens`` capped at the context left after the prompt (a larger request, up to
        2**63 and beyond, is honoured as "as many as fit"; finish_reason "length" and
        ``mtplx.max_tokens`` tell). A default max_tokens is also capped at what memory holds
        (``Capacity.max_tokens``); a request whose prompt and max_tokens cannot fit in memory
        even alone is a 400 (``Capacity.admit``)."""
        model = self.model
        if not g.ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        if len(g.ids) >= model.max_context:
            raise self._too_long(len(g.ids))
        depth = self.depth if g.depth is None else g.depth
        if depth != 0 and not model.has_mtp:
            raise APIError(400, "This server's model has no MTP head; only depth 0 is available.", param="depth")
        left = model.max_context - len(g.ids)
        # A reply the request leaves to the server ends where memory would, not only at the context's
        # end, so a default never trips the refusal below (capacity.py).
        capacity = self.scheduler.capacity
        room = left if capacity is None else min(left, capacity.max_tokens() - len(g.ids))
        max_tokens = min(g.max_tokens, left) if g.max_tokens else min(self.max_tokens_default or left, max(room, 1))
        if capacity is not None:
            capacity.admit(len(g.ids), max_tokens)  # a row that cannot fit alone: 400, before any prefill
        strict_greedy = self.strict_greedy if g.strict_greedy is None else g.strict_greedy
        if strict_greedy is not False and not sampling_from(model, g.temperature, None, None, None).greedy:
            # Strict greedy guards argmax tokens only: at temperature > 0 the engine ignores it,
            # and the response's mtplx.strict_greedy says it was not applied.
            strict_greedy = False
        kwargs = dict(max_tokens=max_tokens, temperature=g.temperature,
                      top_p=g.top_p, top_k=g.top_k, min_p=g.min_p, depth=depth, seed=g.seed, stop=g.stop,
                      logprobs=g.logprobs, strict_greedy=strict_greedy,
                      lookup=self.lookup if g.lookup is None else g.lookup, **self.kv)
        if g.grammar is not None:
            kwargs["response_format"] = g.grammar
        job = Job(g.ids, kwargs, asyncio.get_running_loop(), boundaries=g.boundaries)
        try:
            self.scheduler.submit(job)
            if self.prompt_caches is not None:
                self.prompt_caches.prefetch(g.ids)  # a file it will load is read while it waits
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry shortly.", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type_="server_error", code="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        return job

    async def steps(self, job: Job, keepalive: bool = False) -> AsyncIterator[GenerationResponse | None]:
        """The job's engine steps as they come; an engine failure or a cancellation before the
        last step raises :class:`APIError`. The job is cancelled however the caller stops.
        ``keepalive``: yield None whenever nothing came for ``self.keepalive_s`` seconds (a
        streaming dialect answers with its keep-alive)."""
        finished = False
        try:
            while (ev := await self._next_event(job, keepalive)) is None or ev.kind != "done":
                if ev is None:
                    yield None
                    continue
                if ev.kind == "chunk":
                    finished = bool(ev.response.finish_reason)
                    yield ev.response
                else:
                    raise engine_error(ev.error)
            if not finished:
                raise APIError(503, "The generation was cancelled before it finished.", type_="server_error")
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; frees the engine otherwise

    async def _next_event(self, job: Job, keepalive: bool) -> Any:
        if not keepalive:
            return await job.next_event()
        try:  # asyncio.Queue.get is safe to cancel: a timed-out wait loses no event
            return await asyncio.wait_for(job.next_event(), self.keepalive_s)
        except asyncio.TimeoutError:
            return None

    async def collect(self, request: Request, job: Job) -> Outcome:
        """Wait for the whole generation; a client that leaves meanwhile cancels it."""
        # Events arrive every engine step, so disconnects are watched by a task of their own
        # rather than between events (a long generation would otherwise never notice).
        watcher = asyncio.create_task(until_disconnect(request))

        def on_disconnect(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                self.scheduler.cancel(job)

        watcher.add_done_callback(on_disconnect)
        steps: list[GenerationResponse] = []
        try:
            async for r in self.steps(job):
                steps.append(r)
        except APIError:
            if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                raise APIError(499, "The client closed the request.") from None
            raise
        finally:
            watcher.cancel()
        return Outcome("".join(r.text for r in steps), steps)
