"""Stop strings (issue 21 row 2): the stop complete first in the text wins, whatever the order
of the list, and the cut does not depend on how the text arrived (MTP steps carry several
tokens, so one step's text may hold two stops)."""

from __future__ import annotations

import random

import pytest

import mtplx
from mtplx.generation.stops import StopScanner


def scan(stops, chunks):
    s = StopScanner(stops)
    out = []
    for i, c in enumerate(chunks):
        text, stopped = s.feed(c, final=i == len(chunks) - 1)
        out.append(text)
        if stopped:
            break
    return "".join(out), s.matched


@pytest.mark.parametrize("stops", [["pat", "is"], ["is", "pat"]])
def test_the_earliest_stop_in_one_chunk_wins_whatever_the_list_order(stops):
    assert scan(stops, ["This pattern"]) == ("Th", "is")


def test_of_two_stops_ending_together_the_longer_wins():
    assert scan(["bc", "abc"], ["xabcd"]) == ("x", "abc")
    # "bc" is complete before "abcd" is: a reader going character by character stops there.
    assert scan(["abcd", "bc"], ["xabcd"]) == ("xa", "bc")


def test_the_cut_does_not_depend_on_the_chunking():
    """Random texts over a small alphabet, random stops, random chunkings: every chunking gives
    what one chunk gives, and that is the earliest-ending match (checked by brute force)."""
    rng = random.Random(21)
    for _ in range(400):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
        want = (text[: min(ends)[0] + min(ends)[1]], min(ends)[2]) if ends else (text, None)
        assert scan(stops, [text]) == want
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert scan(stops, chunks) == want, (text, stops, chunks)


def test_api_stop_earliest_in_the_text_with_several_tokens_per_step(demo_bf16):
    """Two stops inside one greedy depth-3 reply, listed latest first: the reply ends at the
    one that comes first, and stop_sequence names it (on the demo's bf16 trunk: a quarter of the
    4-bit demo's time)."""
    model, tok = demo_bf16
    full = mtplx.generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3)
    first = full[8:11]
    assert full.find(first) == 8
    # a later stop: the first 3 characters past `first` that occur nowhere before
    later = next(full[p : p + 3] for p in range(11, len(full)) if full.find(full[p : p + 3]) == p)
    chunks = list(mtplx.stream_generate(model, tok, "import os\n", max_tokens=40, temperature=0, depth=3,
                                        stop=[later, first]))
    assert "".join(c.text for c in chunks) == full[:8]
    assert (chunks[-1].finish_reason, chunks[-1].stop_sequence) == ("stop", first)
