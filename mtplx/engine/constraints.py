"""Constrained decoding: a grammar matcher that masks the target law p and the draft law q,
advanced through the drafts and rolled back with the caches.

Exactness. Masking sets the logits of every token the grammar forbids to -inf before
temperature, top-k and top-p (so greedy is the argmax over allowed tokens). The constrained
target at a position is the filtered law of the masked logits, for AR and MTP alike. In one
speculative step the matcher starts at the state after the committed tokens and ``pending``;
the draft for d_i is sampled from q masked with the state after pending, d_1 .. d_{i-1}, and
verify position i masks p with that same state (the bonus position with the state after all
drafts). After acceptance the matcher is rolled back to the accepted prefix and advanced by
the residual or bonus token. Only p's masks define the target; q's only raise acceptance
(a forbidden draft has p = 0 and is always rejected), which is why a draft vocabulary that
holds no allowed token can draft unmasked and stay exact. After an end-of-sequence token
(allowed only where the grammar may end, and the only token allowed once it is complete)
only end-of-sequence tokens are allowed.

A generation that reaches ``max_tokens`` (or a stop string) before the grammar is complete
ends with finish_reason "length" (or "stop") as any other, and its text need not parse.

Engine: llguidance, chosen by measurement. ``python3 tools/measure_grammar_engines.py`` (run
once more inside a virtualenv holding ``pip install xgrammar``), on a 2-core x86_64 Linux
machine shared with other jobs, with the demo's tokenizer (4096 tokens; Qwen3.5's real
248K-token tokenizer is not available offline, so these are lower bounds), each engine's
default JSON options, a 4-property schema with a nested array of objects, walking a valid
96-token document:

    llguidance 1.9.1: tokenizer view 17 ms; compile schema 0.56 ms (generic JSON 0.29 ms);
                      mask 0.011 ms per token (median; first mask 1.1 ms); roll back k and
                      re-advance k tokens 0.001-0.003 ms for k = 1..8
    xgrammar 0.2.9:   tokenizer view 8 ms; compile schema 1.8 ms (generic JSON 3.7 ms);
                      mask 0.001 ms per token (median; max 0.1 ms); roll back + re-advance
                      0.001-0.004 ms for k = 1..8

Both are far below one decode step here (tens of ms), so speed does not decide. What they pull
in does: llguidance is a 3 MB wheel with no dependencies (7.6 MB installed); xgrammar requires
torch and, on Linux x86_64, triton and torch's CUDA libraries (``pip install xgrammar`` into
a virtualenv that already saw this machine's numpy and transformers added 5.3 GB, ``du -sh``),
and its mask buffers are torch tensors. mtplx is
MLX-only, so llguidance wins. Its JSON Schema compiler is also broad (``$ref``, ``anyOf``,
patterns) and reports what it does not support, which becomes the user's error message.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from mtplx.engine import schema_limits
from mtplx.errors import MtplxError
from mtplx.core.knobs import KnobError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
# Whitespace between JSON tokens: nothing, one space, or one or two newlines and up to 20
# spaces or tabs of indent (llama.cpp's JSON-schema grammars bound it the same way). This
# admits compact and pretty-printed JSON alike; llguidance's default (any run of whitespace)
# lets a model emit newlines until max_tokens, which the demo does under greedy decoding.
JSON_OPTIONS = {"whitespace_pattern": r"[ ]|\n{1,2}[ \t]{0,20}"}


def _limits() -> llguidance.LLParserLimits:
    # verbose_errors=False: an error is one line, not a multi-KB dump of the parser's state.
    return llguidance.LLParserLimits(verbose_errors=False)


class ResponseFormatError(KnobError):
    """A ``response_format`` that is malformed or whose schema cannot be compiled; ``param``
    names the field (``response_format`` or a path inside it)."""

    def __init__(self, message: str, fix: str | None = None, at: str = "response_format"):
        super().__init__(at, message, fix=fix)


@dataclass(frozen=True)
class Grammar:
    """A ``response_format`` checked and compiled by :func:`compile_format`. Passed as
    ``response_format`` (to :func:`mtplx.stream_generate`, say), it is used as is: the server
    checks and compiles a request's format once, when it validates the request, and the
    engine thread only builds the matcher."""

    text: str


# -- response_format -> grammar ----------------------------------------------------------------


def compile_format(response_format: Mapping[str, Any] | Grammar | None) -> Grammar | None:
    """:func:`grammar_for` as a :class:`Grammar` (``None``: no constraint)."""
    text = grammar_for(response_format)
    return None if text is None else Grammar(text)


def grammar_for(response_format: Mapping[str, Any] | Grammar | None) -> str | None:
    """Validate an OpenAI ``response_format`` and return its llguidance grammar, or ``None``
    for no constraint (``None`` or ``{"type": "text"}``). Needs no model: the server can call
    it when it validates a request. Raises :class:`ResponseFormatError` naming the problem.
    A :class:`Grammar` was checked when it was made and is returned as it is."""
    if response_format is None:
        return None
    if isinstance(response_format, Grammar):
        return response_format.text
    if not isinstance(response_format, Mapping):
        raise ResponseFormatError(f"response_format must be an object, got {response_format!r}",
                                  fix='pass {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}')
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ResponseFormatError(f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}",
                                  fix='use "json_object" for any JSON object or "json_schema" with a schema')
    allowed_keys = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    _refuse_unknown(response_format, allowed_keys, "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile({"type": "object"}, "response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ResponseFormatError(f"response_format.json_schema must be an object, got {spec!r}",
                                  fix='pass {"name": "...", "schema": {...}}')
    _refuse_unknown(spec, _JSON_SCHEMA_KEYS, "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ResponseFormatError(f"response_format.json_schema.name must be a non-empty string, got {name!r}",
                                  fix="name the schema, as OpenAI's API requires")
    for key, kinds, what in (("strict", (bool, type(None)), "true or false"),
                             ("description", (str, type(None)), "a string")):
        if not isinstance(spec.get(key), kinds):
            raise ResponseFormatError(f"response_format.json_schema.{key} must be {what}, got {spec.get(key)!r}")
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise ResponseFormatError(f"response_format.json_schema.schema must be a JSON Schema object, got {schema!r}",
                                  fix='pass the schema itself, e.g. {"type": "object", "properties": {...}}')
    # The output is held to the schema whatever ``strict`` says (vLLM does the same): a
    # constraint that is applied only sometimes would be a silent degradation.
    return _compile(dict(schema), f"response_format.json_schema.schema ({name})")


def _refuse_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ResponseFormatError(f"{where} has unsupported field(s): {', '.join(map(str, unknown))}",
                                  fix=f"use only {', '.join(sorted(allowed))}")


def _compile(schema: dict[str, Any], where: str) -> str:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    at = "response_format.json_schema.schema" if where.startswith("response_format.json_schema") else "response_format"
    # Nesting first: the metaschema check and llguidance recurse over the schema.
    schema_limits.check(schema, lambda message, fix: ResponseFormatError(f"{where} {message}", fix=fix, at=at))
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        path = "/".join(str(p) for p in e.path)
        raise ResponseFormatError(f"{where} is not a valid JSON Schema{f' at {path}' if path else ''}: {e.message}",
                                  fix="correct the schema (it is checked against its $schema's metaschema)",
                                  at=at) from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise ResponseFormatError(f"{where} cannot be read as JSON: {e}", at=at) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar, limits=_limits())
    if problem:
        raise ResponseFormatError(f"{where} cannot be enforced while decoding: {_one_line(problem)}",
                                  fix="remove or rewrite the schema feature named above", at=at)
    return grammar


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- tokenizer view ------------------------------------------------------------------------------

_TOKENIZERS: OrderedDict[tuple[int, int, tuple[int, ...]], tuple[Any, llguidance.LLTokenizer]] = OrderedDict()
_TOKENIZERS_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer (or mlx-lm's wrapper of one), over the
    model's ``vocab_size`` logits (ids the tokenizer lacks are never allowed). Building it reads
    every token (about a second at 248K tokens, say llguidance's docs), so it is cached per
    tokenizer object."""
    eos = tuple(sorted(set(int(t) for t in eos_ids)))
    key = (id(tokenizer), vocab_size, eos)
    with _TOKENIZERS_LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            _TOKENIZERS.move_to_end(key)
            return hit[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise MtplxError("response_format needs a Hugging Face fast tokenizer (tokenizer.json), and this "
                         f"model's tokenizer is a {type(tokenizer).__name__}", fix="drop response_format")
    if not eos:
        raise MtplxError("response_format needs the tokenizer's end-of-sequence token, and this tokenizer names none",
                         fix="set eos_token in tokenizer_config.json")
    view = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
    with _TOKENIZERS_LOCK:
        _TOKENIZERS[key] = (tokenizer, view)
        while len(_TOKENIZERS) > 4:
            _TOKENIZERS.popitem(last=False)
    return view


# -- the matcher the engine drives ---------------------------------------------------------------

_CONSUMED, _ENDED, _NOTHING = 1, 2, 0  # what advancing by one token did (undone by a rollback)


class Constraint:
    """One generation's grammar state, driven by the engine at marked hook points.

    AR and the first token: :meth:`mask` the logits with the current state, sample, then
    :meth:`advance`. A speculative step: :meth:`mask_draft` + :meth:`advance_draft` for each
    draft, :meth:`mask_verify` on the verify logits, then :meth:`commit` with the verdict.
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self.vocab_size = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
        if self._matcher.is_error():
            raise MtplxError(f"the grammar cannot be compiled: {_one_line(self._matcher.get_error())}")
        self._eos = np.zeros(self.vocab_size, dtype=bool)
        self._eos[tokenizer.eos_tokens] = True
        self._bits = allocate_token_bitmask(1, self.vocab_size)
        self._draft_ids: tuple[Any, np.ndarray] | None = None
        self.start()
        # Before the first token: a grammar whose first mask allows only end-of-sequence would
        # generate an empty answer that is not JSON (schema_limits refuses the schemas known
        # to do this; this catches any other way to get there).
        if not (self.allowed() & ~self._eos).any():
            raise MtplxError("the response_format admits no output but an empty one, which is not JSON",
                             fix="check the schema's $ref and required properties")

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None, tokenizer: Any, vocab_size: int,
                             eos_ids: Iterable[int]) -> Constraint | None:
        """The constraint for an OpenAI ``response_format``; ``None`` when it constrains nothing."""
        grammar = grammar_for(response_format)
        if grammar is None:
            return None
        return cls(grammar_tokenizer(tokenizer, vocab_size, eos_ids), grammar)

    def start(self) -> None:
        """Back to the grammar's start, for a new generation."""
        self._matcher.reset()
        self._ended = False
        self._begin_step()

    def _begin_step(self) -> None:
        self._step_masks: list[np.ndarray] = []
        self._step_moves: list[int] = []
        self._dead = False  # a draft the grammar forbids: the rest of the step is never emitted

    # -- state -> allowed tokens

    def allowed(self) -> np.ndarray:
        """Bool ``[V]``: the tokens the grammar allows next."""
        if self._ended:
            return self._eos.copy()
        fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        if not allowed.any():
            raise MtplxError(f"the grammar matcher allows no token: {_one_line(self._matcher.get_error() or 'dead end')}")
        return allowed

    @staticmethod
    def _apply(logits: mx.array, allowed: np.ndarray) -> mx.array:
        return mx.where(mx.array(allowed), logits, -mx.inf)

    # -- AR and committed tokens

    def mask(self, logits: mx.array) -> mx.array:
        """Logits ``[..., V]`` for the next token, -inf where the grammar forbids."""
        return self._apply(logits, self.allowed())

    def advance(self, token: int) -> None:
        """Commit one emitted token (it was sampled from a masked law, so it is allowed)."""
        if self._move(token) == _NOTHING and not self._ended:
            raise MtplxError(f"the grammar matcher refused token {token}: {_one_line(self._matcher.get_error())}")

    def _move(self, token: int) -> int:
        if self._ended:
            return _NOTHING
        if self._eos[token]:
            self._ended = True
            return _ENDED
        return _CONSUMED if self._matcher.consume_token(token) else _NOTHING

    # -- one speculative step

    def mask_draft(self, logits: mx.array, draft_vocab: Any = None) -> mx.array:
        """Mask the draft logits for the next draft position with the current state, and record
        that state's mask for the matching verify position. ``logits [..., K]`` are over the
        draft vocabulary: all V tokens, or column j = token ``draft_vocab.ids[j]``."""
        allowed = np.ones(self.vocab_size, dtype=bool) if self._dead else self.allowed()
        self._step_masks.append(allowed)
        if draft_vocab is not None:
            allowed = allowed[self._ids_of(draft_vocab)]
        if self._dead or not allowed.any():
            # No allowed token among the draft's columns: draft unmasked; p is 0 at whatever
            # comes out, so it is rejected and q cannot bias the output.
            return logits
        return self._apply(logits, allowed)

    def _ids_of(self, draft_vocab: Any) -> np.ndarray:
        if self._draft_ids is None or self._draft_ids[0] is not draft_vocab:
            self._draft_ids = (draft_vocab, np.array(draft_vocab.ids, dtype=np.int64))
        return self._draft_ids[1]

    def advance_draft(self, token: int) -> None:
        """Advance through a drafted token (vocabulary id), to be kept or rolled back by
        :meth:`commit`. A forbidden draft stops the matcher for the rest of the step."""
        if self._dead or not self._step_masks[-1][token]:
            self._dead = True
            self._step_moves.append(_NOTHING)
            return
        move = self._move(token)
        if move == _NOTHING and not self._ended:
            raise MtplxError(f"the grammar matcher refused draft token {token}: {_one_line(self._matcher.get_error())}")
        self._step_moves.append(move)

    def take_copy(self, tokens: list[int]) -> list[int]:
        """Drafts copied from the context (lookup.py), walked as head drafts are: each
        position's mask recorded for the verify, the matcher advanced through each token. The
        copy ends before the first token the grammar forbids (p is 0 there: it could only be
        rejected); returns the tokens kept, which :meth:`commit` keeps or rolls back."""
        kept: list[int] = []
        for token in tokens:
            allowed = self.allowed()
            if not allowed[token]:
                break
            self._step_masks.append(allowed)
            self.advance_draft(token)
            kept.append(token)
            if self._ended:  # an EOS copied: nothing after it is emitted
                break
        return kept

    def mask_verify(self, logits: mx.array) -> mx.array:
        """Mask the verify logits ``[D+1, V]``: row i with the state before draft i+1 (recorded
        by :meth:`mask_draft`), the bonus row with the state after all drafts."""
        bonus = np.ones(self.vocab_size, dtype=bool) if self._dead else self.allowed()
        return self._apply(logits, np.stack(self._step_masks + [bonus]))

    def mask_row(self, logits: mx.array, row: int) -> mx.array:
        """Logits ``[..., V]`` masked as :meth:`mask_verify` masked verify row ``row`` (strict
        greedy decides that row's token again with a one-row pass, before :meth:`commit`)."""
        if row < len(self._step_masks):
            return self._apply(logits, self._step_masks[row])
        return logits if self._dead else self._apply(logits, self.allowed())

    def commit(self, accepted: int, next_token: int) -> None:
        """Keep the first ``accepted`` drafts, roll back the rest, advance by the residual or
        bonus token."""
        undo = self._step_moves[accepted:]
        if _ENDED in undo:
            self._ended = False
        n = sum(1 for m in undo if m == _CONSUMED)
        if n and not self._matcher.rollback(n):
            raise MtplxError(f"the grammar matcher could not roll back {n} tokens: {self._matcher.get_error()}")
        self.advance(next_token)
        self._begin_step()
