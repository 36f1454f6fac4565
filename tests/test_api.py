"""The Python API: streaming, stops, max_tokens, EOS, chat template, determinism.

The tests that decode run on conftest's demo_bf16 (the demo's head, tokenizer and template on a
bf16 trunk: a quarter of the 4-bit demo's time on MLX's CPU backend); the template and refusal
tests use the demo itself."""

from __future__ import annotations

import pytest

import mtplx
from mtplx.api import encode_prompt
from mtplx.generation.stops import StopScanner
from mtplx.errors import MtplxError


def test_generate_is_deterministic_per_seed(demo_bf16):
    model, tok = demo_bf16
    a = mtplx.generate(model, tok, "def add(a, b):", max_tokens=16, seed=3, depth=2)
    b = mtplx.generate(model, tok, "def add(a, b):", max_tokens=16, seed=3, depth=2)
    assert a == b and a


def test_stream_matches_generate_and_reports_stats(demo_bf16):
    model, tok = demo_bf16
    chunks = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=20, seed=1, depth=2))
    assert "".join(c.text for c in chunks) == mtplx.generate(model, tok, "import os\n", max_tokens=20, seed=1, depth=2)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.generation_tokens == 20
    assert len(last.acceptance) == 2 and all(0 <= a <= 1 for a in last.acceptance)
    assert last.tokens_per_step >= 1 and last.generation_tps > 0 and last.prompt_tokens == 3


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_max_tokens_is_exact(demo_bf16, depth):
    model, tok = demo_bf16
    tokens = [t for r in mtplx.stream_generate(model, tok, "def f(x):", max_tokens=13, temperature=0, depth=depth)
              for t in r.tokens]
    assert len(tokens) == 13


def test_stop_string_inside_an_accepted_run(demo_bf16):
    model, tok = demo_bf16
    full = mtplx.generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3)
    stop = full[10:14]
    cut = mtplx.generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3, stop=[stop])
    assert cut == full[: full.index(stop)]
    last = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3,
                                      stop=["@@never", stop]))[-1]
    assert (last.finish_reason, last.stop_sequence) == ("stop", stop)


def test_eos_ends_the_output(demo_bf16):
    model, tok = demo_bf16
    # Force an early EOS: treat the first greedy token as end-of-sequence.
    first = next(iter(mtplx.stream_generate(model, tok, "import os\n", max_tokens=5, temperature=0, depth=2))).tokens[0]
    saved = set(tok.eos_token_ids)
    tok.eos_token_ids = saved | {first}
    try:
        out = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=30, temperature=0, depth=2))
    finally:
        tok.eos_token_ids = saved
    assert out[-1].finish_reason == "stop" and out[-1].generation_tokens == 1
    assert out[-1].stop_sequence is None  # an end-of-sequence token, not a stop string
    assert "".join(r.text for r in out) == ""


def test_chat_template_thinking_switch(demo):
    _, tok = demo
    messages = [{"role": "user", "content": "hi"}]
    on = tok.decode(encode_prompt(tok, messages, enable_thinking=True))
    off = tok.decode(encode_prompt(tok, messages, enable_thinking=False))
    # The demo ships Qwen3.5's official template: thinking opens a <think> block, off closes an empty one.
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_prompt_over_context_is_refused(demo):
    from mtplx.errors import ContextOverflowError

    model, tok = demo
    with pytest.raises(ContextOverflowError, match="context") as e:
        mtplx.generate(model, tok, [5] * (model.max_context + 1), max_tokens=4)
    assert (e.value.prompt_tokens, e.value.context) == (model.max_context + 1, model.max_context)


def test_stop_scanner_holds_back_partial_stops():
    s = StopScanner(["STOP"])
    assert s.feed("abcST") == ("ab", False)
    assert s.feed("O") == ("c", False)  # "STO" may still begin "STOP"; "c" cannot
    assert s.matched is None
    assert s.feed("Pxyz") == ("", True)
    assert s.matched == "STOP"
    s = StopScanner([])
    assert s.feed("abc") == ("abc", False)


# ---------------------------------------------------------------- bad input: one MtplxError, before the model runs

