"""mtplx.core.knobs: the one definition of every decoding knob's limits, and SamplingParams on top."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtplx.core import knobs
from mtplx.engine.sampling import SamplingParams
from mtplx.errors import MtplxError

GOOD = {"depth": [0, 2, knobs.MAX_DEPTH], "max_tokens": [1, 10**6], "temperature": [0, 0.6, 2],
        "draft_temperature": [0.0, 1.5], "top_p": [1e-9, 1.0], "top_k": [0, 20], "min_p": [0.0, 1.0],
        "seed": [0, knobs.MAX_SEED], "prefill_chunk": [1, 512, knobs.MAX_PREFILL_CHUNK],
        "lookup": [0, 4, knobs.MAX_LOOKUP]}
BAD = {"depth": [-1, knobs.MAX_DEPTH + 1, 2.5, True, "2"], "max_tokens": [0, -1, 1.0],
       "temperature": [-1, math.nan, math.inf, "0.6", None], "draft_temperature": [-0.1, math.nan],
       "top_p": [0, 1.01, -math.inf], "top_k": [-5, 2.0], "min_p": [-0.1, 2], "seed": [-5, knobs.MAX_SEED + 1],
       "prefill_chunk": [0, -512, knobs.MAX_PREFILL_CHUNK + 1, 512.0, True],
       "lookup": [-1, knobs.MAX_LOOKUP + 1, 2.5, True, "4", "always"]}


@pytest.mark.parametrize("name", sorted(knobs.KNOBS))
def test_every_knob_accepts_its_range_and_refuses_the_rest(name):
    assert set(GOOD) == set(BAD) == set(knobs.KNOBS)  # a new knob gets cases here
    for value in GOOD[name]:
        out = knobs.KNOBS[name].check(value)
        assert out == value and type(out) is knobs.KNOBS[name].kind
    for value in BAD[name]:
        with pytest.raises(knobs.KnobError) as e:
            knobs.KNOBS[name].check(value)
        assert isinstance(e.value, MtplxError) and isinstance(e.value, ValueError) and e.value.param == name
        assert "bug" not in str(e.value) and "Fix: pass" in str(e.value)


def test_label_names_the_setting_as_the_user_wrote_it():
    with pytest.raises(knobs.KnobError, match=r"^--top-p must be a number in \(0, 1\], got 0.0") as e:
        knobs.check("top_p", 0.0, label="--top-p")
    assert e.value.param == "top_p"  # the server's error.param stays the knob's name
    with pytest.raises(knobs.KnobError, match=r"^depth must be an integer in \[0, 8\] or 'auto', got 99"):
        knobs.check("depth", 99)


def test_check_all_keeps_none_and_converts():
    out = knobs.check_all(temperature=1, top_k=np.int64(3), seed=None)
    assert out == {"temperature": 1.0, "top_k": 3, "seed": None}
    assert type(out["temperature"]) is float and type(out["top_k"]) is int
    with pytest.raises(TypeError, match="unknown decoding knob"):
        knobs.check_all(temprature=1)


def test_token_ids_are_checked_against_the_vocabulary():
    assert knobs.check_token_ids([0, np.int32(5), 9], 10) == [0, 5, 9]
    for ids, needle in (([999999, 5], "id 999999, outside"), ([-1], "id -1, outside"), ([1, 2.0], "not an integer"),
                        ([True], "not an integer"), ([10], r"\[0, 10\)")):
        with pytest.raises(knobs.KnobError, match=needle):
            knobs.check_token_ids(ids, 10)


def test_sampling_params_use_the_knobs():
    p = SamplingParams(temperature=np.float32(0.5), top_p=1, top_k=np.int64(4))
    assert (type(p.temperature), type(p.top_p), type(p.top_k)) == (float, float, int)
    for kw in ({"temperature": -1}, {"temperature": math.nan}, {"top_p": 0}, {"top_k": -5}, {"min_p": 2},
               {"temperature": None}, {"top_k": 2.5}):
        with pytest.raises(knobs.KnobError):
            SamplingParams(**kw)
