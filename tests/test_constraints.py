"""The grammar constraint: response_format validation, masks against a reference grammar, the
speculative step's bookkeeping (masks per draft position, rollback, end-of-sequence), a reduced
draft vocabulary, and the API's refusals. No model forward passes: the law and the demo's
output are tested in test_constraint_law.py and test_constrained_output.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mtplx
from mtplx.engine.constraints import Constraint, ResponseFormatError, grammar_for, grammar_tokenizer
from mtplx.errors import MtplxError
from tiny_grammar import PIECES, grammar, reference_allowed
from tiny_grammar import grammar_tokenizer as tiny_view
from tiny_models import tiny_model

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["n"], "additionalProperties": False}


def json_schema(schema, **extra):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, **extra}}


@pytest.fixture
def tiny():
    return Constraint(tiny_view(), grammar())


def ids(*pieces):
    return [PIECES.index(p) for p in pieces]


# -- response_format -----------------------------------------------------------------------------

def test_text_and_none_constrain_nothing():
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None


def test_json_shapes_compile():
    assert grammar_for({"type": "json_object"})
    assert grammar_for(json_schema(SCHEMA, strict=True, description="one answer"))


@pytest.mark.parametrize("response_format, says", [
    ("json", "must be an object"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ({"type": "json_object", "schema": {}}, "unsupported field(s): schema"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name must be a non-empty string"),
    (json_schema(SCHEMA, strict="yes"), "strict must be true or false"),
    (json_schema(SCHEMA, examples=[]), "unsupported field(s): examples"),
    (json_schema([1]), "schema must be a JSON Schema object"),
    (json_schema({"type": "foo"}), "not a valid JSON Schema"),
    (json_schema({"type": "string", "pattern": "(?<=a)b"}), "cannot be enforced while decoding: regex parse error"),
    (json_schema({"$ref": "#/$defs/missing"}), "cannot be enforced while decoding"),
])
def test_bad_response_format_is_one_clear_error(response_format, says):
    with pytest.raises(ResponseFormatError) as e:
        grammar_for(response_format)
    assert says in str(e.value) and e.value.param.startswith("response_format")
    assert isinstance(e.value, MtplxError) and isinstance(e.value, ValueError)


# -- masks ---------------------------------------------------------------------------------------

def test_masks_equal_the_reference_grammar(tiny):
    """Every prefix of up to three allowed tokens: llguidance's mask is the plain-Python one."""
    prefixes = [[]]
    for _ in range(3):
        prefixes = [p + [t] for p in prefixes for t in np.nonzero(reference_allowed(p))[0]]
        for prefix in prefixes:
            tiny.start()
            for t in prefix:
                tiny.advance(int(t))
            assert (tiny.allowed() == reference_allowed(prefix)).all(), prefix


def test_mask_sets_forbidden_logits_to_minus_inf_before_sampling(tiny):
    logits = mx.arange(len(PIECES), dtype=mx.float32)[None]
    masked = np.array(tiny.mask(logits))[0]
    allowed = reference_allowed([])
    assert (masked[allowed] == np.arange(len(PIECES))[allowed]).all() and np.isneginf(masked[~allowed]).all()
    assert int(mx.argmax(tiny.mask(logits), axis=-1).item()) == max(np.nonzero(allowed)[0])  # greedy = argmax over allowed


def step(constraint, drafts, vocab_logits=None):
    """Drive one speculative step's drafting by hand; returns the verify masks [D+1, V]."""
    for d in drafts:
        constraint.mask_draft(vocab_logits if vocab_logits is not None else mx.zeros((1, 1, len(PIECES))))
        constraint.advance_draft(d)
    masked = constraint.mask_verify(mx.zeros((len(drafts) + 1, len(PIECES))))
    return ~np.isneginf(np.array(masked))


@pytest.mark.parametrize("accepted", [0, 1, 2, 3])
def test_verify_masks_follow_the_drafts_and_commit_rolls_back(tiny, accepted):
    committed = ids("a")
    tiny.advance(committed[0])
    drafts = ids("c", "b", "ab")
    masks = step(tiny, drafts)
    for i in range(len(drafts) + 1):
        assert (masks[i] == reference_allowed(committed + drafts[:i])).all(), i
    # after a rejection at position `accepted` the next token comes from that position's law
    next_token = ids("aa")[0]
    tiny.commit(accepted, next_token)
    assert (tiny.allowed() == reference_allowed(committed + drafts[:accepted] + [next_token])).all()
    # the next step starts from the committed state
    masks = step(tiny, ids("a"))
    assert (masks[0] == reference_allowed(committed + drafts[:accepted] + [next_token])).all()


def test_reduced_draft_vocabulary_gets_the_mask_at_its_ids(tiny):
    model = tiny_model(vocab=len(PIECES), seed=1)
    model.set_draft_vocab(mx.array(ids("a", "b", "c", "bb")))
    logits = mx.zeros((1, 1, 4))
    masked = np.array(tiny.mask_draft(logits, model.draft_vocab))[0, 0]
    assert list(~np.isneginf(masked)) == [True, False, True, False]  # a, c allowed; b, bb not