@pytest.mark.parametrize("kwargs,needle", [
    ({"depth": 2.5}, "depth must be an integer or 'auto', got 2.5"),
    ({"depth": 99}, r"depth must be an integer in \[0, 8\] or 'auto', got 99"),
    ({"depth": -1}, "depth must be"),
    ({"max_tokens": 0}, "max_tokens must be"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0}, "top_p must be"),
    ({"top_k": -5}, "top_k must be"),
    ({"min_p": 2}, "min_p must be"),
    ({"seed": -5}, "seed must be"),
    ({"draft_temperature": -1}, "draft_temperature must be"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
    ({"prompt_cache": {"a": 1}}, "prompt_cache is a dict, not a PromptCache"),  # was an AttributeError
    ({"enable_thinking": "yes"}, "enable_thinking must be None, True or False"),  # was taken as true
])
def test_bad_knobs_are_mtplx_errors(demo, kwargs, needle):
    model, tok = demo
    with pytest.raises(MtplxError, match=needle):
        mtplx.generate(model, tok, "x", **kwargs)


@pytest.mark.parametrize("prompt,needle", [
    ([999999, 5], "id 999999, outside this model's vocabulary"),  # segfaulted the process before
    ([-1, 5], "id -1, outside"),
    ([5, 1.5], "token 1 of the prompt is 1.5, not an integer"),
    (None, "the prompt is None"),
    (b"def f(", "of type bytes"),
    ([{"role": "user"}], r"message 0 \(user\) has no content"),
    ([{"role": "user", "content": None}], "has no content"),
    ([{"role": "user", "content": 5}], "content of type int"),
    ([{"role": "wizard", "content": "hi"}], "message 0 has role 'wizard'"),
    ([{"content": "hi"}], "has role None"),
    ([{"role": "user", "content": "hi"}, 5], "prompt item 1 is a int among chat messages"),
    ("abc\udcff", "not valid Unicode text"),
    ([{"role": "user", "content": "\udcff"}], "message 0's content is not valid Unicode"),
])
def test_bad_prompts_are_mtplx_errors(demo, prompt, needle):
    model, tok = demo
    with pytest.raises(MtplxError, match=needle):
        mtplx.generate(model, tok, prompt, max_tokens=2)


def test_prompt_forms_that_work(demo):
    import mlx.core as mx
    import numpy as np

    from mtplx.api import prompt_ids
    from mtplx.generation.stops import check_stop

    model, tok = demo
    ids = encode_prompt(tok, "def f(x):")
    expected = mtplx.generate(model, tok, ids, max_tokens=2, temperature=0, depth=0)
    assert expected and mtplx.generate(model, tok, mx.array(ids), max_tokens=2, temperature=0, depth=0) == expected
    assert prompt_ids(model, tok, np.array(ids)) == ids
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "42"}]
    assert prompt_ids(model, tok, chat) == encode_prompt(tok, chat)
    assert check_stop("\n\n") == ["\n\n"] and check_stop(None) == [] and check_stop(("a", "b")) == ["a", "b"]


@pytest.mark.parametrize("ref", [None, 5, "", "  "])
def test_load_refuses_what_is_not_a_model_reference(ref):
    with pytest.raises(MtplxError, match="the model reference is"):
        mtplx.load(ref)


def test_load_takes_a_path(tmp_path):
    with pytest.raises(MtplxError, match="mtplx_runtime.json"):  # a Path reaches the loader, as a str would
        mtplx.load(tmp_path)


def test_stream_generate_checks_before_the_first_response(demo):
    model, tok = demo
    gen = mtplx.stream_generate(model, tok, None)  # lazy, as a generator: the server relies on it
    with pytest.raises(MtplxError, match="the prompt is None"):
        next(gen)


def test_package_import_is_light():
    import subprocess
    import sys

    import mtplx.api

    # The CLI's Ctrl-C guard and `mtplx --help` rely on this: MLX loads on first use of the API.
    code = "import sys, mtplx; print([m for m in ('mlx.core', 'mlx_lm', 'transformers', 'mtplx.api') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"`import mtplx` imported {out}"
    assert mtplx.load is mtplx.api.load and mtplx.stream_generate is mtplx.api.stream_generate  # PEP 562
    assert {"load", "generate", "stream_generate", "GenerationResponse"} <= set(dir(mtplx))
    with pytest.raises(AttributeError):
        mtplx.no_such_thing
