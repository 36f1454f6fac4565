"""The distributed leader's heartbeat thread evaluates MLX arrays (a ping sent and its answer
received, on the CPU stream) while the engine thread may be inside its own evaluation
(mtplx/distributed/stage.py, LeaderStage._beat). MLX supports evaluation from several threads
since 0.31.2 (ml-explore/mlx#2133, closed with "MLX has thread safety support in 0.31.2"), the
floor pyproject.toml declares. This test overlaps the two for real and asserts that the
engine's output is unchanged, token for token, and every heartbeat-like evaluation is right.
"""

from __future__ import annotations

import threading

import mlx.core as mx
from tiny_models import tiny_model

from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine

PROMPT = [1, 2, 3, 4, 5]
ROUNDS = 3


def _generate(model) -> list[int]:
    engine = Engine(model, 2, SamplingParams(temperature=0.8, top_k=8), seed=7)
    return [t for step in engine.generate(PROMPT, 32) for t in step.tokens]


def test_heartbeat_evaluations_overlap_the_engine_safely():
    model = tiny_model(vocab=64, seed=3)
    reference = _generate(model)
    stop = threading.Event()
    beats: list[bool] = []
    failures: list[BaseException] = []

    def heartbeat() -> None:
        # What a ping costs the leader: a control message built from a Python list, ops on the
        # CPU stream, an evaluation, and the answer read back to Python.
        i = 0
        try:
            while not stop.is_set():
                message = mx.array([i, 1, 2, 3] * 16, dtype=mx.int32)
                answer = mx.sum(mx.multiply(message, 2, stream=mx.cpu), stream=mx.cpu)
                mx.eval(answer)
                beats.append(answer.item() == 2 * (i * 16 + 6 * 16))
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        outputs = [_generate(model) for _ in range(ROUNDS)]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failures, failures
    assert len(beats) > ROUNDS, "the heartbeat thread must actually run beside the engine"
    assert all(beats), "a heartbeat evaluation came back wrong"
    assert all(out == reference for out in outputs), "the engine's output changed while the heartbeat ran"
