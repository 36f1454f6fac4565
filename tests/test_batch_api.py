"""``mtplx.batch_generate``: one result per prompt, in order, each equal to that prompt decoded
alone with the same settings (bf16 graft of the fixture), per-prompt settings and stop strings."""

from __future__ import annotations

import pytest

import mtplx
from mtplx.errors import MtplxError


@pytest.fixture(scope="module")
def bf16(grafted_bf16):
    return mtplx.load(str(grafted_bf16[0]))


def test_each_prompt_equals_generate_alone(bf16):
    model, tok = bf16
    prompts = ["def f(x):\n", tok.encode("import os\n"), [{"role": "user", "content": "Count to five."}]]
    temps, seeds, depths = [0.0, 0.8, 1.0], [0, 11, 12], [2, 1, 0]
    got = mtplx.batch_generate(model, tok, prompts, max_tokens=[12, 10, 8], temperature=temps, seed=seeds,
                               depth=depths, enable_thinking=False, logprobs=[None, 2, None])
    assert len(got) == 3
    for i, (prompt, r) in enumerate(zip(prompts, got)):
        want = mtplx.generate(model, tok, prompt, max_tokens=[12, 10, 8][i], temperature=temps[i], seed=seeds[i],
                              depth=depths[i], enable_thinking=False)
        assert r.text == want, i
        assert r.finish_reason in ("stop", "length") and r.stats.generated == len(r.tokens) > 0
    assert got[1].logprobs is not None and len(got[1].logprobs) == len(got[1].tokens)
    assert got[0].logprobs is None


def test_a_stop_string_ends_only_its_row(bf16):
    model, tok = bf16
    free = mtplx.batch_generate(model, tok, ["def f(x):\n"], max_tokens=16, temperature=0.0)[0]
    stop = free.text[3:6]
    got = mtplx.batch_generate(model, tok, ["def f(x):\n", "def f(x):\n"], max_tokens=16, temperature=0.0,
                               stop=[[stop], None])
    assert got[0].finish_reason == "stop" and got[0].stop_sequence == stop and stop not in got[0].text
    assert got[1].text == free.text


@pytest.mark.parametrize("kwargs, needle", [
    ({"prompts": "one prompt"}, "list of prompts"),
    ({"temperature": [0.1, 0.2, 0.3]}, "temperature has 3 values for 2 prompts"),
    ({"top_p": [0.5, 7.0]}, "top_p"),
])
def test_bad_arguments_are_refused_before_decoding(bf16, kwargs, needle):
    model, tok = bf16
    kwargs = {"prompts": ["a", "b"]} | kwargs
    with pytest.raises((MtplxError, ValueError), match=needle):
        mtplx.batch_generate(model, tok, kwargs.pop("prompts"), max_tokens=4, **kwargs)
