"""The Python API: streaming, stops, max_tokens, EOS, chat template, determinism."""

from __future__ import annotations

import pytest

import mtplx
from mtplx.api import _StopScanner, encode_prompt
from mtplx.errors import MtplxError


def test_generate_is_deterministic_per_seed(demo):
    model, tok = demo
    a = mtplx.generate(model, tok, "def add(a, b):", max_tokens=16, seed=3, depth=2)
    b = mtplx.generate(model, tok, "def add(a, b):", max_tokens=16, seed=3, depth=2)
    assert a == b and a


def test_stream_matches_generate_and_reports_stats(demo):
    model, tok = demo
    chunks = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=20, seed=1, depth=2))
    assert "".join(c.text for c in chunks) == mtplx.generate(model, tok, "import os\n", max_tokens=20, seed=1, depth=2)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.generation_tokens == 20
    assert len(last.acceptance) == 2 and all(0 <= a <= 1 for a in last.acceptance)
    assert last.tokens_per_step >= 1 and last.generation_tps > 0 and last.prompt_tokens == 3


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_max_tokens_is_exact(demo, depth):
    model, tok = demo
    tokens = [t for r in mtplx.stream_generate(model, tok, "def f(x):", max_tokens=13, temperature=0, depth=depth)
              for t in r.tokens]
    assert len(tokens) == 13


def test_stop_string_inside_an_accepted_run(demo):
    model, tok = demo
    full = mtplx.generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3)
    stop = full[10:14]
    cut = mtplx.generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_eos_ends_the_output(demo):
    model, tok = demo
    # Force an early EOS: treat the first greedy token as end-of-sequence.
    first = next(iter(mtplx.stream_generate(model, tok, "import os\n", max_tokens=5, temperature=0, depth=2))).tokens[0]
    saved = set(tok.eos_token_ids)
    tok.eos_token_ids = saved | {first}
    try:
        out = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=30, temperature=0, depth=2))
    finally:
        tok.eos_token_ids = saved
    assert out[-1].finish_reason == "stop" and out[-1].generation_tokens == 1
    assert "".join(r.text for r in out) == ""


def test_chat_template_thinking_switch(demo):
    _, tok = demo
    messages = [{"role": "user", "content": "hi"}]
    on = tok.decode(encode_prompt(tok, messages, enable_thinking=True))
    off = tok.decode(encode_prompt(tok, messages, enable_thinking=False))
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<think>\n\n</think>\n\n")


def test_prompt_over_context_is_refused(demo):
    model, tok = demo
    with pytest.raises(MtplxError, match="context"):
        mtplx.generate(model, tok, [5] * (model.max_context + 1), max_tokens=4)


def test_stop_scanner_holds_back_partial_stops():
    s = _StopScanner(["STOP"])
    assert s.feed("abcST") == ("ab", False)
    assert s.feed("O") == ("c", False)  # "STO" may still begin "STOP"; "c" cannot
    assert s.feed("Pxyz") == ("", True)
    s = _StopScanner([])
    assert s.feed("abc") == ("abc", False)