def test_draft_vocabulary_without_an_allowed_token_drafts_unmasked_and_is_rejected(tiny):
    """Before a c only a, aa, c are allowed; a subset {b, bb} has none. The draft is left
    unmasked, p is 0 at whatever it drafts (so it is rejected), and the rest of the step is
    unconstrained since it can never be emitted."""
    model = tiny_model(vocab=len(PIECES), seed=1)
    model.set_draft_vocab(mx.array(ids("b", "bb")))
    logits = mx.array([[[0.5, 1.0]]])
    assert mx.array_equal(tiny.mask_draft(logits, model.draft_vocab), logits)
    tiny.advance_draft(ids("bb")[0])
    tiny.mask_draft(logits, model.draft_vocab)
    tiny.advance_draft(ids("b")[0])
    masks = ~np.isneginf(np.array(tiny.mask_verify(mx.zeros((3, len(PIECES))))))
    assert (masks[0] == reference_allowed([])).all() and masks[1:].all()
    tiny.commit(0, ids("c")[0])
    assert (tiny.allowed() == reference_allowed(ids("c"))).all()


# -- JSON on the demo's tokenizer ----------------------------------------------------------------

def json_constraint(demo, response_format):
    model, tok = demo
    return Constraint.from_response_format(response_format, tok, model.vocab_size, tok.eos_token_ids)


def allowed_text(constraint, tok):
    return {tok.decode([int(t)]) for t in np.nonzero(constraint.allowed())[0]}


def test_json_object_starts_with_a_brace_and_ends_with_eos_only(demo):
    _, tok = demo
    c = json_constraint(demo, {"type": "json_object"})
    assert all(s.startswith("{") for s in allowed_text(c, tok))
    for t in tok.encode('{\n    "a": [1, 2],\n    "b": {"c": null}\n}'):
        assert c.allowed()[t]
        c.advance(t)
    assert set(np.nonzero(c.allowed())[0]) == set(tok.eos_token_ids)
    eos = min(tok.eos_token_ids)
    c.advance(eos)
    assert set(np.nonzero(c.allowed())[0]) == set(tok.eos_token_ids)


def test_whitespace_is_bounded(demo):
    """One space, or newlines and up to 20 columns of indent, between JSON tokens: a model
    cannot spend its budget on whitespace."""
    _, tok = demo
    c = json_constraint(demo, {"type": "json_object"})
    c.advance(tok.encode("{")[0])
    spaces = [t for t in np.nonzero(c.allowed())[0] if tok.decode([int(t)]).strip() == ""]
    assert spaces and max(len(tok.decode([int(t)]).lstrip("\n")) for t in spaces) <= 20
    space = tok.encode(" ")[0]
    c.advance(space)
    assert not c.allowed()[space]


def test_a_rejected_end_of_sequence_draft_is_rolled_back(demo):
    _, tok = demo
    c = json_constraint(demo, json_schema({"type": "integer"}))
    one = tok.encode("1")[0]
    c.advance(one)
    eos = min(tok.eos_token_ids)
    c.mask_draft(mx.zeros((1, 1, c.vocab_size)))
    c.advance_draft(eos)  # "1" may end here
    c.mask_draft(mx.zeros((1, 1, c.vocab_size)))
    assert set(np.nonzero(c.allowed())[0]) == set(tok.eos_token_ids)  # after EOS only EOS
    c.advance_draft(eos)
    c.mask_verify(mx.zeros((3, c.vocab_size)))
    two = tok.encode("2")[0]
    c.commit(0, two)  # EOS rejected, "2" sampled instead: "12" may go on
    assert c.allowed()[one] and c.allowed()[eos]


# -- the API -------------------------------------------------------------------------------------

def test_api_refuses_a_bad_response_format_before_decoding(demo):
    model, tok = demo
    with pytest.raises(MtplxError, match="response_format.type must be one of"):
        mtplx.generate(model, tok, "x", max_tokens=2, response_format={"type": "yaml"})
    with pytest.raises(MtplxError, match="not a valid JSON Schema"):
        next(mtplx.stream_generate(model, tok, "x", max_tokens=2, response_format=json_schema({"type": 3})))


def test_api_refuses_thinking_with_a_grammar(demo):
    model, tok = demo
    with pytest.raises(MtplxError, match="enable_thinking"):
        mtplx.generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=2, enable_thinking=True,
                       response_format={"type": "json_object"})


def test_grammar_tokenizer_is_built_once_per_tokenizer(demo):
    model, tok = demo
    assert grammar_tokenizer(tok, model.vocab_size, tok.eos_token_ids) is grammar_tokenizer(tok, model.vocab_size, tok.eos_token_ids)
