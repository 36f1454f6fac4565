"""The decoder the server's loop steps, and the guard that keeps one row's grammar failure in that row.

The server has one driver: ``mtplx.engine.batch.BatchDecoder`` (one verify pass over every row per
step). ``--max-batch 1`` is the same decoder with room for one row.

A row's grammar (``mtplx.engine.constraints.Constraint``) is host work the batched step does for
that row alone, between passes. An exception there (a matcher that allows no token) would abort
the step for every row, although nothing shared went wrong. :class:`GuardedConstraint` catches it,
remembers it, and answers as if the row had no grammar for the rest of the step: the row's
garbage stays in its own caches and random stream, every other row's step completes unchanged,
and the loop (``mtplx.server.queue``) then ends that row with the error.
"""

from __future__ import annotations

from typing import Any

from mtplx.core import knobs
from mtplx.engine.batch import BatchDecoder


def make_decoder(model: Any, max_batch: int, prefill_chunk: int | None = None) -> BatchDecoder:
    """The server's decoder; ``prefill_chunk``: prompt tokens a joining row feeds per step (None: the
    knob's default, the API's own, so the server and ``mtplx.generate`` chunk a prompt alike)."""
    # isolate_rows: one row's failing host work (acceptance, logprobs, strict greedy) ends that row only.
    return BatchDecoder(model, max_batch=max_batch, isolate_rows=True,
                        prefill_chunk=knobs.PREFILL_CHUNK if prefill_chunk is None else prefill_chunk)


class GuardedConstraint:
    """A row's constraint whose first exception is kept in ``error`` instead of raised. After it,
    every call is neutral: a mask returns its logits unmasked, anything else returns None.
    Unmasked logits are harmless: the row's output is discarded once ``error`` is seen."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.error is None:
                try:
                    return attr(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - ends this row only (see the module doc)
                    self.error = e
            return args[0] if name.startswith("mask") and args else None

        return call
