"""Structured output on the demo's bf16 copy (conftest's demo_bf16: the demo's int4 head and
tokenizer on a bf16 trunk, trained on Python source, so its JSON is odd but must be valid; the masks
do not depend on how the trunk is stored, and test_greedy.py holds the 4-bit demo's greedy output to
AR's): a json_schema response_format with a nested object and a bounded array, greedy, at depth 0
and depth 2. Both outputs end with EOS, parse and validate against the schema, and greedy
constrained MTP equals greedy constrained AR token for token (a flip is allowed only at a numerical
tie of the masked logits, as in test_greedy.py).
"""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import pytest

import mtplx
from mtplx.engine.constraints import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "version": {"type": "integer"},
        "options": {
            "type": "object",
            "properties": {"debug": {"type": "boolean"},
                           "paths": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}},
            "required": ["debug", "paths"],
            "additionalProperties": False,
        },
    },
    "required": ["version", "options"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "config", "schema": SCHEMA, "strict": True}}
PROMPT = "import json\n\n"
MAX_TOKENS = 96
TIE = 0.05  # as in test_greedy.py: bf16 logits


@pytest.fixture(scope="module")
def outputs(demo_bf16):
    model, tok = demo_bf16
    out = {}
    for depth in (0, 2):
        chunks = list(mtplx.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS, temperature=0, depth=depth,
                                            response_format=FORMAT))
        out[depth] = ("".join(c.text for c in chunks), [t for c in chunks for t in c.tokens], chunks[-1])
    return out


@pytest.mark.parametrize("depth", [0, 2])
def test_output_parses_and_validates(outputs, depth):
    text, tokens, last = outputs[depth]
    assert last.finish_reason == "stop" and len(tokens) < MAX_TOKENS, "the grammar must end the output with EOS"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_greedy_constrained_mtp_equals_greedy_constrained_ar(demo_bf16, outputs):
    model, tok = demo_bf16
    _, ar, _ = outputs[0]
    _, mtp, last = outputs[2]
    acceptance = last.acceptance
    assert 0 < min(acceptance) and max(acceptance) < 1, f"drafts must be both accepted and rejected: {acceptance}"
    if mtp == ar:
        return
    flip = next(i for i, (a, b) in enumerate(zip(ar, mtp)) if a != b)
    ids = tok.encode(PROMPT)
    constraint = Constraint.from_response_format(FORMAT, tok, model.vocab_size, tok.eos_token_ids)
    for t in ar[:flip]:
        constraint.advance(t)
    logits = model.trunk.logits(mx.array([ids + ar[:flip]]), model.trunk.make_cache())[0, -1].astype(mx.float32)
    top2 = mx.sort(constraint.mask(logits))[-2:]
    assert {ar[flip], mtp[flip]} <= set(mx.argsort(constraint.mask(logits))[-2:].tolist()), "not a top-2 swap"
    assert float((top2[1] - top2[0]).item()) < TIE, f"diverges at token {flip} without a tie"
