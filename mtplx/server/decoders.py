"""The decoder the server's loop steps: rows join, step together, leave.

``make_decoder`` picks the batched decoder (``mtplx.engine.batch.BatchDecoder``: one verify pass
over every row per step) for ``--max-batch`` above 1, and :class:`SerialDecoder` for
``--max-batch 1`` (today's one-at-a-time server, bit for bit). Both take the same requests (a
:class:`~mtplx.generation.row_text.RowSpec` is the batched decoder's ``RowRequest``) and answer the same
``(row, Emitted)`` pairs, so the loop (``mtplx.server.queue``) does not know which it drives.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from mtplx.engine.batch import BatchDecoder
from mtplx.engine.speculative import Emitted, Engine
from mtplx.engine.stats import DecodeStats
from mtplx.generation.row_text import RowSpec


class SerialRow:
    """A row of the serial decoder: its own single-sequence engine and generator."""

    _ids = itertools.count()

    def __init__(self, model: Any, request: RowSpec):
        self.id = next(self._ids)
        self.request = request
        self.engine = Engine(model, request.depth, request.params, request.draft_params, request.seed,
                             request.constraint, logprobs=request.logprobs, strict_greedy=request.strict_greedy)
        self._gen: Iterator[Emitted] = self.engine.generate(request.prompt, request.max_tokens, request.eos,
                                                             prompt_cache=request.prompt_cache,
                                                             snapshot_at=request.snapshot_at)
        self.done = False
        self.error: BaseException | None = None

    @property
    def stats(self) -> DecodeStats:
        return self.engine.stats

    @property
    def cache(self) -> Any:
        return self.engine.cache

    def close(self) -> None:
        """Ends the engine's generator, which leaves the prompt cache holding what was consumed."""
        self.done = True
        self._gen.close()


class SerialDecoder:
    """Rows decoded one after another inside each step, each by the single-sequence engine. With
    one row this is exactly ``stream_generate``'s engine; with more, rows take turns step by step
    (no step is shared, so nothing is faster, but a short request no longer waits for a long one)."""

    def __init__(self, model: Any, max_batch: int = 1):
        self.model = model
        self.max_batch = max_batch
        self.rows: list[SerialRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, request: RowSpec) -> SerialRow:
        row = SerialRow(self.model, request)
        self.rows.append(row)
        return row

    def remove(self, row: SerialRow) -> None:
        if row in self.rows:
            self.rows.remove(row)
        row.close()

    def step(self) -> list[tuple[SerialRow, Emitted]]:
        """One engine step of every row. A row whose engine ends is marked done; one whose engine
        raises is marked done with ``error`` set (the others are unaffected)."""
        out = []
        for row in list(self.rows):
            try:
                out.append((row, next(row._gen)))
            except StopIteration:
                row.done = True
            except Exception as e:  # noqa: BLE001 - one row's failure is reported on that row
                row.error = e
                row.done = True
        return out


def make_decoder(model: Any, max_batch: int) -> Any:
    return BatchDecoder(model, max_batch=max_batch) if max_batch > 1 else SerialDecoder(model, max_batch)
