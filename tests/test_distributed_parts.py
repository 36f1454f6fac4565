"""The pieces of a distributed run that need no second process: the control message, the layer
split, which errors count as a lost connection, and the watchdog's stderr filter."""

from __future__ import annotations

import os

import pytest

from mtplx.distributed._watchdog_child import Relay
from mtplx.distributed.link import is_backend_error
from mtplx.distributed.protocol import INLINE_TOKENS, MESSAGE_SIZE, NO_DECISION, Control, Op
from mtplx.distributed.split import layer_split
from mtplx.errors import MtplxError


def test_control_messages_round_trip():
    verify = Control(Op.VERIFY, reset=False, keep=2, tokens=[5, 17, 4095])
    message = verify.encode()
    assert message.shape == (MESSAGE_SIZE,)
    assert Control.decode(message.tolist()) == verify
    # A prefill chunk longer than the message carries its length; its tokens follow separately.
    chunk = Control(Op.FORWARD, reset=True, tokens=list(range(INLINE_TOKENS + 1)))
    decoded = Control.decode(chunk.encode().tolist())
    assert (decoded.op, decoded.reset, decoded.keep, decoded.length, decoded.tokens) == (
        Op.FORWARD, True, NO_DECISION, INLINE_TOKENS + 1, [])
    assert not decoded.inline


def test_layer_split_matches_mlx_lm_and_checks_a_given_one():
    assert layer_split(8, 2) == [4, 4]
    assert layer_split(64, 3) == [22, 21, 21]  # mlx-lm: the low ranks (last layers) take the extra
    assert layer_split(8, 2, [3, 5]) == [3, 5]
    for bad in ([4, 3], [0, 8], [2, 3, 3]):
        with pytest.raises(MtplxError, match="--distributed-layers"):
            layer_split(8, 2, bad)
    with pytest.raises(MtplxError, match="fewer than the 9 ranks"):
        layer_split(8, 9)


def test_only_backend_errors_count_as_a_lost_connection():
    assert is_backend_error(RuntimeError("[ring] connection to a peer was lost"))
    assert is_backend_error(RuntimeError("[jaccl] failed to post a receive"))
    assert not is_backend_error(RuntimeError("[malloc] Unable to allocate 1073741824 bytes"))


def test_the_watchdog_drops_the_ring_backends_chatter_and_nothing_else():
    read_end, write_end = os.pipe()
    relay = Relay(write_end, drop=True)
    text = (b"[ring] Socket 7 was closed by the peer\n" b"step 1 [ring] inside a line stays\n"
            b"[ri" b"ng] Too many send/recv errors. Failing pending tasks...\n" b"mtplx: error: rank 0 lost ...\n"
            b"[rin" b"dom text that only starts like it\n" b"progress 10%\r" b"progress 20%")
    for i in range(0, len(text), 5):  # arrives in pieces that split lines anywhere
        relay.feed(text[i : i + 5])
    relay.close()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read()
    assert out == (b"step 1 [ring] inside a line stays\n" b"mtplx: error: rank 0 lost ...\n"
                   b"[rindom text that only starts like it\n" b"progress 10%\rprogress 20%")
